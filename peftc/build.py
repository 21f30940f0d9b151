"""Building adapters from data: a spec resolved against a traced graph's sites, its weights made by its method.

    build_adapter(gm, sites, model, spec) -> Adapter      (nothing is attached to any module yet)

The generic part (targets, layer selection, modules_to_save) is here; what a method's weights are at one site, and
what it checks first, is its Method's `check` and `build` (passes/lora/method.py for LoRA).
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.fx import GraphModule

from .errors import SpecError
from .methods import METHODS, method_of, spec_from_config
from .passes.match import Site, dense_weight
from .passes.modules_to_save import resolve_biases, resolve_modules_to_save, saved_copies
from .passes.trainable_tokens import resolve_token_rows
from .spec import SEQ_CLS_HEADS, AdapterSpec
from .store import Adapter, site_key
from .param_targets import all_linear_exclusions, resolve_parameters
from .targets import output_head_paths, resolve_targets, select_layers, site_for

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def as_spec(spec: Any) -> AdapterSpec:
    """A registered method's spec. A dict in adapter_config.json form is read through its peft_type, and so is a
    PEFT config object (peft.LoraConfig, peft.IA3Config: anything with a `peft_type` and `to_dict()`, read through its
    dict form; peft itself is never imported here)."""
    if not isinstance(spec, (dict, AdapterSpec)) and is_peft_config(spec):
        spec = spec_from_config(spec.to_dict(), source=f"{type(spec).__name__} (a PEFT config)")
    if isinstance(spec, dict):
        spec = spec_from_config(spec, source="spec dict")
    if not isinstance(spec, AdapterSpec):
        raise SpecError(f"spec must be a peftc spec (e.g. peftc.LoRA(r=8)), a dict in adapter_config.json form or a "
                        f"PEFT config (peft.LoraConfig(...)), got {type(spec).__name__}")
    method = method_of(spec)
    if method.build is None or method.rewrite is None:
        ready = [m.name for m in METHODS.values() if m.build is not None and m.rewrite is not None]
        raise SpecError(f"method {method.name} is registered without build and rewrite functions, so it cannot be "
                        f"compiled; methods that compile: {ready}")
    return spec


def is_peft_config(obj: Any) -> bool:
    """Whether `obj` looks like a PEFT config (duck-typed: a `peft_type` attribute and a callable `to_dict`)."""
    return getattr(obj, "peft_type", None) is not None and callable(getattr(obj, "to_dict", None))


# PEFT's cast_adapter_dtype (autocast_adapter_dtype=True): these adapter weight dtypes become float32
UPCAST = frozenset(dt for dt in (torch.float16, torch.bfloat16, *(getattr(torch, n, None) for n in (
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"))) if dt is not None)


def check_autocast(value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"autocast_adapter_dtype must be True or False, got {value!r} ({type(value).__name__}); "
                        "True (PEFT's default) keeps half-precision adapter weights in float32, False in the "
                        "model's dtype")
    return value


@torch.no_grad()
def upcast_adapter_(weights: nn.Module) -> nn.Module:
    """PEFT's autocast_adapter_dtype, in place on one site's adapter weights: every Parameter in float16, bfloat16
    or a float8 dtype becomes float32 (same values, same requires_grad), and so does every 0-dim buffer (a scale,
    a dropout rate, a flag: what the call passes in beside the weights). Larger buffers stay: they stand in for the
    model's own weight (PiSSA / OLoRA's residual) and keep its dtype, as PEFT's base layer does."""
    for module in weights.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dtype in UPCAST:
                setattr(module, name, nn.Parameter(p.to(torch.float32), requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.dim() == 0 and b.dtype in UPCAST:
                setattr(module, name, b.to(torch.float32))
    return weights


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "__base__":
        raise SpecError(f"adapter_name must be letters, digits, '_' or '-' (and not '__base__'), got {name!r}")
    return name


def resolved(spec: AdapterSpec, sites: dict[str, Site], model: nn.Module | None) -> AdapterSpec:
    """`spec` with its graph-dependent defaults made explicit by its method (Method.resolve: IA3's default targets
    from the sites' roles); the adapter keeps this spec, so its checkpoint names what was chosen."""
    method = method_of(spec)
    return method.resolve(spec, sites, model) if method.resolve is not None else spec


class Choice(NamedTuple):
    """What a spec adapts: module paths (graph order), modules_to_save paths, the sites (a layer chosen by
    target_parameters carries its parameter's name, Site.key) and PEFT's path of each parameter target."""

    chosen: list[str]
    saved: list[str]
    sites: dict[str, Site]
    peft_paths: dict[str, str]


def choose_sites(gm: GraphModule, sites: dict[str, Site], model: nn.Module | None, spec: AdapterSpec) -> Choice:
    """What `spec` (after its method's resolve, `resolved`) adapts: LoRA's target syntax on spec.targets with PEFT's
    layer selection, and a spec's target_parameters (peftc.param_targets), checked against the site kinds the method
    serves."""
    method = method_of(spec)
    task_type = getattr(spec, "task_type", None)
    optional = SEQ_CLS_HEADS if task_type == "SEQ_CLS" else ()
    saved = resolve_modules_to_save(gm, getattr(spec, "modules_to_save", ()), optional)
    heads = output_head_paths(model, task_type) | all_linear_exclusions(sites, model)
    modules = resolve_targets(getattr(spec, "targets", None), sites, heads, saved)
    params = resolve_parameters(gm, sites, model, spec, modules) if hasattr(spec, "target_parameters") else {}
    chosen = select_layers(spec, modules, sites, [p for p, _ in params.values()])
    chosen = [f for f in sites if f in set(chosen) | set(params)]          # graph order
    # a layer chosen by target_parameters carries its parameter's name (Site.key: rank / alpha patterns match it)
    sites = {f: replace(s, key=params[f][0]) if f in params else s for f, s in sites.items()}
    wrong = [p for p in chosen if sites[p].kind not in method.site_kinds]
    if wrong:
        site = sites[wrong[0]]
        raise SpecError(f"{method.name} cannot serve {wrong[0]} ({site.module_type or site.kind}: the "
                        f"{site.spec.ops[0]} op, site kind {site.kind!r}); it adapts {list(method.site_kinds)}; "
                        "leave that layer out of the targets")
    overlap = {t for t in chosen for s in saved if t == s or t.startswith(s + ".")}
    if overlap:
        raise SpecError(f"{sorted(overlap)} are both adapter targets and modules_to_save; pick one for each layer")
    return Choice(chosen, saved, sites, {f: peft_path for f, (_, peft_path) in params.items()})


def count_parameters(gm: GraphModule, sites: dict[str, Site], spec: AdapterSpec, chosen: list[str]) -> dict[str, int]:
    """{module path: the trainable parameters `spec`'s method adds there}: its param_count where it declares one,
    else counted from the weights its build makes (on the site's weight)."""
    method = method_of(spec)
    out = {}
    for path in chosen:
        site = site_for(sites, path, chosen)
        if method.param_count is not None:
            out[path] = method.param_count(spec, site)
        else:
            built = method.build(spec, site, dense_weight(gm, site))
            out[path] = sum(p.numel() for p in built.parameters() if p.requires_grad)
    return out


def build_adapter(gm: GraphModule, sites: dict[str, Site], model: nn.Module | None, spec: AdapterSpec, *,
                  loading: bool = False, autocast_adapter_dtype: bool = True) -> Adapter:
    """Resolve `spec` against the graph's sites and make its weights through its method.

    autocast_adapter_dtype (PEFT's): the weights a method makes in float16 / bfloat16 (a half-precision model's
    dtype) are kept in float32 (upcast_adapter_); the graph computes the adapter in its weights' dtype and casts
    the result back to the model's. False keeps them in the dtype the method made them in (the model's). Trained
    token rows (trainable_token_indices) are upcast too, as PEFT's; modules_to_save copies keep the model's dtype.

    A spec's fields read here when it has them (LoRA's names): targets, modules_to_save, task_type, bias (trained
    copies of the model's biases, kept beside the modules_to_save copies), trainable_token_indices (trained
    embedding rows; passes.trainable_tokens) and PEFT's layer selection (layers_to_transform, exclude_modules, ...)."""
    method = method_of(spec)
    spec = resolved(spec, sites, model)
    chosen, saved, sites, peft_paths = choose_sites(gm, sites, model, spec)
    if method.check is not None:
        method.check(spec, sites, chosen, loading)
    biases = resolve_biases(gm, getattr(spec, "bias", "none"), chosen, saved)
    tokens = resolve_token_rows(gm, sites, model, getattr(spec, "trainable_token_indices", None), chosen, saved,
                                **getattr(spec, "token_options", {}))
    adapter = Adapter(spec, chosen, saved + biases)
    adapter.peft_paths = peft_paths
    adapter.tokens.update({site_key(t.path): upcast_adapter_(t) if autocast_adapter_dtype else t for t in tokens})
    for path in chosen:
        site = site_for(sites, path, chosen)
        built = method.build(spec, site, dense_weight(gm, site))
        adapter.sites[site_key(path)] = upcast_adapter_(built) if autocast_adapter_dtype else built
    for path in saved:
        adapter.saved[site_key(path)] = saved_copies(gm, path)
    for path in biases:
        adapter.saved[site_key(path)] = saved_copies(gm, path, ("bias",))
    return adapter


def resolve_paths(gm: GraphModule, sites: dict[str, Site], model: nn.Module | None, targets: Any) -> list[str]:
    """Module paths of the sites `targets` (LoRA's target syntax) selects in the graph, in graph order."""
    return resolve_targets(targets, sites, output_head_paths(model, None))
