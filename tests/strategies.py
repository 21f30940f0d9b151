"""Hypothesis strategies for the property tests: small models with every site kind, traced once per dtype, and
valid LoRA specs over them that draw every option (with the layers each one selects, by PEFT's rules).

    base(arch, dtype)   -> Base: the model, its traced graph and sites, the example inputs (traced once)
    specs(b, ...)       -> (LoRA spec, [adapted module paths, in graph order])
    call_inputs(b, ...) -> (args, kwargs) at a drawn batch and sequence length, from a drawn seed
    peft_config(spec, b)-> PEFT's LoraConfig for the same spec, built from the spec's fields (not peftc's JSON)

Site kinds: linear (attn, llama, bert), GPT-2 Conv1D (gpt2), embedding (every model), Conv1d / Conv2d with and
without groups (kinds), nn.MultiheadAttention batch-first and sequence-first (mha).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import event, reject
from hypothesis import strategies as st
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

import peftc
from peftc.store import site_key
from peftc.passes.match import find_sites
from peftc.trace import trace
from tests.models import inputs, main_output, make
from tests.parity import TOL

V, D, H = 24, 16, 2                                               # custom models: vocabulary, width, heads


class AttnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D, bias=False)

    def forward(self, x):                                         # (B, T, D)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, H, D // H).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(x)))


class Attn(nn.Module):
    """Linear sites with attention roles (q, k, v, o) in two blocks, after a token embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(AttnBlock() for _ in range(2))
        self.head = nn.Linear(D, 4)

    def forward(self, ids):                                       # (B, T) -> (B, T, 4)
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class Kinds(nn.Module):
    """An embedding with a padding index, Conv1d over the sequence (grouped in block 1), a strided Conv2d and a
    grouped Conv2d on an image, linear projections."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.emb = nn.Embedding(V, c, padding_idx=0)
        self.blocks = nn.ModuleList(nn.ModuleDict({"conv": nn.Conv1d(c, c, 3, padding=1, groups=1 + i),
                                                   "proj": nn.Linear(c, c)}) for i in range(2))
        self.img = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.img2 = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)
        self.head = nn.Linear(c, 5)

    def forward(self, ids, img):                                  # (B, T), (B, 3, 8, 8) -> (B, T, 5)
        h = self.emb(ids)                                         # (B, T, C)
        for b in self.blocks:
            h = h + b["proj"](F.gelu(b["conv"](h.transpose(1, 2)).transpose(1, 2)))
        h = h + self.img2(F.gelu(self.img(img))).mean((2, 3))[:, None, :]
        return self.head(h)


class Mha(nn.Module):
    """nn.MultiheadAttention in two blocks, batch-first in block 0 and sequence-first in block 1."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.MultiheadAttention(D, 4, batch_first=i == 0),
                                                   "ff": nn.Linear(D, D)}) for i in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, ids):                                       # (B, T) -> (B, T, 3)
        h = self.emb(ids)
        for i, b in enumerate(self.blocks):
            x = h if i == 0 else h.transpose(0, 1)                # block 1: (T, B, D)
            a, _ = b["attn"](x, x, x, need_weights=False)
            h = h + (a if i == 0 else a.transpose(0, 1))
            h = h + b["ff"](F.gelu(h))
        return self.head(h)


CUSTOM = {"attn": Attn, "kinds": Kinds, "mha": Mha}


@dataclass(frozen=True)
class Arch:
    blocks: str                                   # the layers_pattern name before the block index
    saveable: tuple[str, ...]                     # modules_to_save candidates
    peft_default: tuple[str, ...] | None = None   # PEFT's targets for targets=None (None: PEFT's own default)
    qv: bool = True                               # whether targets=None means the same modules to both


