"""The `peftc` command line (click): demo, inspect, merge, export, generate. Bad input ends in one line; -v adds the
traceback."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import click

from .errors import PeftcError
from .spec import TASK_TYPES

log = logging.getLogger(__name__)

# errors that mean "bad input" at the command-line boundary: peftc's own, and what loading files raises
EXPECTED = (PeftcError, OSError, ValueError)
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
# AutoModel class for an adapter's task_type (as PEFT's AutoPeftModelFor... pick it)
TASK_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
                "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja")
_HEAD_WEIGHT = re.compile(r"(?:^|\.)(classifier|score)(?:\.modules_to_save(?:\.[\w-]+)?)?\.weight$")


class Failure(click.ClickException):
    """A one-line error for the user: `peftc: error: <message>`, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"peftc: error: {self.format_message()}", err=True)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if isinstance(e, PeftcError) else f"{type(e).__name__}: {msg}"


def _enable_logging() -> None:
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("peftc").setLevel(logging.DEBUG)


def _verbose(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["peftc.verbose"] = True   # ctx.meta is shared by the group and its subcommand
        _enable_logging()
        warnings.simplefilter("default")
    return value


def verbose_option(f):
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_verbose,
                        help="Debug logging, and a traceback on errors (also PEFTC_LOG=debug).")(f)


class Group(click.Group):
    """Turns the errors in EXPECTED into a one-line message (the traceback only with -v or PEFTC_LOG=debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            if not _debug(ctx):   # torch's and transformers' deprecation notices are not the user's business
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return super().invoke(ctx)
            except Failure as e:
                if _debug(ctx) and e.__cause__ is not None:
                    traceback.print_exception(e.__cause__)
                raise
            except EXPECTED as e:
                if _debug(ctx):
                    traceback.print_exc()
                raise Failure(_one_line(e)) from None


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.meta.get("peftc.verbose")) or os.environ.get("PEFTC_LOG", "").lower() == "debug"


@click.group(cls=Group, context_settings=CONTEXT)
@verbose_option
@click.version_option(package_name="peftc", prog_name="peftc")
def main() -> None:
    """peftc: parameter-efficient fine-tuning as a compiler (trace, match, rewrite, merge, export).

    \b
    Examples:
      peftc demo                                   # LoRA fine-tune of the bundled MiniLM, end to end
      peftc inspect tiny:llama --targets all-linear
      peftc merge --base BASE_DIR --adapter ADAPTER_DIR --out merged
      peftc export --base BASE_DIR --adapter ADAPTER_DIR --out model.pt2
      peftc generate --base BASE_DIR --adapter ADAPTER_DIR --prompt "Once upon a time"

    Set PEFTC_LOG=debug (or pass -v) for debug logging.
    """


# --- paths and models ----------------------------------------------------------------------------------------------
def _check_out_dir(out: Path, overwrite: bool, option: str = "--out") -> None:
    if out.exists() and not out.is_dir():
        raise Failure(f"{option} {out} exists and is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise Failure(f"{option} {out} exists and is not empty; pass --overwrite to replace it, or choose a new path")


def _check_out_file(out: Path, overwrite: bool, option: str = "--out") -> None:
    if out.is_dir():
        raise Failure(f"{option} {out} is a directory; pass a file path such as model.pt2")
    if out.exists() and not overwrite:
        raise Failure(f"{option} {out} exists; pass --overwrite to replace it, or choose a new path")


def _check_model_dir(path: Path, option: str) -> None:
    if not path.exists():
        raise Failure(f"{option} {path} does not exist")
    if not path.is_dir():
        raise Failure(f"{option} {path} is a file; pass a Hugging Face model directory (holding config.json)")
    if not (path / "config.json").is_file():
        raise Failure(f"{option} {path} is not a Hugging Face model directory: it has no config.json")


def load_model(path: str | Path, *, option: str = "MODEL", task_type: str | None = None,
               num_labels: int | None = None):
    """A local Hugging Face model directory, loaded with the AutoModel class of `task_type` if given, else the class
    named in config.json's `architectures`, else AutoModel. `tiny:<arch>` is a built-in random-init small model."""
    import transformers
    from transformers import logging as hf_logging

    if str(path).startswith("tiny:"):
        from .tiny import TINY, tiny_model

        arch = str(path)[len("tiny:"):]
        if arch not in TINY:
            raise Failure(f"{option} {path}: unknown tiny architecture {arch!r}; built in: "
                          + ", ".join(f"tiny:{a}" for a in TINY))
        return tiny_model(arch)
    path = Path(path)
    _check_model_dir(path, option)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise Failure(f"{option} {path} is not a loadable Hugging Face model: {_one_line(e)}") from e
    archs = getattr(config, "architectures", None) or []
    if task_type in TASK_CLASSES:
        cls = getattr(transformers, TASK_CLASSES[task_type])
    elif archs and hasattr(transformers, archs[0]):
        cls = getattr(transformers, archs[0])
    else:
        cls = transformers.AutoModel
    kwargs = {}
    if num_labels is not None and num_labels != getattr(config, "num_labels", None):
        kwargs["num_labels"] = num_labels
    log.info("loading %s with %s%s", path, cls.__name__, f" (num_labels={num_labels})" if kwargs else "")
    hf_logging.set_verbosity_error()   # a head the adapter brings is "newly initialized"; the adapter replaces it
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(path, **kwargs).eval()
    except (OSError, ValueError) as e:
        raise Failure(f"{option} {path}: cannot load it as {cls.__name__}: {_one_line(e)}") from e


