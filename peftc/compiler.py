"""peftc.compile and peftc.load_adapter: lower the model (peftc.pipeline), build the adapter from the graph's data
(peftc.build), and hand the PeftModule the compiler (pipeline.Compiler), which emits its forms."""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .build import as_spec, check_adapter_name, check_autocast
from .checkpoint import load_spec, load_weights_, read_adapter_weights
from .compiled import CompiledPeftModule
from .errors import SpecError
from .loss import loss_type_of
from .module import PeftModule
from .pipeline import Compiler, lower
from .store import Capacity

log = logging.getLogger(__name__)


def compile(model: nn.Module, spec: Any, *, adapter_name: str = "default", example_inputs: Any = None,
            backend: str | None = None, capacity: Capacity | None = None, fuse_quant: bool = True,
            autocast_adapter_dtype: bool = True, _loading: bool = False):
    """Trace `model`, insert the adapter described by `spec` and return a new PeftModule (with `backend`, e.g.
    "inductor": a CompiledPeftModule, the PeftModule under torch.compile with routing as data). `capacity`
    declares room for more adapters (PeftModule.reserve), so that adding them never changes the graph.
    `fuse_quant`: on a model with bitsandbytes layers, each quantized layer and the LoRA update after it run as one
    fused op (passes.fuse_quant); False keeps them apart (the same numbers, more memory: for comparisons).
    `autocast_adapter_dtype` (PEFT's, default True): on a float16 / bfloat16 model the adapter's weights are float32;
    the adapter path computes in float32 (its input cast up) and its result is cast back, so outputs keep the
    model's dtype. False makes them in the model's dtype.
    A PEFT config object (peft.LoraConfig(...), peft.IA3Config(...)) is accepted as `spec` (read through to_dict()).

    The user's model is never changed: its weights are shared with the PeftModule (not copied) and frozen there,
    its own parameters, flags and mode stay as they were, and a compile that fails leaves nothing behind.
    """
    if not isinstance(fuse_quant, bool):
        raise SpecError(f"fuse_quant must be True or False, got {fuse_quant!r} ({type(fuse_quant).__name__}); "
                        "pass fuse_quant=False to keep quantized layers and their adapters apart")
    spec = as_spec(spec)
    check_adapter_name(adapter_name)
    check_autocast(autocast_adapter_dtype)
    traced, sites, base_passes = lower(model, example_inputs)
    compiler = Compiler(traced.gm, sites, model, base_passes, skip=() if fuse_quant else ("fuse_quant",))
    adapter = compiler.adapter(spec, loading=_loading, autocast_adapter_dtype=autocast_adapter_dtype)
    cfg = getattr(model, "config", None)
    pm = PeftModule(traced, compiler, loss_type=loss_type_of(model), base_name=getattr(cfg, "name_or_path", None) or None)
    pm._add(adapter_name, adapter)
    if capacity is not None:
        pm.reserve(capacity.adapters, capacity.rank, capacity.targets)
    pm.train(model.training)
    log.info("compiled %s: %d sites adapted", type(model).__name__, len(pm.store[adapter_name].targets))
    return CompiledPeftModule(pm, backend=backend) if backend is not None else pm


def load_adapter(model: nn.Module, directory, adapter_name: str = "default", *, example_inputs: Any = None,
                 is_trainable: bool = False, autocast_adapter_dtype: bool = True) -> PeftModule:
    """Compile `model` with the adapter saved in `directory` (by PEFT or peftc) and load its weights.

    Safetensors only: a pickled checkpoint is refused. The model is not changed. Like PEFT, the result is in eval
    mode with frozen adapter weights unless is_trainable=True. autocast_adapter_dtype: as in compile (PEFT's
    from_pretrained has it too): a checkpoint's weights are read into float32 adapter weights on a half-precision
    model, or into the model's dtype with False.
    """
    spec = load_spec(directory)
    tensors = read_adapter_weights(directory)
    pm = compile(model, spec, adapter_name=adapter_name, example_inputs=example_inputs,
                 autocast_adapter_dtype=autocast_adapter_dtype, _loading=True)
    load_weights_(pm.checkpoint_data, adapter_name, tensors, source=str(directory))
    if not is_trainable:
        pm.eval()
        for p in pm.store[adapter_name].parameters():
            p.requires_grad_(False)
    return pm