ARCHS = {
    "attn": Arch("blocks", ("head", "blocks.1.up"), peft_default=("q", "v")),
    "kinds": Arch("blocks", ("head", "img"), qv=False),
    "mha": Arch("blocks", ("head", "blocks.0.ff"), qv=False),
    "llama": Arch("layers", ("lm_head", "model.norm")),
    "gpt2": Arch("h", ("lm_head", "transformer.ln_f")),
    "bert": Arch("layer", ("classifier", "bert.pooler")),
}
FAST_ARCHS = ("attn", "kinds", "mha", "llama", "gpt2")
ALL_ARCHS = tuple(ARCHS)
FAST_DTYPES = (torch.float32, torch.float64)
ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# outputs and gradients within TOLS[dtype] x max(1, max |reference|); a random adapter moves them by MOVED[dtype] x
# that. bfloat16's tolerance is a few percent of the output: ten times it would take an adapter that swamps the model
# (and bfloat16's own error grows with it), twice it still fails a comparison that ignores the adapter
TOLS = {torch.float32: TOL[peftc.LoRA], torch.float64: 1e-10, torch.bfloat16: 3e-2}
MOVED = {torch.float32: 10, torch.float64: 10, torch.bfloat16: 2}
BIASES = ("none", "all", "lora_only")
ALPHAS = (1, 8, 16.0, 0.5, -4, 12.5)


def no_dropout_(model: nn.Module) -> nn.Module:
    """Every dropout of the model at p=0 (modules, and the attention probabilities' rate kept as a float attribute),
    so that training-mode outputs and gradients are deterministic."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout_prob", "attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


@dataclass
class Base:
    arch: str
    dtype: torch.dtype
    model: nn.Module = field(repr=False)
    traced: object = field(repr=False)
    sites: dict = field(repr=False)
    example: tuple | None = field(repr=False)      # example_inputs for compile (None: a Hugging Face model)
    mha: set = field(default_factory=set, repr=False)   # paths of nn.MultiheadAttention sites

    @property
    def hf(self) -> bool:
        return self.example is None

    def call(self, m, x):
        args, kw = x
        return main_output(m(**kw)) if self.hf else m(*args)

    def fresh_model(self) -> nn.Module:
        return copy.deepcopy(self.model)


@functools.lru_cache(maxsize=None)
def base(arch: str, dtype: torch.dtype = torch.float32) -> Base:
    """The model of `arch` in `dtype` (no dropout, eval mode), traced once."""
    if arch in CUSTOM:
        torch.manual_seed(0)
        model = CUSTOM[arch]().to(dtype).eval()
        args, _ = _custom_inputs(arch, dtype, 2, 5, seed=0)
        example = args
    else:
        model, example = make(arch).to(dtype), None
    no_dropout_(model)
    traced = trace(model, example)
    sites = find_sites(traced.gm)
    mha = {f for f, s in sites.items() if s.module_type == "MultiheadAttention"}
    return Base(arch, dtype, model, traced, sites, example, mha)


def _custom_inputs(arch: str, dtype, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch, seq), generator=g)
    if arch == "kinds":
        ids[0, 0] = 0                                             # the padding index
        return (ids, torch.randn(batch, 3, 8, 8, generator=g).to(dtype)), {}
    return (ids,), {}


@st.composite
def call_inputs(draw, b: Base, seed: int):
    """(args, kwargs) at a drawn shape (batch 1-4, sequence 2-10; decoders: a left-padded row)."""
    batch, seq = draw(st.integers(1, 4), label="batch"), draw(st.integers(2, 10), label="seq")
    if not b.hf:
        return _custom_inputs(b.arch, b.dtype, batch, seq, seed)
    kw = inputs(b.arch, batch=batch, seq=seq, seed=seed, pad_row=draw(st.booleans(), label="pad_row"))
    return (), {k: v.to(b.dtype) if v.is_floating_point() else v for k, v in kw.items()}


def fresh(traced):
    """A copy of the traced graph, as a new trace would give: own nodes and modules, the model's weights."""
    memo = {id(t): t for t in (*traced.gm.parameters(), *traced.gm.buffers())}
    return dataclasses.replace(traced, gm=copy.deepcopy(traced.gm, memo))