def _check_base_and_adapter(base: Path, adapter: Path) -> dict[str, Any]:
    """Check both paths and read the adapter's config; returns load_model's keywords for `base`: the model class the
    adapter was made for (its task_type) and, for classification, the number of labels its saved head has."""
    from .checkpoint import load_spec, read_adapter_weights

    _check_model_dir(base, "--base")
    if not adapter.exists():
        raise Failure(f"--adapter {adapter} does not exist")
    spec = load_spec(adapter)
    num_labels = None
    if spec.task_type == "SEQ_CLS":
        for key, t in read_adapter_weights(adapter).items():
            m = _HEAD_WEIGHT.search(key)
            if m and m.group(1) in spec.modules_to_save and t.ndim == 2:
                num_labels = t.shape[0]
    return {"option": "--base", "task_type": spec.task_type, "num_labels": num_labels}


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for n in copied:
        shutil.copy2(src / n, dst / n)
    return copied


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# --- commands ------------------------------------------------------------------------------------------------------
@main.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory for adapter/ and merged/ (default: a new temporary directory, printed).")
@click.option("--epochs", type=click.IntRange(1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Data split, initialization and batch order.")
@click.option("--overwrite", is_flag=True, help="Allow --out to be an existing non-empty directory.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch threads (default: torch's own, or 1 when the machine is already busy).")
@verbose_option
def demo(out: Path | None, epochs: int, seed: int, overwrite: bool, threads: int | None) -> None:
    """LoRA fine-tune of the bundled all-MiniLM-L6-v2, end to end, offline (about a minute on a 2-core CPU).

    Fine-tunes the real all-MiniLM-L6-v2 as a 4-topic classifier on the shipped data set (360 train / 120
    held-out sentences) with a progress bar and the loss, prints held-out accuracy before and after, saves the
    adapter in PEFT format (OUT/adapter), merges it and exports a Hugging Face directory (OUT/merged), reloads
    that with plain transformers and checks its outputs against the adapted model, and ends with a summary table.
    Exits non-zero if any check fails.

    \b
    Examples:
      peftc demo
      peftc demo --out demo-out --epochs 2
      PEFTC_LOG=debug peftc demo --out demo-out --overwrite
    """
    from . import demo as demo_mod

    if out is not None:
        _check_out_dir(out, overwrite)
    r = demo_mod.run(None if out is None else str(out), epochs=epochs, seed=seed, overwrite=overwrite,
                     threads=threads, say=click.echo)
    click.echo(demo_mod.summary(r))
    failed = [name for name, ok in r["checks"].items() if not ok]
    if failed:
        raise Failure(f"{len(failed)} check(s) failed: {'; '.join(failed)}")


def _parse_targets(value: str | None):
    """'q_proj,v_proj' -> a list of names; 'all-linear'; a value with regex characters -> a regex; one plain name
    -> a one-name list; None -> None (q and v from the attention pattern)."""
    if value is None:
        return None
    if "," in value:
        return [t.strip() for t in value.split(",") if t.strip()]
    if value.lower() == "all-linear" or re.search(r"[*+?\[\](){}|^$\\]", value):
        return value
    return [value]


@main.command("inspect", context_settings=CONTEXT)
@click.argument("model")
@click.option("--targets", default=None, metavar="TARGETS",
              help="Comma-separated module names (a path or its trailing components), a regex that fully matches a "
                   "module path, or all-linear. Default: the query and value projections, found from the attention "
                   "pattern in the graph.")
@click.option("--r", "r", type=click.IntRange(1), default=8, show_default=True, help="LoRA rank (methods with one).")
@click.option("--method", default="lora", show_default=True,
              help="Any registered method, by name (lora, ia3, ...; a user's registered method too), or dora (LoRA "
                   "with use_dora: a magnitude per output channel too).")
@click.option("--config", "config", default=None, type=click.Path(exists=True, path_type=Path),
              help="An adapter directory or its adapter_config.json (PEFT's or peftc's): inspect that spec instead "
                   "of --method/--r/--targets.")
@click.option("--modules-to-save", default=None, metavar="NAMES",
              help="Comma-separated modules trained in full (e.g. classifier).")
@click.option("--task-type", type=click.Choice(TASK_TYPES, case_sensitive=False), default=None,
              help="As PEFT's task_type: SEQ_CLS trains the classifier head in full and keeps it out of all-linear.")
@verbose_option
def inspect_cmd(model: str, targets: str | None, r: int, method: str, config: Path | None,
                modules_to_save: str | None, task_type: str | None) -> None:
    """Show which layers an adapter would be inserted into, found in the traced graph.

    MODEL is a local Hugging Face model directory, or tiny:ARCH for a built-in small random-init model (ARCH: llama,
    qwen2, mistral, gpt2, bert, vit). Prints one row per adapted site (module path, attention role found in the
    graph, type, in/out features, the method's parameters there), the totals, and each target that matched nothing.
    Exits 1 if a target matched nothing or the rank does not fit (peftc.compile would refuse the same spec).

    \b
    Examples:
      peftc inspect tiny:llama
      peftc inspect tiny:gpt2 --targets all-linear --r 4
      peftc inspect tiny:llama --targets q_proj,k_proj,q_prj
      peftc inspect tiny:bert --targets '.*attention\\.self\\.(query|key)'
      peftc inspect tiny:bert --targets all-linear --task-type SEQ_CLS
      peftc inspect tiny:llama --method dora --targets all-linear
      peftc inspect tiny:gpt2 --method ia3
      peftc inspect tiny:llama --config path/to/adapter-dir
      peftc inspect path/to/hf-model-dir --targets all-linear
    """
    from .checkpoint import load_spec
    from .inspection import format_plan, plan_sites

    if config is not None:
        spec = load_spec(config if config.is_dir() else config.parent)
    else:
        mts = [m.strip() for m in (modules_to_save or "").split(",") if m.strip()]
        spec = _method_spec(method, r=r, targets=_parse_targets(targets), modules_to_save=mts,
                            use_dora=method.lower() == "dora", task_type=task_type.upper() if task_type else None)
    m = load_model(model)
    plan = plan_sites(m, spec)
    click.echo(format_plan(plan))
    if not plan.ok:
        raise click.exceptions.Exit(1)


def _method_spec(method: str, **given):
    """A spec of the registered method named `method` (its name, any case; "dora": LoRA with use_dora) from the
    options it has (a field of its spec; LoRA's rank only where it has one)."""
    import dataclasses

    from .methods import METHODS, method_tagged
    from .pipeline import FORMS  # noqa: F401 (imports the built-in methods)

    name = method.lower()
    m = method_tagged("lora" if name == "dora" else name)
    if m is None:
        raise Failure(f"--method {method!r} is not a registered method; registered: "
                      f"{sorted([x.tag for x in METHODS.values()] + ['dora'])}")
    fields = {f.name for f in dataclasses.fields(m.spec)}
    given = {k: v for k, v in given.items() if k in fields and (k != "use_dora" or v)}
    if not given.get("modules_to_save"):
        given.pop("modules_to_save", None)
    try:
        return m.spec(**given)
    except (TypeError, ValueError) as e:
        raise Failure(f"--method {method}: {e}") from e


@main.command(context_settings=CONTEXT)
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Base model: a Hugging Face directory.")
@click.option("--adapter", required=True, type=click.Path(path_type=Path),
              help="Adapter directory (adapter_config.json + adapter_model.safetensors, from peftc or PEFT).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory (must be new or empty).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Cast the merged weights (default: the base model's dtype).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (only once the new one is complete).")
@click.option("--requantize", is_flag=True,
              help="A quantized (bitsandbytes) base: write the merged layers quantized again in their own format "
                   "(default: full precision, exact).")
@verbose_option
def merge(base: Path, adapter: Path, out: Path, dtype: str | None, max_shard_size: str, overwrite: bool,
          requantize: bool) -> None:
    """Fold an adapter into its base model and write a Hugging Face directory.

    Loads BASE with the model class the adapter was made for (its task_type; else config.json's architectures;
    else AutoModel), loads the adapter, and streams the merged weights (W + alpha/r B A) layer by layer into
    safetensors shards under the model's own key names, with config.json and the base's tokenizer files. The
    result loads with plain transformers (AutoModelFor...from_pretrained(OUT)). A base saved quantized by
    bitsandbytes is written in full precision (exact), or with --requantize in its own quantized format. OUT is
    written in full to a temporary directory first: nothing existing is touched if anything fails.

    \b
    Examples:
      peftc merge --base base-model --adapter my-adapter --out merged
      peftc merge --base base-model --adapter my-adapter --out merged --dtype bf16 --overwrite
    """
    import peftc

    for path, option in ((base, "--base"), (adapter, "--adapter")):
        if out.resolve() == path.resolve():
            raise Failure(f"--out {out} is the {option} directory; the merged model needs a directory of its own")
    _check_out_dir(out, overwrite)
    model = load_model(base, **_check_base_and_adapter(base, adapter))
    click.echo(f"loaded {type(model).__name__} from {base}")
    pm = peftc.load_adapter(model, adapter)
    ad = pm.store[pm.active_adapter]
    click.echo(f"loaded adapter {adapter} ({ad.method.name}: {len(ad.targets)} sites)")
    peftc.export_merged(pm, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                        requantize=requantize)
    copied = _copy_tokenizer(base, out)
    click.echo(f"wrote {out} ({_dir_size(out) / 2**20:.1f} MiB{', with the tokenizer' if copied else ''}); "
               f"load it with transformers.{type(model).__name__}.from_pretrained({str(out)!r})")


@main.command(context_settings=CONTEXT)
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Base model: a Hugging Face directory.")
@click.option("--adapter", required=True, type=click.Path(path_type=Path),
              help="Adapter directory (adapter_config.json + adapter_model.safetensors, from peftc or PEFT).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The .pt2 file to write.")
@click.option("--unmerged", is_flag=True, help="Export the graph with the adapter as separate ops (not folded).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@verbose_option
def export(base: Path, adapter: Path, out: Path, unmerged: bool, overwrite: bool) -> None:
    """Export base model + adapter as a torch.export program (.pt2) with dynamic batch and sequence.

    By default the adapter is folded into the weights first (the program has the base model's ops only); with
    --unmerged the LoRA ops stay in the graph. Load it with torch.export.load(OUT).module() and call it with the
    model's inputs as keywords (e.g. input_ids=..., attention_mask=...).

    \b
    Examples:
      peftc export --base base-model --adapter my-adapter --out model.pt2
      peftc export --base base-model --adapter my-adapter --out model-unmerged.pt2 --unmerged
    """
    from tqdm.auto import tqdm

    import peftc

    _check_out_file(out, overwrite)
    how = _check_base_and_adapter(base, adapter)
    with tqdm(total=3, desc="loading base model", unit="step", bar_format="{desc} {n}/{total} steps [{elapsed}]") \
            as bar:
        model = load_model(base, **how)
        bar.set_description_str("loading adapter")
        bar.update()
        pm = peftc.load_adapter(model, adapter)
        bar.set_description_str("exporting" + (" (unmerged)" if unmerged else " (merged)"))
        bar.update()
        pm.export(out, merged=not unmerged)
        bar.set_description_str("done")
        bar.update()
    click.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {'unmerged' if unmerged else 'merged'}); inputs: "
               f"{', '.join(pm.input_names)}")



# --- generate ------------------------------------------------------------------------------------------------------
# files of which a tokenizer directory holds at least one (AutoTokenizer reads the rest from them)
TOKENIZER_MAIN = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                  "spiece.model")
BASE_ROW = "__base__"     # an --adapter-name for the base model itself (peftc.store.BASE)
SAMPLING_OPTIONS = ("--temperature", "--top-k", "--top-p", "--seed")


