"""Atomic switches on disk: a save killed at any moment leaves the previous files or the new ones whole, never a mix
and never nothing.

Several files in one directory (an adapter's adapter_config.json + adapter_model.safetensors) cannot be renamed in one
step, so the switch is journaled:

    write each new file to a temp file beside it, fsync          (killed here: the old files, untouched)
    write .peftc-switch.json = [[temp, final], ...], fsync        (one rename makes the journal appear whole)
    rename each temp over its final name                          (killed here: the journal completes the switch)
    remove the journal

`recover(directory)` completes an interrupted switch (every temp the journal names is whole, since the journal is
written only after them); peftc's loads and saves call it first. A directory of its own (an export) is switched with
the OS's atomic exchange (renameat2 RENAME_EXCHANGE, Linux) where the file system has it, and journaled the same way
where it does not.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

JOURNAL = ".peftc-switch.json"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:               # a platform without directory handles (Windows): its renames are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_journal(path: Path, entry) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def write_files(directory: Path, files: dict[str, Callable[[str], None]]) -> None:
    """Write `files` ({file name: write(temp path)}) into `directory` as one switch (see the module docstring), after
    completing an interrupted one."""
    directory = Path(directory)
    recover(directory, files)
    tmps: dict[str, str] = {}
    journal = directory / JOURNAL
    try:
        for name, write in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            tmps[name] = tmp
            write(tmp)
            _fsync_file(tmp)
        _write_journal(journal, {"files": [[Path(t).name, n] for n, t in tmps.items()]})
        for name, tmp in tmps.items():
            _complete(tmp, directory / name)
        _fsync_dir(directory)
        journal.unlink(missing_ok=True)
    finally:
        if not journal.exists():
            for tmp in tmps.values():
                if os.path.exists(tmp):
                    os.unlink(tmp)


def _complete(tmp, final) -> None:
    """One rename of a journaled switch; a temp already gone was renamed by whoever else completes the switch (the
    saver, or a load that recovers it meanwhile)."""
    try:
        os.replace(tmp, final)
    except FileNotFoundError:
        if not os.path.exists(final):
            raise


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2); OSError where the OS or file system has no such call."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished directory `tmp` at `out`, replacing what is there in one step (see the module docstring)."""
    tmp, out = Path(tmp), Path(out)
    _fsync_dir(tmp)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        return
    try:
        _exchange(tmp, out)                   # `tmp` now holds the old directory
    except OSError:
        _journaled_replace(tmp, out)
        return
    _fsync_dir(out.parent)
    shutil.rmtree(tmp, ignore_errors=True)


def _dir_journal(out: Path) -> Path:
    return out.with_name(f".{out.name}{JOURNAL}")


def _journaled_replace(tmp: Path, out: Path) -> None:
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.peftc-old-", dir=out.parent))
    os.rmdir(backup)                      # a free name beside `out`
    journal = _dir_journal(out)
    _write_journal(journal, {"new": tmp.name, "old": backup.name})
    os.replace(out, backup)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    journal.unlink()
    shutil.rmtree(backup, ignore_errors=True)


def recover(directory, names=()) -> None:
    """Complete a switch of files in `directory` that a killed save left half done (safe beside a save that is
    completing it itself). A save also passes the `names` it writes: then the temp files of those names that a save
    killed before its switch left behind are removed (so two processes must not save into one directory at once;
    loading beside a save is fine)."""
    directory = Path(directory)
    journal = directory / JOURNAL
    try:
        if journal.is_file():
            entry = json.loads(journal.read_text())
            for tmp, name in entry["files"]:
                _complete(directory / tmp, directory / name)
            _fsync_dir(directory)
            journal.unlink(missing_ok=True)
        for name in ((*names, JOURNAL) if names else ()):
            for left in directory.glob(f".{glob.escape(name)}.*.tmp"):
                left.unlink()
    except OSError as e:
        from .errors import CheckpointError
        raise CheckpointError(f"{directory} holds a save that was interrupted, and completing it failed "
                              f"({e.strerror}); make the directory writable and load or save again") from e


def recover_dir(out) -> None:
    """Complete (or undo, where it had not started) a directory switch at `out` that a killed save left half done,
    and remove what saves killed before their switch left beside it. Call it before making a new temp directory."""
    out = Path(out)
    journal = _dir_journal(out)
    if journal.is_file():
        entry = json.loads(journal.read_text())
        new, old = out.with_name(entry["new"]), out.with_name(entry["old"])
        if not out.exists():                           # killed between the two renames: the new one is whole
            os.replace(new if new.exists() else old, out)
        _fsync_dir(out.parent)
        journal.unlink()
    if out.parent.is_dir():
        for left in out.parent.glob(f".{glob.escape(out.name)}.peftc-*"):
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