@contextmanager
def as_traced():
    """Eager modules run as the traced graph does: nn.MultiheadAttention off its fused inference kernel, which rounds
    differently from the ops it stands for (the graph's, and peftc's adapted ones)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def traced_once(b: Base):
    with mock.patch("peftc.pipeline.trace", lambda model, example_inputs=None: fresh(b.traced)):
        yield


def compile_(b: Base, spec, seed: int = 0):
    torch.manual_seed(seed)                                       # A's init (and orthogonal's draws)
    with traced_once(b):
        return peftc.compile(b.model, spec, example_inputs=b.example)


def load_(b: Base, directory):
    with traced_once(b):
        return peftc.load_adapter(b.model, directory, example_inputs=b.example)


# --- which modules a spec adapts, by PEFT's rules ------------------------------------------------------------------

def _tail(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _layer_index(path: str, pattern) -> int | None:
    """PEFT's layer index: the first numbered component (after one of `pattern`, when given)."""
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        m = next((m for p in pattern if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return int(m["idx"]) if m else None


def _with_out_proj(b: Base, chosen) -> list[str]:
    """PEFT adapts an nn.MultiheadAttention's out_proj with it: graph order, out_proj right after."""
    keep = set(chosen) | {f"{f}.out_proj" for f in chosen if f in b.mha}
    return [f for f in b.sites if f in keep]


def heads(b: Base) -> set[str]:
    """What "all-linear" leaves out: the output embeddings of a Hugging Face LM (a custom module keeps its head)."""
    out = b.model.get_output_embeddings() if b.hf else None
    return {n for n, m in b.model.named_modules() if m is out} if out is not None else set()


def tied(b: Base) -> set[str]:
    """Paths of layers whose weight is also another layer's (a Hugging Face LM's tied output embeddings)."""
    if not b.hf or b.model.get_output_embeddings() is None:
        return set()
    w = b.model.get_input_embeddings().weight
    return {n for n, m in b.model.named_modules() if getattr(m, "weight", None) is w}


def _multiple(values: list[int]) -> int:
    return functools.reduce(math.lcm, values, 1)


@st.composite
def specs(draw, b: Base, *, inits=(True, False, "gaussian"), dropout: bool = True, mergeable: bool = False,
          peft: bool = False, residual: bool = False):
    """A valid LoRA spec for `b` and the module paths it adapts.

    `inits` are drawn from; `residual` adds "pissa", "olora", "orthogonal" where the chosen layers serve them.
    `mergeable`: no grouped convolution (merge() refuses one). `peft`: only what PEFT computes the same way: no
    "all-linear" with nn.MultiheadAttention (PEFT adapts its out_proj as a plain linear layer, peftc leaves it out), no
    PiSSA / OLoRA on a tied weight (PEFT writes the residual into the shared tensor, the input embedding with it;
    peftc keeps it at the adapted layer)."""
    sites = b.sites
    outs = {f"{m}.out_proj" for m in b.mha}
    pool = [f for f, s in sites.items() if f not in outs and not (mergeable and s.params.get("groups", 1) > 1)]
    forms = ["names", "paths", "regex", "regex_paths"]
    if ARCHS[b.arch].qv and not mergeable:
        forms.append("none")
    if not (peft and b.mha) and not mergeable:
        forms.append("all-linear")
    form = draw(st.sampled_from(forms), label="targets form")
    if form == "none":
        targets, chosen = None, [f for f, s in sites.items() if s.roles & {"q", "v"}]
    elif form == "all-linear":
        skip = heads(b) | b.mha | outs
        targets, chosen = "all-linear", [f for f, s in sites.items() if s.linear_like and f not in skip]
    else:
        by_path = form in ("paths", "regex_paths")
        names = sorted(set(pool) if by_path else {f.rsplit(".", 1)[-1] for f in pool})
        if mergeable:                                             # no name that also selects a grouped convolution
            names = [n for n in names if not any(_tail(f, n) for f in set(sites) - set(pool) - outs)]
        picked = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True), label="picked")
        if form.startswith("regex"):
            targets = rf"(.*\.)?({'|'.join(map(re.escape, picked))})" if not by_path else \
                "|".join(map(re.escape, picked))
        else:
            targets = picked
        chosen = [f for f in sites if f not in outs and any(_tail(f, p) for p in picked)]
        if not chosen:
            targets, chosen = [pool[0]], [pool[0]]

    # layers_to_transform (list targets only; an exact path is kept whatever its layer, as in PEFT)
    layers = pattern = None
    if isinstance(targets, list) and draw(st.booleans(), label="use layers"):
        pattern = draw(st.sampled_from([None, (ARCHS[b.arch].blocks,)]), label="layers_pattern")
        found = sorted({i for f in chosen if (i := _layer_index(f, pattern)) is not None})
        if found:
            picked = draw(st.lists(st.sampled_from(found), min_size=1, max_size=len(found), unique=True))
            layers = picked[0] if len(picked) == 1 and draw(st.booleans()) else picked
            want = {layers} if isinstance(layers, int) else set(layers)
            chosen = [f for f in chosen if f in targets or _layer_index(f, pattern) in want]
        else:
            pattern = None
    # exclude_modules: some of the chosen modules by path or name, or a regex; something stays
    exclude = None
    if len(chosen) > 1 and draw(st.booleans(), label="use exclude"):
        victims = draw(st.lists(st.sampled_from(chosen[1:]), min_size=1, max_size=2, unique=True))
        how = draw(st.sampled_from(["paths", "names", "regex"]), label="exclude form")
        if how == "regex":
            exclude = "|".join(map(re.escape, victims))
            left = [f for f in chosen if not re.fullmatch(exclude, f)]
        else:
            exclude = victims if how == "paths" else sorted({v.rsplit(".", 1)[-1] for v in victims})
            left = [f for f in chosen if not any(_tail(f, e) for e in exclude)]
        if left:
            chosen = left
        else:
            exclude = None
    chosen = _with_out_proj(b, chosen)

    # options some layer kinds cannot take
    kinds = {sites[f].kind for f in chosen}
    plain = all(sites[f].linear_like for f in chosen) and not (set(chosen) & b.mha)
    choices = list(inits)
    if residual and plain and not (peft and set(chosen) & tied(b)):
        choices += ["orthogonal"] + (["pissa"] if b.dtype != torch.float64 else [])
        if "conv1d" not in kinds and b.dtype != torch.float64:
            choices.append("olora")
    init = draw(st.sampled_from(choices), label="init")
    use_dora = draw(st.booleans(), label="use_dora") if not (set(chosen) & b.mha) else False
    # lora_bias: init True / False only, on no embedding and no nn.MultiheadAttention (refused: tests INVALID)
    lora_bias = draw(st.booleans(), label="lora_bias") if not use_dora and "embedding" not in kinds and \
        init in (True, False) and not set(chosen) & b.mha else False
    # PiSSA splits W by sqrt(S / scale): a negative alpha is refused (PEFT's A would be NaN), OLoRA takes any
    alphas = [a for a in ALPHAS if a > 0] if str(init).startswith("pissa") else ALPHAS

    # ranks: within every linear layer's sizes, a multiple of every chosen convolution's groups, even for orthogonal
    def ranks_for(paths):
        limit = min([min(sites[f].in_features, sites[f].out_features) for f in paths if sites[f].linear_like] + [8])
        step = _multiple([sites[f].params.get("groups", 1) for f in paths if sites[f].kind == "conv"]
                         + [2 if init == "orthogonal" else 1])
        return st.sampled_from([r for r in range(step, limit + 1, step)])

    r = draw(ranks_for(chosen), label="r")
    rank_pattern, alpha_pattern = {}, {}
    keyed = [f for f in chosen if f not in outs]                  # an out_proj takes its attention module's rank
    for option in ("rank_pattern", "alpha_pattern"):
        if not draw(st.booleans(), label=f"use {option}"):
            continue
        by_path = draw(st.booleans(), label=f"{option} keys are paths")
        keys = sorted(set(keyed)) if by_path else sorted({f.rsplit(".", 1)[-1] for f in keyed})
        if not by_path:                                           # a name also used by a non-keyed layer: skip
            keys = [k for k in keys if not any(_tail(f, k) for f in set(chosen) - set(keyed))]
        if not keys:
            continue
        for k in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=2, unique=True)):
            matched = [f for f in keyed if _tail(f, k)]
            if option == "rank_pattern":
                rank_pattern[re.escape(k)] = draw(ranks_for(matched + [o for o in outs if o[:-9] in matched]))
            else:
                alpha_pattern[re.escape(k)] = draw(st.sampled_from(alphas))
    saveable = [m for m in ARCHS[b.arch].saveable if not any(f == m or f.startswith(m + ".") or m.startswith(f + ".")
                                                             for f in chosen)]
    spec = peftc.LoRA(
        r=r, alpha=draw(st.sampled_from(alphas), label="alpha"),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.5]), label="dropout") if dropout else 0.0,
        targets=targets, use_rslora=draw(st.booleans(), label="use_rslora"),
        modules_to_save=tuple(draw(st.lists(st.sampled_from(saveable), unique=True, max_size=2), label="mts"))
        if saveable else (),
        init=init, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layers_to_transform=layers,
        layers_pattern=pattern, exclude_modules=exclude, use_dora=use_dora, lora_bias=lora_bias,
        bias=draw(st.sampled_from(BIASES), label="bias"),
    )
    return spec, chosen


