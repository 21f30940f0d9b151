"""PEFT's target_parameters: parameter names resolved to sites (a parameter site, passes.param_sites, or the linear
layer whose weight the parameter is), the module path PEFT keys each one under, and what targets="all-linear" adds
on the mixture-of-experts models whose layers transformers 5 fused.

PEFT wraps a targeted parameter's module in a ParamWrapper, one per parameter: two parameters of one module nest,
the one registered first innermost, so its keys carry one ".base_layer" per targeted parameter registered after it:

    experts.gate_up_proj  ->  model.layers.0.mlp.experts.base_layer.lora_A.weight    (registered first)
    experts.down_proj     ->  model.layers.0.mlp.experts.lora_A.weight
    gate.weight (router)  ->  model.layers.0.mlp.gate.lora_A.weight                 (a linear site)
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from torch import nn
from torch.fx import GraphModule

from .errors import SpecError, TargetNotFound
from .passes.match import Site
from .passes.param_sites import param_reads

# transformers 5 fused these MoE layers into parameters; PEFT's all-linear still means them (its v4 -> v5 config
# conversion): conversion style -> {v4 layer name: the parameter target it became}
FUSED_MOE: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}


def fused_moe_names(model: nn.Module | None) -> dict[str, str] | None:
    """The FUSED_MOE table of `model`'s type where PEFT converts its config (a transformers model type with a
    checkpoint conversion of a Mixtral- or Qwen2-MoE-style pattern; PEFT 0.21.2 maps "mixtral" itself too, but not
    "qwen2_moe" itself, so Qwen2-MoE keeps plain all-linear there); None for any other model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not model_type:
        return None
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:     # a transformers without fused MoE layers
        return None
    style = {**_MODEL_TO_CONVERSION_PATTERN, "mixtral": "mixtral"}.get(model_type)
    if style not in FUSED_MOE or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return FUSED_MOE[style]


def expand_all_linear(spec: Any, model: nn.Module | None) -> Any:
    """`spec` as PEFT resolves targets="all-linear" on a fused-MoE model: plus target_parameters for the router and
    the experts, and r * 2 / alpha * 2 for a parameter fused from two layers (gate_up_proj); `spec` itself when
    nothing changes (other targets, other models). A new spec: the caller's is not changed."""
    table = fused_moe_names(model)
    if table is None or not (isinstance(spec.targets, str) and spec.targets.lower() == "all-linear"):
        return spec
    params = sorted(set(spec.target_parameters or ()) | set(table.values()))
    ranks, alphas = dict(spec.rank_pattern), dict(spec.alpha_pattern)
    for name in sorted(set(table.values())):
        n = sum(v == name for v in table.values())
        if n > 1:                           # PEFT: one key per fused parameter, last in the dict unless present
            ranks[rf".*\.{name}"] = spec.r * n
            alphas[rf".*\.{name}"] = spec.alpha * n
    return dataclasses.replace(spec, target_parameters=tuple(params), rank_pattern=ranks, alpha_pattern=alphas)