def _streamer_class():
    from transformers import TextStreamer

    class EchoStreamer(TextStreamer):
        """transformers' TextStreamer, writing through click (so the text goes where click's stdout is)."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            click.echo(text, nl=stream_end)

    return EchoStreamer


def _parse_adapters(values: tuple[str, ...]) -> list[tuple[str, Path]]:
    """--adapter values, `DIR` or `NAME=DIR`, as (name, directory): the first is "default" unless named, the others
    their directory's name; names are unique."""
    out: list[tuple[str, Path]] = []
    for i, value in enumerate(values):
        name, sep, rest = value.partition("=")
        if sep and rest and not Path(value).exists():
            path = Path(rest)
        else:
            name, path = ("default" if i == 0 else Path(value).name), Path(value)
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_\-]*", name) or name == BASE_ROW:
            raise Failure(f"--adapter {value}: {name!r} is not an adapter name (letters, digits, '_' or '-', not "
                          f"{BASE_ROW!r}); name it as NAME=DIR")
        if name in [n for n, _ in out]:
            raise Failure(f"--adapter {value}: an adapter named {name!r} is given already; name each one as NAME=DIR")
        out.append((name, path))
    return out


def _check_adapter(name: str, path: Path) -> None:
    """An adapter directory that exists and was made for a causal LM (or for no task in particular)."""
    from .checkpoint import load_spec

    if not path.exists():
        raise Failure(f"--adapter {path} does not exist")
    task = load_spec(path).task_type
    if task not in (None, "CAUSAL_LM"):
        raise Failure(f"--adapter {path} was made for task_type {task}; generate needs a CAUSAL_LM adapter "
                      "(or one with no task_type)")


