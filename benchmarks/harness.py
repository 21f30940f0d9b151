"""The harness every benchmark here runs on: flags, setup, contestants, checks before timing, interleaved timing and
the printed report. The rules below are enforced here, not in each script.

  no KV cache for anyone   peftc's graph is traced without one, so every HF model contestant (anything with a
                           `config.use_cache`: a transformers model, a PEFT PeftModel, a PeftModule, a compiled one)
                           is called with use_cache=False (`Contestant.__call__`); before timing, each contestant runs
                           once and one whose output carries a cache is refused (`refuse_cache`).
  own weights for all      the base contestant, peftc and PEFT each get their own deepcopy of the base model
                           (`own_copy`; peftc.compile shares the model it is given, get_peft_model changes its model),
                           and no two distinct contestant models may share a parameter storage (`check_storage`).
                           The same module in two modes ("peftc" and "peftc off", eager and compiled) is one model.
  same dtype, threads and  `setup` sets the threads once, before anything is built or compiled, with the seeds and
  inputs                   the default dtype; `check_dtype` refuses contestants whose parameters differ in dtype; the
                           inputs are built once and every contestant gets the same tensors.
  outputs checked first    `check` runs all of the above and `check_outputs`: named pairs that must agree (within a
                           tolerance, NaN-safe) and pairs that must differ (the adapter changes the output); on a
                           failure it stops before timing, naming the contestants and the measured difference.
                           `time_contestants` refuses contestants that `check` has not passed.

Timing: every round runs each contestant once, in an order rotated each round, after a warm-up; `report` prints
ratios of medians, of minimums and the median per-round ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, ContextManager

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

DTYPE = torch.float32
# the reference config: a Llama-shaped model, LoRA r=16, alpha=32 on all seven projections, batch 4 x 128 tokens
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 16, 32
BATCH, SEQ = 4, 128
FIRST_BLOCK = "model.layers.0"
CACHE_KEYS = ("past_key_values", "cache", "cache_params")


# --- flags and setup --------------------------------------------------------------------------------------------------
def bench_parser(doc: str, rounds: int = 30, modes: tuple[str, ...] = (), default_modes: str = "",
                 note: str = "") -> argparse.ArgumentParser:
    """The flags every benchmark takes; with `modes`, also --modes (a comma-separated subset of them)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as torch starts)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings are synchronized)")
    ap.add_argument("--seed", type=int, default=0)
    if modes:
        ap.add_argument("--modes", default=default_modes or ",".join(modes),
                        help=f"comma-separated, of {', '.join(modes)}{note}")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None, modes: tuple[str, ...] = ()):
    """args, with args.modes a list checked against `modes` (when the parser has --modes)."""
    args = ap.parse_args(argv)
    if modes:
        args.modes = args.modes.split(",")
        unknown = sorted(set(args.modes) - set(modes))
        if unknown:
            ap.error(f"unknown mode(s) {unknown}; choose from {', '.join(modes)}")
    return args


_THREADS: list[int] = []


def setup(args) -> None:
    """Logging, warnings, threads (once, before anything is built or compiled: inductor's CPU kernels fix their
    thread count when compiled), seeds and the default dtype."""
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)   # transformers deprecations raised inside PEFT
    if args.threads:
        if _THREADS and _THREADS[-1] != args.threads:
            raise SystemExit(f"threads already set to {_THREADS[-1]} in this process; got --threads {args.threads}")
        torch.set_num_threads(args.threads)
        _THREADS.append(args.threads)
    torch.set_default_dtype(DTYPE)
    torch.manual_seed(args.seed)


def header(args, batch: int = BATCH, seq: int = SEQ, extra: str = "") -> str:
    return (f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {batch}x{seq}, "
            f"{str(DTYPE).removeprefix('torch.')}, {args.rounds} rounds (+{args.warmup} warm-up){extra}")


