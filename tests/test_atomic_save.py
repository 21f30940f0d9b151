"""A save killed at any moment leaves the previous save or the new one whole at the user's path: never a mix, never
nothing. Adapter directories (two files, a journaled switch) and exported directories (an atomic exchange, or the
journaled fallback where the OS has none), killed right after every rename and at random moments, in a subprocess that
saves a different spec over an existing save; then the next load (or save) completes the switch."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import peftc
from peftc import atomic
from peftc.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"a": dict(r=2, alpha=4, targets=["q_proj"]), "b": dict(r=4, alpha=8, targets=["q_proj", "v_proj"])}

# The saver: compiles the tiny Llama with spec `which` (a fixed seed, so the same bytes every time), then saves it to
# `out` (an adapter directory or a merged export); with `kill_after` N it dies (SIGKILL: no finally, no atexit) right
# after the N-th rename of the switch; with `loop` it alternates specs a and b for ever, printing each finished save.
SAVER = r"""
import os, sys, itertools, torch, peftc
from peftc import atomic
from peftc.tiny import tiny_model
kind, out, which, kill_after, fallback, loop = sys.argv[1:7]
SPECS = %r
torch.set_num_threads(1)
def module(w):
    torch.manual_seed(1)
    return peftc.compile(tiny_model("llama"), peftc.LoRA(init=False, **SPECS[w]))
mods = {w: module(w) for w in (("a", "b") if loop == "1" else (which,))}
if fallback == "1":
    def no_exchange(a, b):
        raise OSError(38, "no exchange here")
    atomic._exchange = no_exchange
if int(kill_after):
    calls = [0]
    def dying(f):
        def wrapped(*a, **k):
            r = f(*a, **k)
            calls[0] += 1
            if calls[0] == int(kill_after):
                os.kill(os.getpid(), 9)
            return r
        return wrapped
    os.replace = dying(os.replace)
    if fallback != "1":
        atomic._exchange = dying(atomic._exchange)
def save(w):
    if kind == "adapter":
        mods[w].save_adapter(out)
    else:
        peftc.export_merged(mods[w], out, overwrite=True)
print("ready", flush=True)
if loop == "1":
    for w in itertools.cycle("ab"):
        save(w)
        print("saved", w, flush=True)
else:
    save(which)
    print("saved", which, flush=True)
""" % (SPECS,)


def run_saver(kind: str, out: Path, which: str, kill_after: int = 0, fallback: bool = False) -> str:
    p = subprocess.run([sys.executable, "-c", SAVER, kind, str(out), which, str(kill_after), str(int(fallback)), "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    return p.stdout


def module(which: str):
    """The saver's module for spec `which`, in this process (the same bytes when saved)."""
    torch.manual_seed(1)
    return peftc.compile(tiny_model("llama"), peftc.LoRA(init=False, **SPECS[which]))


def save(kind: str, pm, out: Path) -> None:
    if kind == "adapter":
        pm.save_adapter(out)
    else:
        peftc.export_merged(pm, out, overwrite=True)


def content(p: Path):
    """A file's content: its bytes; a whole safetensors file as its metadata and tensors (the order of the metadata's
    keys in the header is not fixed from one save to the next)."""
    if p.suffix == ".safetensors":
        try:
            with safe_open(p, "pt") as f:
                meta = json.dumps(f.metadata() or {}, sort_keys=True)
                return meta, [(k, f.get_tensor(k).dtype, f.get_tensor(k).tolist()) for k in sorted(f.keys())]
        except Exception:               # not whole: compared as bytes (and so unequal to a whole save)
            pass
    return p.read_bytes()


def tree(path: Path) -> dict:
    """Every file under `path` by relative name -> its content."""
    return {str(p.relative_to(path)): content(p) for p in sorted(path.rglob("*")) if p.is_file()}


def put(source: Path, out: Path) -> None:
    shutil.copytree(source, out)


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """What a whole save of spec a and of spec b leaves, as an adapter and as an export (saved here: the subprocess
    makes the same bytes, as the first kill test checks)."""
    root = tmp_path_factory.mktemp("whole")
    out = {}
    for w in "ab":
        pm = module(w)
        for kind in ("adapter", "export"):
            save(kind, pm, root / kind / w)
            out[kind, w], out["dir", kind, w] = tree(root / kind / w), root / kind / w
    assert out["adapter", "a"] != out["adapter", "b"] and out["export", "a"] != out["export", "b"]
    return out


def check_whole(kind: str, out: Path, saves) -> str:
    """What the next load (adapter) or export does first completes the switch; then `out` holds exactly save a or
    save b. A load leaves the temp files of a save killed before its switch (they may be another process's save in
    progress); the next save removes them."""
    if kind == "adapter":
        pm = peftc.load_adapter(tiny_model("llama"), out)
        which = "a" if pm.store["default"].spec.r == 2 else "b"
        got = {k: v for k, v in tree(out).items() if not k.endswith(".tmp")}
    else:
        atomic.recover_dir(out)
        got = tree(out)
        which = next((w for w in "ab" if got == saves[kind, w]), "neither")
        assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    assert got == saves.get((kind, which)), f"{kind}: not one whole save at {out}: {sorted(got)}"
    return which


