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
from .dora import dora_norm
from .gathered import insert_gathered
from .inits import changes_base_weight
from .ops import LoraGroup
from .params import (build_expert_lora, check_parameter_targets, expert_delta, expert_param_count, insert_param_lora,
                     param_targets_refusal)
from .plain import insert_plain
from .spec import LoRA, lora_from_config, lora_to_config
from .values import all_weights, lora_adapter, lora_value, residual_value
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
    s B A; with DoRA g (V + s B A) - W, where g = m / ||V + s B A|| per output channel (1 where the norm is 0, as the
    unmerged graph has it) and V is the weight the adapter runs on: W, or its PiSSA / OLoRA residual (which the
    delta then replaces W by)."""
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
    if not w.dora and w.residual is None:
        return delta
    base = weight if w.residual is None else w.residual
    W, V = weight.detach().to(dt), base.detach().to(dt)
    if w.dora:
        n = dora_norm(base, w.A_r, w.B_r, w.scale, site.kind)
        m = w.magnitude.detach().to(dt).flatten()
        g = torch.where(n > 0, m / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
        channel = 1 if site.kind in ("embedding", "conv1d") else 0                # the output channels' axis
        shape = [1] * W.dim()
        shape[channel] = -1
        return g.view(shape) * (V + delta) - W
    return V + delta - W


def lora_bias_delta(adapter: Adapter, site: Site, bias: torch.Tensor | None) -> torch.Tensor | None:
    """s b_B, what merge() adds to the layer's bias for lora_bias (None without it), in work_dtype."""
    w = adapter.sites[site_key(site.fqn)]
    if w.B_bias is None:
        return None
    dt = work_dtype(w.B_bias.dtype, *(() if bias is None else (bias.dtype,)))
    return w.scale * w.B_bias.detach().to(dt)


def check_lora(spec: LoRA, sites: dict[str, Site], chosen: list[str], loading: bool) -> None:
    """LoRA's own rules before any weight is made: ranks that fit (PEFT accepts r > min(in, out), so checkpoints
    it wrote must load: not checked when loading) and options only some layer kinds serve (refused by name, as PEFT
    refuses them)."""
    check_parameter_targets(spec, sites, chosen)
    if not loading:
        check_rank(spec, sites, chosen)
    for path in chosen:
        site = sites[path]
        if site.param:
            continue
        if site.module_type == "MultiheadAttention" and (spec.use_dora or spec.init not in (True, False, "gaussian")):
            raise SpecError(f"{'use_dora' if spec.use_dora else f'init={spec.init!r}'} on {path} "
                            "(nn.MultiheadAttention) is not supported (as in PEFT); leave it out of targets "
                            "(exclude_modules) or drop the option")
        if site.module_type == "MultiheadAttention" and spec.lora_bias:
            # PEFT 0.21.2 makes and saves the packed in_proj's lora_B.bias but never applies it (its forward adds
            # only s B A to in_proj_weight): an adapter with that bias would mean one thing here and another there
            raise SpecError(f"lora_bias on {path} (nn.MultiheadAttention) is not supported: PEFT keeps a bias for "
                            "its packed in_proj but never applies it, so the adapter would not carry over between "
                            "peftc and PEFT; leave it out of targets (exclude_modules) or pass lora_bias=False")
        if site.linear_like:
            if spec.init == "olora" and site.kind == "conv1d":
                raise SpecError(f"init 'olora' on {path} (a GPT-2 Conv1D layer) is not supported: PEFT's OLoRA "
                                "factors the stored [in, out] weight, which does not reproduce the layer; use "
                                "'pissa' or another init there")
            continue
        what = {"embedding": "an embedding", "conv": "a convolution"}[site.kind]
        unsupported = ["lora_bias"] if spec.lora_bias and site.kind == "embedding" else []
        if spec.init not in (True, False, "gaussian"):
            unsupported.append(f"init={spec.init!r}")
        if unsupported:
            raise SpecError(f"{', '.join(unsupported)} on {site.fqn} ({what}, {site.module_type or site.kind}) is "
                            "not supported: peftc serves it on linear and Conv1D layers; leave the layer out "
                            "of targets (exclude_modules) or drop the option")