def _row_adapters(given: tuple[str, ...], loaded: list[str], prompts: int) -> list[str]:
    """The adapter of each prompt: --adapter-name once (every prompt) or once per prompt; default the first adapter
    (the base model when none is loaded)."""
    names = list(given) or [loaded[0] if loaded else BASE_ROW]
    if len(names) == 1:
        names *= prompts
    elif len(names) != prompts:
        raise Failure(f"--adapter-name is given {len(names)} times for {prompts} --prompt; give it once (every "
                      "prompt) or once per prompt, in order")
    unknown = sorted({n for n in names if n != BASE_ROW and n not in loaded})
    if unknown:
        raise Failure(f"--adapter-name {unknown[0]!r} is no loaded adapter; loaded: {loaded} (and {BASE_ROW!r} for the "
                      "base model; name adapters as --adapter NAME=DIR)")
    return names


def load_tokenizer(path: Path, option: str):
    """The tokenizer saved in the directory `path` (AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise Failure(f"{option} {path} " + ("does not exist" if not path.exists() else "is a file; pass a directory"))
    if not any((path / n).is_file() for n in TOKENIZER_MAIN):
        raise Failure(f"{option} {path} has no tokenizer (none of {', '.join(TOKENIZER_MAIN)}); save one there with "
                      f"tokenizer.save_pretrained({str(path)!r}), or pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise Failure(f"{option} {path}: cannot load its tokenizer: {_one_line(e)}") from e


def _left_padded(rows: list[list[int]], pad: int):
    """input_ids and attention_mask [B, P] of token lists of any lengths, padded on the left (as generate expects)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def completion_text(tokenizer, new_tokens, eos: Any) -> str:
    """The text of one row's new tokens, as the stream writes it: up to and with its first EOS (generate pads the
    rest), special tokens left out."""
    tokens = new_tokens.tolist()
    ends = {eos} if isinstance(eos, int) else set(eos or ())
    for i, t in enumerate(tokens):
        if t in ends:
            tokens = tokens[:i + 1]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True)