# the renames of one switch: adapter = journal, weights, config; export = the exchange, or (no exchange) journal,
# old aside, new in
BOUNDARIES = [("adapter", n, False) for n in (1, 2, 3)] + [("export", 1, False)] + \
             [("export", n, True) for n in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("kind,n,fallback", BOUNDARIES)
def test_killed_right_after_each_rename_leaves_one_whole_save(kind, n, fallback, saves, tmp_path):
    out = tmp_path / "target"
    put(saves["dir", kind, "a"], out)
    printed = run_saver(kind, out, "b", kill_after=n, fallback=fallback)
    assert "ready" in printed and "saved" not in printed            # it did die mid-switch
    # once the journal is written (adapter: the first rename) or the exchange is done, the new save is the one
    assert check_whole(kind, out, saves) == ("a" if (kind, n, fallback) == ("export", 1, True) else "b")
    save(kind, module("a"), out)                                     # and the next save over it is whole
    assert tree(out) == saves[kind, "a"]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adapter", "export"])
def test_killed_at_random_moments_leaves_one_whole_save(kind, saves, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "target"
    put(saves["dir", kind, "a"], out)
    midway = 0
    for kills in range(1, 7):                           # at least 3, and on until one landed inside a save
        p = subprocess.Popen([sys.executable, "-c", SAVER, kind, str(out), "a", "0", "0", "1"], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))              # saves of a and b back to back: killed somewhere in one
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        left = [q.name for q in out.parent.iterdir() if q.name != out.name] + \
            [q.name for q in out.iterdir() if q.name.startswith(".")]
        midway += bool(left)                            # a journal or temp files: the kill landed inside a save
        check_whole(kind, out, saves)
        if kills >= 3 and midway:
            break
    assert midway, "no kill landed inside a save: the test did not test anything"


# --- the journal's recovery, in process -----------------------------------------------------------------------------

def test_recover_completes_a_journaled_file_switch(tmp_path):
    (tmp_path / "x.json").write_text("old x")
    (tmp_path / "y.bin").write_text("old y")
    (tmp_path / ".x.json.1.tmp").write_text("new x")
    (tmp_path / ".y.bin.2.tmp").write_text("new y")
    os.replace(tmp_path / ".x.json.1.tmp", tmp_path / "x.json")          # killed after the first of two renames
    (tmp_path / ".x.json.1.tmp").unlink(missing_ok=True)
    (tmp_path / atomic.JOURNAL).write_text(json.dumps({"files": [[".x.json.1.tmp", "x.json"],
                                                                  [".y.bin.2.tmp", "y.bin"]]}))
    atomic.recover(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"x.json": "new x", "y.bin": "new y"}
    atomic.recover(tmp_path)                                             # nothing left to do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "y.bin"]


def test_a_write_that_fails_before_the_switch_leaves_the_old_files(tmp_path):
    atomic.write_files(tmp_path, {"x.json": lambda t: Path(t).write_text("old")})

    def boom(tmp):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic.write_files(tmp_path, {"x.json": lambda t: Path(t).write_text("new"), "y.bin": boom})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"x.json": "old"}


@pytest.mark.parametrize("stage", ["journal written", "old moved aside", "new moved in"])
def test_recover_dir_completes_or_undoes_a_journaled_directory_switch(tmp_path, stage):
    out, new, old = tmp_path / "out", tmp_path / ".out.peftc-tmp-1", tmp_path / ".out.peftc-old-2"
    out.mkdir(), new.mkdir()
    (out / "f").write_text("old"), (new / "f").write_text("new")
    atomic._write_journal(atomic._dir_journal(out), {"new": new.name, "old": old.name})
    if stage != "journal written":
        os.replace(out, old)
    if stage == "new moved in":
        os.replace(new, out)
    atomic.recover_dir(out)
    assert (out / "f").read_text() == ("old" if stage == "journal written" else "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exchange_swaps_two_directories_where_the_os_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("a"), (b / "f").write_text("b")
    try:
        atomic._exchange(a, b)
    except OSError as e:                 # a platform without renameat2 takes the journaled path (tested above)
        pytest.fail(f"this Linux machine should have renameat2 RENAME_EXCHANGE: {e}")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


def test_saving_twice_leaves_no_temp_files(tmp_path):
    torch.manual_seed(0)
    pm = peftc.compile(tiny_model("llama"), peftc.LoRA(r=2, targets=["q_proj"]))
    pm.save_adapter(tmp_path / "ad")
    pm.save_adapter(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peftc.export_merged(pm, tmp_path / "m")
    peftc.export_merged(pm, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "m"]