# --- building ---------------------------------------------------------------------------------------------------------
def build_base(seed: int = 0, hidden: int = 512, layers: int = 4, heads: int = 8, intermediate: int = 1376,
               vocab: int = 1024):
    """The reference LlamaForCausalLM (random weights, eval mode). Contestants take `own_copy`s of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=intermediate, vocab_size=vocab,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def own_copy(model: nn.Module, frozen: bool = False) -> nn.Module:
    """A deepcopy of `model` (with every parameter frozen if `frozen`): one contestant's own weights."""
    m = copy.deepcopy(model)
    if frozen:
        m.requires_grad_(False)
    return m


def randomize_b_(pm, seed: int = 1, adapter: str | None = None) -> None:
    """Fill B of every site of `pm`'s adapter (default: the active one) with N(0, 0.02^2) (B = 0 is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in pm.store[adapter or pm.active_adapter].sites.values():
            w.B.copy_((torch.randn(w.B.shape, generator=g) * 0.02).to(w.B.device))


def copy_lora_to_peft_(pm, peft_model, adapter: str = "default", ours: str | None = None) -> None:
    """Copy A and B of every site of `pm`'s adapter `ours` into `peft_model`'s adapter `adapter`, by module path."""
    sites = pm.store[ours or pm.active_adapter]
    with torch.no_grad():
        for path in sites.targets:
            w = sites.sites[path.replace(".", "-")]
            layer = peft_model.base_model.model.get_submodule(path)
            layer.lora_A[adapter].weight.copy_(w.A)
            layer.lora_B[adapter].weight.copy_(w.B)


def build_lora_pair(base, targets=PROJ, r: int = R, alpha: int = ALPHA, seed: int = 1, **peftc_kw):
    """(peftc PeftModule, PEFT PeftModel), each on its own copy of `base`, with the same A and random non-zero B."""
    import peftc
    from peft import LoraConfig, get_peft_model

    ours = peftc.compile(own_copy(base), peftc.LoRA(r=r, alpha=alpha, targets=list(targets)), **peftc_kw).eval()
    theirs = get_peft_model(own_copy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets))).eval()
    randomize_b_(ours, seed)
    copy_lora_to_peft_(ours, theirs)
    return ours, theirs


def example_inputs(vocab: int, batch: int = BATCH, seq: int = SEQ, device="cpu", labels: bool = False) -> dict:
    """The inputs every contestant gets: (batch, seq) token ids, the same in every run (and labels = the ids)."""
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(2)).to(device)   # (B, T)
    return {"input_ids": ids, "labels": ids} if labels else {"input_ids": ids}


# --- contestants ------------------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The module that owns the weights: through torch.compile's OptimizedModule and peftc's CompiledPeftModule."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "peft", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def is_hf(model: nn.Module) -> bool:
    """Whether `model` takes use_cache: a transformers model, a PEFT model, a PeftModule or anything with a
    `config.use_cache`, compiled or not."""
    return hasattr(getattr(unwrap(model), "config", None), "use_cache")


@dataclasses.dataclass
class Contestant:
    """One thing timed: `model` (what owns the weights), how to call it (`call(model, **inputs)`, default
    `model(**inputs)`; `kwargs` are added) and the contexts entered around every call (e.g. `pm.disable_adapters`,
    a `GradEntry`). The harness, not the script, adds use_cache=False for an HF model."""
    name: str
    model: nn.Module
    call: Callable[..., Any] | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)
    contexts: tuple[Callable[[], ContextManager], ...] = ()
    checked: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self):
        if "use_cache" in self.kwargs:
            raise ValueError(f"contestant {self.name!r}: use_cache is the harness's to set (always False), "
                             f"got use_cache={self.kwargs['use_cache']}")

    def __call__(self, inputs: dict):
        kw = dict(inputs, **self.kwargs)
        if is_hf(self.model):
            kw["use_cache"] = False
        with contextlib.ExitStack() as stack:
            for ctx in self.contexts:
                stack.enter_context(ctx())
            return self.call(self.model, **kw) if self.call else self.model(**kw)

    def variant(self, name: str, *contexts: Callable[[], ContextManager], **kwargs) -> "Contestant":
        """The same model under more contexts or kwargs (e.g. "peftc off": the same PeftModule, adapters disabled)."""
        return dataclasses.replace(self, name=name, contexts=self.contexts + contexts,
                                   kwargs=dict(self.kwargs, **kwargs), checked=False)


def first_block(model: nn.Module, path: str = FIRST_BLOCK) -> nn.Module:
    """The module at `path` in the model's own tree: a peftc.Block in a PeftModule (called as a module at the
    model's path), the HF decoder layer in a transformers or PEFT model."""
    model = unwrap(model)
    if hasattr(model, "blocks") and hasattr(model, "graph_module"):          # peftc PeftModule
        return model.blocks()[path]
    if hasattr(model, "get_base_model"):                                     # PEFT PeftModel
        model = model.get_base_model()
    return model.get_submodule(path)


