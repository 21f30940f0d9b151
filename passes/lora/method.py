"""LoRA's method (peftc.methods.Method): the rewrite that wires its adapters into a form's graph (plain, gathered,
branches, expert weights), its weights at a site, the fold rule merge() uses, PEFT's checkpoint keys, parameter
counts, its refusals, and the register_method call that makes it a built-in method."""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule

from peftc.errors import MergeError, SpecError
from peftc.methods import Method, register_method, work_dtype
from peftc.param_targets import expand_all_linear
from peftc.store import Adapter, AdapterStore, Capacity, site_key
from peftc.targets import MHA, check_rank

from ..match import Site
from ..route import route_input
from .branches import insert_branches
from .gathered import insert_gathered
from .params import (build_expert_lora, check_parameter_targets, expert_delta, expert_param_count, insert_param_lora,
                     param_targets_refusal)
from .plain import insert_plain
from .spec import LoRA, lora_from_config, lora_to_config
from .values import all_weights, lora_adapter, lora_value, residual_value
from .variants import DORA, LORA_BIAS, VARIANTS, variants_at, variants_on
from .weights import LoraWeights, shape_of

FORMS = ("single", "mixed")


def insert_lora(gm: GraphModule, sites: dict[str, Site], store: AdapterStore, form: str = "single",
                paths: list[str] | None = None) -> int:
    """Wire the store's LoRA adapters into the graph at `paths` (the sites they adapt, in graph order) in `form`
    ("single" or "mixed"); the store already holds their weights. Returns the number of rewritten site calls."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if paths is None:
        routed = set(store.reserved_sites).union(*(store[a].targets for a in store.names() if lora_adapter(store, a)))
        paths = [p for p in sites if p in routed]
    if not paths:
        return 0
    by_name = {n.name: n for n in gm.graph.nodes}
    calls = [(sites[p], by_name[n.name]) for p in paths for n in sites[p].nodes]   # this copy's site calls
    matmuls = [c for c in calls if c[0].linear_like]
    others = [c for c in calls if not c[0].linear_like and not c[0].param]   # embeddings, convolutions: LoraBranch
    params = [c for c in calls if c[0].param]    # stacked expert weights: passes.lora.params (plain form only; an
    if form == "single":                         # adapter with parameter targets never joins a mixed batch)
        return insert_plain(gm, matmuls, store) + insert_branches(gm, others, store, None) + \
            insert_param_lora(gm, params, store, lambda p: max(w.A.shape[0] for w in all_weights(store, p)))
    rows = route_input(gm, ("rows",), torch.zeros(2, dtype=torch.long))              # (batch,) slot per row
    return (insert_gathered(gm, matmuls, store, rows) if matmuls else 0) + insert_branches(gm, others, store, rows)


def lora_delta(adapter: Adapter, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """LoRA's fold rule for merge(), in the layout of the site's weight (linear [out, in], Conv1D [in, out],
    embedding [num, dim], convolution [out, in, *kernel]), in work_dtype (float32; float64 for float64 weights):
    s B A; with variants (passes.lora.variants) W' - W, where W' = V + s B A, V the weight the adapter runs on
    (Variant.base: W, or its PiSSA / OLoRA residual, which the delta then replaces W by), then each variant's fold
    (DoRA: g (V + s B A), g = m / ||V + s B A|| per output channel, 1 where the norm is 0 as in the unmerged graph)."""
    if site.param:                         # a stacked expert weight: passes.lora.params
        return expert_delta(adapter, site, weight)
    w = adapter.sites[site_key(site.fqn)]
    dt = work_dtype(weight.dtype, w.A_r.dtype)
    A, B = w.A_r.detach().to(dt), w.B_r.detach().to(dt)
    if site.kind == "conv" and w.groups > 1:
        raise MergeError(f"{site.fqn} is a convolution with groups={w.groups}: its LoRA update (a dense A conv) is "
                         "not a grouped weight, so it cannot be merged (PEFT refuses it too); use the unmerged module")
    if site.kind == "conv":
        delta = w.scale * torch.einsum("or,ri...->oi...", B.flatten(1), A)       # [out, in, *kernel]
    elif site.kind in ("embedding", "conv1d"):
        delta = w.scale * (B @ A).t()                                             # [in, out] layouts
    else:
        delta = w.scale * (B @ A)                                                 # [out, in]
    variants = [v for v in variants_at(w) if v.base is not None or v.fold is not None]
    if not variants:
        return delta
    base = next((v.base(w) for v in variants if v.base is not None), weight)
    W, V = weight.detach().to(dt), base.detach().to(dt)
    merged = V + delta
    for v in variants:
        if v.fold is not None:
            merged = v.fold(w, site, base, merged)
    return merged - W


def lora_bias_delta(adapter: Adapter, site: Site, bias: torch.Tensor | None) -> torch.Tensor | None:
    """s b, what merge() adds to the layer's bias for a variant with a bias (lora_bias: B's), in work_dtype; None
    without one."""
    w = adapter.sites[site_key(site.fqn)]
    b = next((v.fold_bias(w) for v in variants_at(w) if v.fold_bias is not None), None)
    if b is None:
        return None
    dt = work_dtype(b.dtype, *(() if bias is None else (bias.dtype,)))
    return w.scale * b.detach().to(dt)


def check_lora(spec: LoRA, sites: dict[str, Site], chosen: list[str], loading: bool) -> None:
    """LoRA's own rules before any weight is made: ranks that fit (PEFT accepts r > min(in, out), so checkpoints
    it wrote must load: not checked when loading) and options only some layer kinds serve (refused by name, as PEFT
    refuses them)."""
    check_parameter_targets(spec, sites, chosen)
    if not loading:
        check_rank(spec, sites, chosen)
    variants = variants_on(spec)
    for path in chosen:
        site = sites[path]
        if site.param:                     # check_parameter_targets
            continue
        for v in variants:
            why = v.refusal(spec, site)
            if why:
                raise SpecError(why)


def build_lora(spec: LoRA, site: Site, weight: torch.Tensor) -> LoraWeights:
    """LoRA's weights at one site: A and B by the spec's init, then each variant's own set-up (passes.lora.variants:
    PiSSA / OLoRA's A, B and residual from the weight, DoRA's magnitude), so that a fresh adapter is the identity."""
    if site.param:
        return build_expert_lora(spec, site, weight)
    at = site.pattern_path        # an nn.MultiheadAttention's out_proj: its attention module's r and alpha
    p = 0.0 if site.module_type == MHA or site.parent else spec.dropout   # PEFT runs MHA on merged weights
    lw = LoraWeights(spec.rank_at(at), site.in_features, site.out_features, spec.scale_at(at), p,
                     spec.init, dtype=weight.dtype, device=weight.device, dora=DORA.on(spec),
                     bias=LORA_BIAS.on(spec), **shape_of(site))
    for v in sorted(variants_on(spec), key=lambda v: v.base is None):   # the weight it runs on first
        if v.build is not None:
            v.build(lw, spec, site, weight)
    return lw


def lora_keys(path: str, w: LoraWeights):
    """PEFT's checkpoint names of LoRA's tensors at a site (after base_model.model.<path>.)."""
    if w.kind == "embedding":            # PEFT's Embedding holds bare Parameters
        yield "lora_embedding_A", w.A_r
        yield "lora_embedding_B", w.B_r
    else:
        yield "lora_A.weight", w.A_r
        yield "lora_B.weight", w.B_r
    for v in variants_at(w):            # lora_B.bias, lora_magnitude_vector
        for attr, key in v.tensors:
            yield key, getattr(w, attr)


def lora_param_count(spec: LoRA, site: Site) -> int:
    """A [r, in, *kernel] + B [out, r / groups, 1...] + what the variants add per output channel."""
    if site.param:
        return expert_param_count(spec, site)
    r = spec.rank_at(site.pattern_path)
    kernel = math.prod(site.weight_shape[2:]) if site.kind == "conv" else 1
    groups = site.params.get("groups", 1) if site.kind == "conv" else 1
    return r * site.in_features * kernel + site.out_features * (r // groups) + \
        sum(v.channel_params for v in variants_on(spec)) * site.out_features


def lora_mixed_refusal(adapter: Adapter) -> str | None:
    """Why a LoRA adapter cannot join a mixed batch (parameter targets, or a variant the gathered form does not
    serve, Variant.mixed), or None."""
    if param_targets_refusal(adapter):
        return param_targets_refusal(adapter)
    for v in VARIANTS:
        if v.mixed is not None and any(v.at(w) for w in adapter.sites.values()):
            return v.mixed.format(spec=adapter.spec)
    return None


def lora_fits_graph(gm: GraphModule, adapter: Adapter) -> bool:
    """Whether the plain-form graph `gm`'s LoRA subgraph already serves `adapter` as data: each variant it has only
    where the graph serves that variant (Variant.graph; lora_bias and residual weights: never, they rebuild)."""
    for v in VARIANTS:
        paths = {p for p in adapter.targets if v.at(adapter.sites[site_key(p)])}
        if paths and (v.graph is None or not paths <= v.graph(gm)):
            return False
    return True


def lora_room(adapter: Adapter, capacity: Capacity) -> str | None:
    """Why a LoRA adapter does not fit `capacity`: a capacity without a rank, or a rank above it."""
    rank = max((w.r for w in adapter.sites.values()), default=0)
    if capacity.rank is None:
        return f"LoRA adapters need a capacity rank; declare one with pm.reserve(adapters=..., rank={rank})"
    if rank > capacity.rank:
        return f"it has rank r={rank}, above the declared capacity's rank {capacity.rank}; pm.reserve(rank={rank}) " \
               "first (one recompile)"
    return None


register_method(Method(LoRA, "LORA", lora_from_config, lora_to_config, build=build_lora, rewrite=insert_lora,
                       peft_keys=lora_keys, route_values={"lora": lora_value, "residual": residual_value},
                       site_kinds=("linear", "conv1d", "embedding", "conv", "grouped_mm", "batched_mm",
                                   "linear4bit", "linear8bit"), check=check_lora,
                       fold=lora_delta, fold_bias=lora_bias_delta, mixed_refusal=lora_mixed_refusal,
                       pad=lambda w, cap: w.padded(cap.rank), empty=lambda w, cap: w.zeros(cap.rank),
                       room=lora_room, fits_graph=lora_fits_graph, param_count=lora_param_count,
                       resolve=lambda spec, sites, model: expand_all_linear(spec, model)))