def all_linear_exclusions(sites: dict[str, Site], model: nn.Module | None) -> set[str]:
    """Linear sites "all-linear" leaves out of the module targets besides the output head, as PEFT's does on a
    Hugging Face model: layers that are not nn.Linear / Conv1D modules (an MoE router reading its own weight), and
    on a fused-MoE model the layers named as a fused one (FUSED_MOE: they become parameter targets)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return set()
    if not isinstance(model, PreTrainedModel):
        return set()
    fused = set(fused_moe_names(model) or ())
    modules = dict(model.named_modules())
    out = set()
    for f, s in sites.items():
        if not s.linear_like or s.param:
            continue
        mod = modules.get(f)
        linear = isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"
        if (mod is not None and not linear) or f.rsplit(".", 1)[-1] in fused:
            out.add(f)
    return out


def _owned_parameters(gm: GraphModule, model: nn.Module | None) -> dict[str, list[str]]:
    """module path -> the names of its own parameters in registration order (the model's, else the graph's)."""
    root = model if model is not None else gm
    return {m: [f"{m}.{p}" if m else p for p in mod._parameters if mod._parameters[p] is not None]
            for m, mod in root.named_modules(remove_duplicate=False)}


def _closest(name: str, names: list[str]) -> str:
    tails = {}
    for n in names:
        parts = n.split(".")
        for i in range(len(parts)):
            tails.setdefault(".".join(parts[i:]), n)
    close = difflib.get_close_matches(name, list(tails), n=3, cutoff=0.5)
    return ", ".join(f"{c} ({tails[c]})" if c != tails[c] else c for c in close) or "none"


def resolve_parameters(gm: GraphModule, sites: dict[str, Site], model: nn.Module | None, spec: Any,
                       module_targets: list[str]) -> dict[str, tuple[str, str]]:
    """target path -> (parameter name, PEFT's module path) for spec.target_parameters, in graph order (PEFT's rule:
    a name matches a parameter's full name or its dotted tail). Refused, naming the culprit: a name that matches
    no parameter (with the closest names), a parameter read by an op peftc cannot adapt (naming the op), a
    parameter of a layer the module targets adapt too, and a layout the graph reads otherwise than the module
    declares (is_transposed)."""
    names = spec.target_parameters or ()
    if not names:
        return {}
    owned = _owned_parameters(gm, model)
    every = [p for ps in owned.values() for p in ps]
    matched = [p for p in dict.fromkeys(every) if any(p == t or p.endswith("." + t) for t in names)]
    missing = [t for t in names if not any(p == t or p.endswith("." + t) for p in every)]
    if missing:
        multi = sorted({p.rsplit(".", 1)[-1] for p in every if p.rsplit(".", 1)[-1] not in ("weight", "bias")})
        hints = "; ".join(f"{t!r}: closest {_closest(t, every)}" for t in missing)
        raise TargetNotFound(f"target_parameters {list(missing)} matched no parameter ({hints}); a name matches a "
                             "parameter's full name or its dotted tail, e.g. 'mlp.experts.gate_up_proj' or "
                             f"'gate.weight'. Parameter names here besides weight/bias: {', '.join(multi) or 'none'}")
    by_weight = {s.weight: f for f, s in sites.items()}
    chosen: dict[str, str] = {}
    for p in matched:
        f = by_weight.get(p)
        site = sites.get(f) if f is not None else None
        if site is None or not (site.param or site.kind == "linear"):
            reads = param_reads(gm, p)
            how = (f"is read by {'; '.join(reads)}" if reads else "is not read by the traced graph") \
                if site is None else f"is the weight of {site.fqn} ({site.module_type or site.kind}: site kind " \
                f"{site.kind!r})"
            raise SpecError(f"target parameter {p!r} {how}, which peftc cannot adapt as a parameter; it adapts "
                            "stacked expert weights read by grouped_mm or index + bmm (transformers' MoE experts) "
                            "and 2-D weights read by aten.linear. Leave it out of target_parameters"
                            + (" (target its layer with targets=... instead)" if site is not None else ""))
        if not p.rpartition(".")[0]:
            raise SpecError(f"target parameter {p!r} belongs to the top-level module, which PEFT cannot wrap; "
                            "leave it out of target_parameters")
        if f in module_targets:
            raise SpecError(f"{f} is chosen both by targets (as a layer) and by target_parameters ({p!r}); PEFT "
                            "refuses that too: leave it out of one of them (e.g. targets=[] for parameters only)")
        _check_layout(model, p, site)
        chosen[f] = p
    out: dict[str, tuple[str, str]] = {}
    for f in sites:
        if f not in chosen:
            continue
        p = chosen[f]
        owner = p.rpartition(".")[0]
        later = owned.get(owner, [p])
        depth = sum(q in chosen.values() for q in later[later.index(p) + 1:]) if p in later else 0
        out[f] = (p, owner + ".base_layer" * depth)
    return out


def _check_layout(model: nn.Module | None, p: str, site: Site) -> None:
    """PEFT takes an expert weight's in/out from its module's is_transposed; the graph must read it that way."""
    if model is None or not site.param:
        return
    owner = dict(model.named_modules()).get(p.rpartition(".")[0])
    declared = getattr(owner, "is_transposed", False)
    if bool(declared) != site.params["transposed"]:
        raise SpecError(f"target parameter {p!r}: its module says is_transposed={declared} (PEFT reads it as "
                        f"{'[E, in, out]' if declared else '[E, out, in]'}) but the traced graph reads it as "
                        f"{'[E, in, out]' if site.params['transposed'] else '[E, out, in]'}; peftc would not match "
                        "PEFT there, so it is refused; leave it out of target_parameters")