class GradEntry:
    """A context (for Contestant.contexts) in which the hidden state entering the first decoder block is a leaf that
    requires grad (`x.detach().requires_grad_()`, by a forward pre-hook on the block), so that a training step
    backpropagates through every block even when no parameter requires grad (adapters disabled, the bare model).
    `check` verifies that the leaf got a gradient, or refuses the contestant."""

    def __init__(self, model: nn.Module, hidden_size: int, path: str = FIRST_BLOCK):
        self.block, self.hidden_size, self.path = first_block(model, path), hidden_size, path
        self.leaf: torch.Tensor | None = None

    @contextlib.contextmanager
    def __call__(self):
        handle = self.block.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _is_hidden(self, x) -> bool:
        return (isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter) and x.is_floating_point()
                and x.dim() == 3 and x.shape[-1] == self.hidden_size)

    def _hook(self, mod, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        self.leaf = None
        args = list(args)
        for i, x in enumerate(args):            # a peftc.Block gets the hidden state first, then adapter weights
            if self._is_hidden(x):
                args[i] = self.leaf = x.detach().requires_grad_()
                break
        else:
            if self._is_hidden(kwargs.get("hidden_states")):
                kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"].detach().requires_grad_())
                self.leaf = kwargs["hidden_states"]
        return tuple(args), kwargs

    def verify(self, name: str) -> None:
        if self.leaf is None:
            raise SystemExit(f"contestant {name!r}: the pre-hook on {self.path} found no hidden state "
                             f"(a floating (B, T, {self.hidden_size}) tensor); not timing")
        g = self.leaf.grad
        if g is None or not bool(torch.isfinite(g).all()) or not g.abs().sum() > 0:
            raise SystemExit(f"contestant {name!r}: the hidden state entering {self.path} got no gradient "
                             f"(grad {'None' if g is None else 'zero or not finite'}); backward did not "
                             "run through the blocks; not timing")


def grad_entries(c: Contestant) -> list[GradEntry]:
    return [x for x in c.contexts if isinstance(x, GradEntry)]


# --- checks before timing ---------------------------------------------------------------------------------------------
def refuse_cache(name: str, out) -> None:
    """SystemExit if `out` (a model's output) carries a KV cache: a non-None past_key_values / cache entry, or any
    transformers Cache object."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:                                     # pragma: no cover
        Cache = ()
    items = list(out.items()) if isinstance(out, Mapping) else list(enumerate(out)) if isinstance(out, tuple) else []
    for key, v in items:
        if (key in CACHE_KEYS and v is not None) or isinstance(v, Cache):
            raise SystemExit(f"contestant {name!r} built a KV cache ({key}: {type(v).__name__}); the other "
                             "contestants build none (peftc's graph is traced without one); not timing")
    if isinstance(out, Cache):
        raise SystemExit(f"contestant {name!r} returned a KV cache ({type(out).__name__}); not timing")


def check_storage(contestants: list[Contestant]) -> None:
    """SystemExit if two distinct contestant models share a parameter or buffer storage (each must own its copy)."""
    owners: dict[int, tuple[str, set[int]]] = {}
    for c in contestants:
        m = unwrap(c.model)
        if id(m) not in owners:
            ptrs = {t.untyped_storage().data_ptr() for t in (*m.parameters(), *m.buffers())}
            owners[id(m)] = (c.name, ptrs - {0})
    seen = list(owners.values())
    for i, (a, pa) in enumerate(seen):
        for b, pb in seen[i + 1:]:
            if pa & pb:
                raise SystemExit(f"contestants {a!r} and {b!r} share {len(pa & pb)} weight storages; each contestant "
                                 "model must own its weights (build it on harness.own_copy(base)); not timing")


def check_dtype(contestants: list[Contestant]) -> None:
    """SystemExit unless every floating parameter of every contestant has one dtype."""
    found: dict[torch.dtype, str] = {}
    for c in contestants:
        for p in unwrap(c.model).parameters():
            if p.is_floating_point():
                found.setdefault(p.dtype, c.name)
    if len(found) > 1:
        raise SystemExit("contestants differ in dtype: " + ", ".join(f"{d} ({n})" for d, n in found.items()))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, NaN if either has a NaN (so that `not d <= tol` fails)."""
    return (a.float() - b.float()).abs().max().item()


def check_outputs(outputs: dict[str, torch.Tensor], agree=(), differ=()) -> dict[str, float]:
    """`agree`: (a, b, tol) pairs whose outputs must agree within tol; `differ`: (a, b, min) pairs that must differ
    by more than min. Prints every difference; SystemExit naming the failing pairs (NaN fails both checks)."""
    got, bad = {}, []
    for a, b, tol in agree:
        d = got[f"|{a} - {b}|"] = max_diff(outputs[a], outputs[b])
        if not d <= tol:
            bad.append(f"{a!r} and {b!r} disagree: max |diff| {d:.3e} (must be <= {tol:g})")
    for a, b, least in differ:
        d = got[f"|{a} - {b}|"] = max_diff(outputs[a], outputs[b])
        if not d > least:
            bad.append(f"{a!r} and {b!r} do not differ: max |diff| {d:.3e} (must be > {least:g}: the adapter must "
                       "change the output)")
    print("check: " + "; ".join(f"max {k} = {v:.2e}" for k, v in got.items()))
    if bad:
        raise SystemExit("outputs checked before timing: " + "; ".join(bad) + "; not timing")
    return got


def logits(out, detach: bool = True) -> torch.Tensor:
    x = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    return x.detach() if detach else x


def check(contestants: list[Contestant], inputs: dict, ctx: Callable[[], ContextManager] = torch.no_grad,
          agree=(), differ=(), train: bool = False) -> dict[str, torch.Tensor]:
    """Everything before timing: storage, dtype, one call each (refusing a KV cache; with `train`, one training
    step, checking every GradEntry got its gradient), then `check_outputs`. Marks the contestants checked and
    returns name -> logits."""
    check_storage(contestants)
    check_dtype(contestants)
    outputs = {}
    for c in contestants:
        if train:
            out = train_step(c, inputs, keep=True)
            for e in grad_entries(c):
                e.verify(c.name)
        else:
            with ctx():
                out = c(inputs)
        refuse_cache(c.name, out)
        outputs[c.name] = logits(out)
        c.checked = True
    if agree or differ:
        check_outputs(outputs, agree, differ)
    return outputs


# --- timing -----------------------------------------------------------------------------------------------------------
def train_step(c: Contestant, inputs: dict, keep: bool = False):
    """One training step of `c`: grads set to None, forward (with labels: the model's loss), backward. Returns the
    output when `keep`."""
    unwrap(c.model).zero_grad(set_to_none=True)
    out = c(inputs)
    loss = out.loss if getattr(out, "loss", None) is not None else logits(out, detach=False).float().mean()
    if not loss.requires_grad:
        raise SystemExit(f"contestant {c.name!r}: its loss requires no grad (nothing to train; add a GradEntry)")
    loss.backward()
    return out if keep else None


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int, device="cpu",
               ctx: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, list[float]]:
    """name -> per-round seconds of each zero-argument call: `warmup` rounds, then `rounds` rounds in an order
    rotated each round."""
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    with ctx():
        for _ in range(warmup):
            for n in names:
                calls[n]()
        for i in range(rounds):
            for n in names[i % len(names):] + names[:i % len(names)]:   # rotate the order each round
                _sync(device)
                t0 = time.perf_counter()
                calls[n]()
                _sync(device)
                times[n].append(time.perf_counter() - t0)
    return times


