"""peftc.compile and peftc.load_adapter: trace -> match -> rewrite -> emit."""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from .checkpoint import load_spec, load_weights_, read_adapter_weights
from .errors import SpecError
from .inits import changes_base_weight
from .loss import loss_type_of
from .module import PeftModule
from .passes.batchnorm import make_batchnorm_mode_aware
from .passes.dropout import make_dropout_mode_aware
from .passes.gated import fuse_gated_activations
from .passes.lora_ops import dora_norm
from .passes.match import Site, find_sites, output_heads, tensor_at
from .passes.sdpa_mask import float_attention_masks
from .passes.modules_to_save import resolve_modules_to_save, saved_copies
from .pipeline import run_passes
from .methods import method_of, spec_from_config
from .spec import SEQ_CLS_HEADS, AdapterSpec, LoRA
from .store import Adapter, Capacity, LoraWeights, site_key
from .targets import check_rank, output_head_paths, resolve_targets, select_layers
from .trace import trace

log = logging.getLogger(__name__)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


def as_spec(spec: Any) -> AdapterSpec:
    if isinstance(spec, AdapterSpec):
        method = method_of(spec)
        if not isinstance(spec, LoRA):      # the rewrite and emit passes implement LoRA's subgraph only so far
            raise SpecError(f"method {method.name} is registered (config and fold rule) but peftc's rewrite passes "
                            "build LoRA adapters only; compile it as peftc.LoRA")
        return spec
    if isinstance(spec, dict):
        return spec_from_config(spec, source="spec dict")
    raise SpecError(f"spec must be a peftc spec (e.g. peftc.LoRA(r=8)) or a dict in adapter_config.json form, "
                    f"got {type(spec).__name__}")


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "__base__":
        raise SpecError(f"adapter_name must be letters, digits, '_' or '-' (and not '__base__'), got {name!r}")
    return name


def build_adapter(pm: PeftModule, spec: LoRA, *, loading: bool = False) -> Adapter:
    """Resolve `spec` against the traced graph and create its weights (nothing is attached yet)."""
    gm, sites = pm.base_graph_module, pm.sites
    optional = SEQ_CLS_HEADS if spec.task_type == "SEQ_CLS" else ()
    saved = resolve_modules_to_save(gm, spec.modules_to_save, optional)
    heads = output_head_paths(pm.base_model, output_heads(gm, sites), spec.task_type)
    chosen = select_layers(spec, resolve_targets(spec.targets, sites, heads, saved))
    if not loading:  # PEFT accepts r > min(in, out); checkpoints it wrote must load
        check_rank(spec, sites, chosen)
    overlap = {t for t in chosen for s in saved if t == s or t.startswith(s + ".")}
    if overlap:
        raise SpecError(f"{sorted(overlap)} are both LoRA targets and modules_to_save; pick one for each layer")
    adapter = Adapter(spec, chosen, saved)
    for path in chosen:
        site: Site = sites[path]
        w = tensor_at(gm, site.weight)
        lw = LoraWeights(spec.rank_at(path), site.in_features, site.out_features, spec.scale_at(path), spec.dropout,
                         spec.init, dtype=w.dtype, device=w.device, dora=spec.use_dora, bias=spec.lora_bias)
        if changes_base_weight(spec.init):
            if spec.init == "olora" and site.kind == "conv1d":
                raise SpecError(f"init 'olora' on {path} (a GPT-2 Conv1D layer) is not supported: PEFT's OLoRA "
                                "factors the stored [in, out] weight, which does not reproduce the layer; use "
                                "'pissa' or another init there")
            lw.set_residual_init(spec.init, w, site.kind == "conv1d")
        if spec.use_dora:    # m = ||W + s B A|| per output channel: the adapter starts as the identity
            base = w if lw.residual is None else lw.residual
            with torch.no_grad():
                lw.magnitude.copy_(dora_norm(base, lw.A_r, lw.B_r, lw.scale, site.kind))
        adapter.sites[site_key(path)] = lw
    for path in saved:
        adapter.saved[site_key(path)] = saved_copies(gm, path)
    return adapter


def resolve_paths(pm: PeftModule, targets: Any) -> list[str]:
    """Module paths of the sites `targets` (LoRA's target syntax) selects in `pm`'s graph, in graph order."""
    heads = output_head_paths(pm.base_model, output_heads(pm.base_graph_module, pm.sites), None)
    return resolve_targets(targets, pm.sites, heads)


def compile(model: nn.Module, spec: Any, *, adapter_name: str = "default", example_inputs: Any = None,
            backend: str | None = None, capacity: Capacity | None = None, _loading: bool = False):
    """Trace `model`, insert the adapter described by `spec` and return a new PeftModule (with `backend`, e.g.
    "inductor": a CompiledPeftModule, the PeftModule under torch.compile with routing as data). `capacity`
    declares room for more adapters (PeftModule.reserve), so that adding them never changes the graph.

    The user's model is never changed: its weights are shared with the PeftModule (not copied) and frozen there,
    its own parameters, flags and mode stay as they were, and a compile that fails leaves nothing behind.
    """
    spec = as_spec(spec)
    check_adapter_name(adapter_name)
    traced = trace(model, example_inputs)
    gm = traced.gm
    sites = find_sites(gm)
    base_passes = run_passes(gm, [("dropout", make_dropout_mode_aware), ("batchnorm", make_batchnorm_mode_aware),
                                  ("sdpa_mask", float_attention_masks),
                                  ("gated", fuse_gated_activations)])
    cfg = getattr(model, "config", None)
    pm = PeftModule(traced, base_model=model, sites=sites, loss_type=loss_type_of(model),
                    base_name=getattr(cfg, "name_or_path", None) or None, base_passes=list(base_passes))
    pm._add(adapter_name, build_adapter(pm, spec, loading=_loading))
    if capacity is not None:
        pm.reserve(capacity.adapters, capacity.rank, capacity.targets)
    pm.train(model.training)
    log.info("compiled %s: %d LoRA sites", type(model).__name__, len(pm.store[adapter_name].targets))
    if backend is not None:
        from .compiled import CompiledPeftModule

        return CompiledPeftModule(pm, backend=backend)
    return pm


def load_adapter(model: nn.Module, directory, adapter_name: str = "default", *, example_inputs: Any = None,
                 is_trainable: bool = False) -> PeftModule:
    """Compile `model` with the adapter saved in `directory` (by PEFT or peftc) and load its weights.

    Safetensors only: a pickled checkpoint is refused. The model is not changed. Like PEFT, the result is in eval
    mode with frozen adapter weights unless is_trainable=True.
    """
    spec = load_spec(directory)
    tensors = read_adapter_weights(directory)
    pm = compile(model, spec, adapter_name=adapter_name, example_inputs=example_inputs, _loading=True)
    load_weights_(pm, adapter_name, tensors, source=str(directory))
    if not is_trainable:
        pm.eval()
        for p in pm.store[adapter_name].parameters():
            p.requires_grad_(False)
    return pm