# --- PEFT's side -----------------------------------------------------------------------------------------------------

def peft_config(spec: peftc.LoRA, b: Base) -> LoraConfig:
    """PEFT's LoraConfig with the spec's meaning, field by field."""
    targets = spec.targets
    if targets is None:
        targets = ARCHS[b.arch].peft_default
    as_list = lambda v: list(v) if isinstance(v, tuple) else v          # noqa: E731
    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=as_list(targets),
        use_rslora=spec.use_rslora, use_dora=spec.use_dora, lora_bias=spec.lora_bias, bias=spec.bias,
        init_lora_weights=spec.init, rank_pattern=dict(spec.rank_pattern), alpha_pattern=dict(spec.alpha_pattern),
        layers_to_transform=as_list(spec.layers_to_transform), layers_pattern=as_list(spec.layers_pattern),
        exclude_modules=as_list(spec.exclude_modules), modules_to_save=list(spec.modules_to_save) or None)


def peft_targets(model) -> list[str]:
    """Paths PEFT put a LoRA layer on, relative to the user's model (an attention module's out_proj by its own
    path, without PEFT's base_layer)."""
    return sorted(n.removeprefix("base_model.model.").replace(".base_layer.", ".")
                  for n, m in model.named_modules() if isinstance(m, LoraLayer))