@main.command(context_settings=CONTEXT)
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="Base model: a Hugging Face causal-LM directory, with its tokenizer.")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]DIR",
              help="Adapter directory (PEFT format, from peftc or PEFT); repeat for several, named NAME=DIR (default: "
                   "'default' for the first, the directory's name for others). None: the base model alone.")
@click.option("--prompt", "prompts", required=True, multiple=True,
              help="The text to continue; repeat for a batch (then one JSON string per prompt, no streaming).")
@click.option("--adapter-name", "adapter_names", multiple=True, metavar="NAME",
              help="The adapter a prompt runs with ('__base__': none): once for every prompt, or once per prompt in "
                   "order. Default: the first --adapter.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Directory of the tokenizer (default: --base).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--do-sample/--greedy", "do_sample", default=None,
              help="Sample, or take the most likely token (default: the model's generation config; greedy unless it "
                   "says otherwise).")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=None, help="Sampling only.")
@click.option("--top-k", type=click.IntRange(0), default=None, help="Sampling only (0: off).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Sampling only.")
@click.option("--seed", type=int, default=None,
              help="Sampling only: the draws' seed (as torch.manual_seed(SEED) before transformers' generate; "
                   "default: a fresh random one).")
@verbose_option
def generate(base: Path, adapters: tuple[str, ...], prompts: tuple[str, ...], adapter_names: tuple[str, ...],
             tokenizer: Path | None, max_new_tokens: int, do_sample: bool | None, temperature: float | None,
             top_k: int | None, top_p: float | None, seed: int | None) -> None:
    """Continue a prompt with a causal LM and its adapters, streaming the new text to stdout as it is generated.

    Loads BASE (the class config.json names) and its tokenizer, compiles it with the adapters (peftc.load_adapter)
    and generates with pm.generate: prefill and decode graphs over a static KV cache, greedy (token for token what
    PEFT's and transformers' generate give) or sampled. Only the new text is written, ended by a newline; generation
    stops at the model's EOS token or after --max-new-tokens. Without --adapter it generates from the base model
    alone (peftc's graphs, no adapter in them).

    Several --prompt run as one left-padded batch and write no stream: one line per prompt, in order, each a JSON
    string (so a newline inside a completion never splits it). Each prompt may take its own adapter (--adapter-name
    once per prompt; '__base__' for the base model): one batch, every adapter at once.

    \b
    Examples:
      peftc generate --base BASE_DIR --adapter ADAPTER_DIR --prompt "Once upon a time"
      peftc generate --base BASE_DIR --prompt "Once upon a time" --max-new-tokens 20
      peftc generate --base BASE_DIR --adapter ADAPTER_DIR --prompt "Hi" --do-sample --top-p 0.9 --seed 0
      peftc generate --base BASE_DIR --adapter fr=FR_DIR --adapter de=DE_DIR \\
          --prompt "Hello" --adapter-name fr --prompt "Hello" --adapter-name de
    """
    import torch

    import peftc
    from .decoder import causal_lm_refusal, max_positions

    named = _parse_adapters(adapters)
    _check_model_dir(base, "--base")
    for name, path in named:
        _check_adapter(name, path)
    rows_adapters = _row_adapters(adapter_names, [n for n, _ in named], len(prompts))
    tok = load_tokenizer(tokenizer if tokenizer is not None else base, "--tokenizer" if tokenizer else "--base")
    model = load_model(base, option="--base")
    why = causal_lm_refusal(model)
    if why is not None:
        raise Failure(f"--base {base}: cannot generate: {why}")

    sampling = do_sample if do_sample is not None else bool(getattr(model.generation_config, "do_sample", False))
    given = [o for o, v in zip(SAMPLING_OPTIONS, (temperature, top_k, top_p, seed)) if v is not None]
    if given and not sampling:
        raise Failure(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} when sampling; add --do-sample")
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    for key, value in (("do_sample", do_sample), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if value is not None:
            options[key] = value

    rows = [tok(p)["input_ids"] for p in prompts]
    for p, r in zip(prompts, rows):
        if not r:
            raise Failure(f"--prompt {p!r} gives no tokens; generate needs at least one")
    width, limit = max(len(r) for r in rows), max_positions(model.config)
    if limit is not None and width + max_new_tokens > limit:
        fix = f"pass --max-new-tokens {limit - width} or less" if width < limit else "shorten the prompt"
        raise Failure(f"the prompt{'s' if len(rows) > 1 else ''} ({width} tokens) plus --max-new-tokens "
                      f"{max_new_tokens} is {width + max_new_tokens} positions, past the model's limit of {limit} "
                      f"(max_position_embeddings); {fix}")
    pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)   # masked out: any token
    ids, mask = _left_padded(rows, pad)

    if named:
        pm = peftc.load_adapter(model, named[0][1], adapter_name=named[0][0])
        for name, path in named[1:]:
            pm.load_adapter(path, name)
    else:   # peftc compiles with an adapter: a zero LoRA (B = 0) that no row uses; "__base__" runs the model's graph
        pm = peftc.compile(model, peftc.LoRA(r=1, targets="all-linear"))
    device = next(model.parameters()).device
    generator = None
    if sampling:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()            # a fresh random seed, as an unseeded run of transformers' generate
        else:
            generator.manual_seed(seed)
    ids, mask = ids.to(device), mask.to(device)
    log.info("generating %d new tokens at most for %d prompt(s) of up to %d tokens; adapters per row: %s",
             max_new_tokens, len(rows), width, rows_adapters)
    if len(rows) == 1:
        streamer = _streamer_class()(tok, skip_prompt=True, skip_special_tokens=True)
        pm.generate(ids, mask, streamer=streamer, generator=generator, adapter_names=rows_adapters, **options)
        return
    out = pm.generate(ids, mask, generator=generator, adapter_names=rows_adapters, **options)
    eos = pm.generation_config.eos_token_id if pm.generation_config is not None else None
    for row in out[:, width:]:
        click.echo(json.dumps(completion_text(tok, row, eos), ensure_ascii=False))

if __name__ == "__main__":
    sys.exit(main())