def time_contestants(contestants: list[Contestant], inputs: dict, rounds: int, warmup: int, device="cpu",
                     ctx: Callable[[], ContextManager] = contextlib.nullcontext, train: bool = False):
    """Interleaved timing of forward calls (or, with `train`, training steps) of contestants `check` has passed."""
    unchecked = [c.name for c in contestants if not c.checked]
    if unchecked:
        raise SystemExit(f"contestants {unchecked} were not checked (harness.check) before timing")
    if train:
        calls = {c.name: (lambda c=c: train_step(c, inputs)) for c in contestants}
    else:
        calls = {c.name: (lambda c=c: c(inputs)) for c in contestants}
    return time_calls(calls, rounds, warmup, device, ctx)


def saved_bytes(c: Contestant, inputs: dict) -> tuple[int, int]:
    """(bytes, count) of the distinct non-parameter storages autograd saves in one training forward of `c`."""
    m = unwrap(c.model)
    params = {t.untyped_storage().data_ptr() for t in (*m.parameters(), *m.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = c(inputs)
    del out
    return sum(seen.values()), len(seen)


def saved(run: list[Contestant], inputs: dict, pairs, title: str) -> dict:
    """a / b in bytes autograd saves in one training forward of each (saved_bytes), for each (a, b) pair; printed
    under `title`. Returns {"bytes": {name: bytes}, "ratios": {"a / b": ratio}}."""
    got = {c.name: saved_bytes(c, inputs) for c in run}
    print(f"\nactivations saved for backward, {title} (one training forward, distinct non-parameter storages)")
    width = max(28, max(map(len, got)) + 1)
    for k, (b, n) in got.items():
        print(f"  {k:{width}s} {b / 2**20:9.2f} MiB in {n} storages")
    ratios = {f"{a} / {b}": got[a][0] / got[b][0] for a, b in pairs}
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    return {"bytes": {k: v[0] for k, v in got.items()}, "ratios": ratios}


# --- the report -------------------------------------------------------------------------------------------------------
def report(times: dict[str, list[float]], pairs, head: str) -> dict:
    """Print each contestant's times (and medians over the base model's, or over the first contestant's where there
    is no base) and, per (a, b) pair, a/b as ratios of medians, of minimums and the median per-round ratio (on a
    busy machine the medians drift; the other two are steadier). Returns those ratios."""
    med = {n: statistics.median(t) for n, t in times.items()}
    ref = "base" if "base" in times else next(iter(times))
    width = max(map(len, times)) + 1
    print(f"\n{head}")
    print(f"{'':{width}s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'/ ' + ref:>8s}")
    for n, t in times.items():
        print(f"{n:{width}s} {1e3 * med[n]:10.2f} {1e3 * min(t):8.2f} {1e3 * max(t):8.2f} {med[n] / med[ref]:8.3f}")
    keys = [f"{a} / {b}" for a, b in pairs]
    ratios = {k: med[a] / med[b] for k, (a, b) in zip(keys, pairs)}
    mins = {k: min(times[a]) / min(times[b]) for k, (a, b) in zip(keys, pairs)}
    paired = {k: statistics.median(x / y for x, y in zip(times[a], times[b])) for k, (a, b) in zip(keys, pairs)}
    kw = max(map(len, keys)) + 1
    print(f"\n{'ratio':{kw}s} {'medians':>8s} {'minimums':>9s} {'per-round':>10s}")
    for k in keys:
        print(f"{k:{kw}s} {ratios[k]:8.3f} {mins[k]:9.3f} {paired[k]:10.3f}")
    return {"medians_s": med, "ratios": ratios, "min_ratios": mins, "paired_ratios": paired}