@torch.no_grad()
def randomize_(pm, seed: int, std: float = 0.3, name: str = "default") -> None:
    """Trained-looking adapter: every tensor it saves moved off its init by N(0, std) noise (DoRA's magnitude scaled
    by 1 + noise, so it stays of the weight norms' size), from `seed`. A site's B (and B's bias) gets that noise
    divided by the site's |scale| where it is above 1, so s B A stays of the size of a trained update whatever
    alpha / r is drawn: an alpha of 16 at r = 1 would otherwise swamp the model (outputs of 1e4, where every
    comparison measures conditioning, not the adapter)."""
    ad = pm.store[name]
    damp = {id(t): max(1.0, abs(w.scale)) for w in (ad.sites[site_key(p)] for p in ad.targets)
            for n, t in w.named_parameters() if n.startswith("B")}
    g = torch.Generator().manual_seed(seed)
    for key, t in pm.store.peft_parameters(name):
        noise = torch.randn(t.shape, generator=g).to(t.dtype) * (std / damp.get(id(t), 1.0))
        t.mul_(1 + noise) if "lora_magnitude_vector" in key else t.add_(noise)


def scale_of(want: torch.Tensor) -> float:
    return max(1.0, want.detach().abs().max().float().item())


def assert_near(got: torch.Tensor, want: torch.Tensor, dtype, what: str, factor: float = 1.0) -> float:
    """got == want within TOLS[dtype] x max(1, max |want|) (NaN fails); returns that tolerance."""
    tol = factor * TOLS[dtype] * scale_of(want)
    torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=lambda m: f"{what}: {m}")
    return tol


def assert_moved(got: torch.Tensor, base_out: torch.Tensor, tol: float, dtype, what: str) -> None:
    """An example counts only if its adapter moved the output by more than MOVED[dtype] x tol, so that the comparison
    just made would have failed without the adapter. One that moves it less (a key projection of a tiny model seen
    through a softmax, bfloat16's few-percent tolerance) cannot tell, and is rejected: hypothesis draws another, and
    fails the test as Unsatisfiable where none moves (a no-op adapter). NaN fails."""
    diff = (got.float() - base_out.float()).abs().max().item()
    assert math.isfinite(diff), f"{what}: the output is not finite"
    if not diff > MOVED[dtype] * tol:
        event(f"{what}: rejected, the adapter moved the output by less than MOVED x tol ({dtype})")
        reject()