def build_lora(spec: LoRA, site: Site, weight: torch.Tensor) -> LoraWeights:
    """LoRA's weights at one site: A and B by the spec's init (PiSSA / OLoRA from the weight, with the residual the
    adapter runs on), and DoRA's magnitude m = ||W + s B A|| per output channel, so that it starts as the identity."""
    if site.param:
        return build_expert_lora(spec, site, weight)
    at = site.pattern_path        # an nn.MultiheadAttention's out_proj: its attention module's r and alpha
    p = 0.0 if site.module_type == MHA or site.parent else spec.dropout   # PEFT runs MHA on merged weights
    lw = LoraWeights(spec.rank_at(at), site.in_features, site.out_features, spec.scale_at(at), p,
                     spec.init, dtype=weight.dtype, device=weight.device, dora=spec.use_dora, bias=spec.lora_bias,
                     **shape_of(site))
    if changes_base_weight(spec.init):
        lw.set_residual_init(spec.init, weight, site.kind == "conv1d")
    if spec.use_dora:
        base = weight if lw.residual is None else lw.residual
        with torch.no_grad():
            lw.magnitude.copy_(dora_norm(base, lw.A_r, lw.B_r, lw.scale, site.kind).view(lw.magnitude.shape))
    return lw


def lora_keys(path: str, w: LoraWeights):
    """PEFT's checkpoint names of LoRA's tensors at a site (after base_model.model.<path>.)."""
    if w.kind == "embedding":            # PEFT's Embedding holds bare Parameters
        yield "lora_embedding_A", w.A_r
        yield "lora_embedding_B", w.B_r
    else:
        yield "lora_A.weight", w.A_r
        yield "lora_B.weight", w.B_r
    if w.B_bias is not None:
        yield "lora_B.bias", w.B_bias
    if w.dora:
        yield "lora_magnitude_vector", w.magnitude


def lora_param_count(spec: LoRA, site: Site) -> int:
    """A [r, in, *kernel] + B [out, r / groups, 1...] + a magnitude (DoRA) or B's bias (lora_bias) per channel."""
    if site.param:
        return expert_param_count(spec, site)
    r = spec.rank_at(site.pattern_path)
    kernel = math.prod(site.weight_shape[2:]) if site.kind == "conv" else 1
    groups = site.params.get("groups", 1) if site.kind == "conv" else 1
    return r * site.in_features * kernel + site.out_features * (r // groups) + \
        (spec.use_dora or spec.lora_bias) * site.out_features


def lora_mixed_refusal(adapter: Adapter) -> str | None:
    """Why a LoRA adapter cannot join a mixed batch (the gathered form has no DoRA rescale and routes no residual
    weights, nor parameter targets), or None."""
    if param_targets_refusal(adapter):
        return param_targets_refusal(adapter)
    if adapter.spec.use_dora:
        return "it uses DoRA, whose per-channel rescale the per-row form does not have yet (PEFT refuses " \
               "adapter_names with DoRA too)"
    if any(w.residual is not None for w in adapter.sites.values()):
        return f"it runs on its own residual base weights (init {adapter.spec.init!r}), which the per-row form " \
               "does not route"
    return None


def lora_fits_graph(gm: GraphModule, adapter: Adapter) -> bool:
    """Whether the plain-form graph `gm`'s LoRA subgraph already serves `adapter` as data: no lora_bias or residual
    inputs of its own, and DoRA only where the graph has DoRA's rescale."""
    if any(w.B_bias is not None or w.residual is not None for w in adapter.sites.values()):
        return False
    dora = {p for p in adapter.targets if adapter.sites[site_key(p)].dora}
    rescaled = {p for g in gm.modules() if isinstance(g, LoraGroup) for p, on in zip(g.paths, g.dora) if on}
    return dora <= rescaled


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
                       site_kinds=("linear", "conv1d", "embedding", "conv", "grouped_mm", "batched_mm"), check=check_lora,
                       fold=lora_delta, fold_bias=lora_bias_delta, mixed_refusal=lora_mixed_refusal,
                       pad=lambda w, cap: w.padded(cap.rank), empty=lambda w, cap: w.zeros(cap.rank),
                       room=lora_room, fits_graph=lora_fits_graph, param_count=lora_param_count,
                       resolve=lambda spec, sites, model: expand_all_linear(spec, model)))
