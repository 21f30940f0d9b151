"""PeftModel's surface on PeftModule: the names code written against `peft.PeftModel` calls, with PEFT's meaning
where a compiled module can have it, and an error naming the replacement where it cannot.

    peft_config, active_adapters, disable_adapter(), get_base_model(), from_pretrained(...)
    merge_and_unload(), unload()                   -> new modules (PEFT changes its model in place; peftc never)
    get_layer_status(), get_model_status()         -> LayerStatus / ModelStatus (PEFT's field names)
    enable_input_require_grads(), gradient_checkpointing_enable(...) / _disable(), is_gradient_checkpointing
    merge_adapter(), unmerge_adapter()             -> MergeError: use merge() (a new module) instead
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .checkpoint import adapter_config
from .errors import InputError, MergeError, UnknownAdapter
from .store import site_key

Irregular = Literal["irregular"]
_QUANT_BACKEND = {"linear4bit": "bnb 4bit", "linear8bit": "bnb 8bit"}      # PEFT's backend_name per site kind
# PEFT's adapter layer class per site kind (module_type "lora.Linear", ...)
_LAYER_CLASS = {"linear": "Linear", "conv1d": "Linear", "embedding": "Embedding", "conv": "Conv",
                "linear4bit": "Linear4bit", "linear8bit": "Linear8bitLt", "grouped_mm": "ParamWrapper",
                "batched_mm": "ParamWrapper"}


@dataclass(frozen=True)
class LayerStatus:
    """One adapted layer, with the fields of PEFT's TunerLayerStatus (`name` as PEFT names it: "model.<path>")."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass(frozen=True)
class ModelStatus:
    """The whole model, with the fields of PEFT's TunerModelStatus (`adapter_model_type` is "PeftModule")."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _agree(values) -> Any:
    """The one value all of `values` have, else "irregular" (PEFT's rule)."""
    values = list(values)
    return values[0] if values and all(v == values[0] for v in values) else "irregular"


class PeftSurface:
    """Mixin of PeftModule: PeftModel's names (see the module docstring)."""

    # --- configs and adapters ------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, dict]:
        """{adapter name: its config as PEFT's config dict} (what save_pretrained writes to adapter_config.json),
        with `inference_mode` True where the adapter is frozen, as PEFT sets it. A fresh copy each time: changing it
        changes no adapter (PEFT's are config objects; peftc's specs are frozen)."""
        out = {}
        for name in self.adapters:
            cfg = adapter_config(self.checkpoint_data, name)
            if "inference_mode" in cfg:
                cfg["inference_mode"] = not any(p.requires_grad for p in self.store[name].parameters())
            out[name] = cfg
        return out

    @property
    def active_adapters(self) -> list[str]:
        """[the active adapter] (PEFT's list form of `active_adapter`); [] when there is none."""
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def active_peft_config(self) -> dict:
        """PEFT's config dict of the active adapter (`peft_config[active_adapter]`)."""
        return self.peft_config[self.active_adapter]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """PEFT's rule: False only inside disable_adapter() while an adapter is active."""
        return not getattr(self, "_disabled", 0) or not self.active_adapters

    @property
    def modules_to_save(self) -> set[str] | None:
        """The modules_to_save of every adapter's spec together (PEFT's union over its configs), None when none."""
        mods = {m for a in self.adapters for m in (getattr(self.store[a].spec, "modules_to_save", None) or ())}
        return mods or None

    @property
    def base_model_torch_dtype(self) -> torch.dtype | None:
        return getattr(self.base_model, "dtype", None)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """PEFT's set_requires_grad: every parameter of the named adapter(s) (a name or a list) gets `requires_grad`."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise UnknownAdapter(unknown, self.adapters, "set_requires_grad")
        for n in names:
            for p in self.store[n].parameters():
                p.requires_grad_(bool(requires_grad))

    def push_to_hub(self, *args, **kwargs):
        raise InputError("push_to_hub: peftc does not upload; save_pretrained(dir) writes PEFT's format, which "
                         "huggingface_hub's upload_folder(folder_path=dir, repo_id=...) uploads as it is")

    def disable_adapter(self):
        """PEFT's name for `disable_adapters()`: a context manager within which calls run the base model exactly."""
        return self.disable_adapters()

    @property
    def dtype(self) -> torch.dtype:
        """The base model's floating-point dtype (PEFT answers with its base model's `dtype`)."""
        p = next((p for p in self.base_graph_module.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def get_base_model(self) -> nn.Module:
        """The user's model. PEFT returns the model it wrapped, with its adapter layers injected; peftc never changes
        the model, so this is the original model without adapters (its weights are the ones this module shares)."""
        return self.base_model

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        **kwargs):
        """PEFT's PeftModel.from_pretrained: `peftc.load_adapter(model, model_id, adapter_name, is_trainable=...)`
        (a directory saved by PEFT or peftc; `example_inputs=` is passed on). The model is not changed."""
        from .compiler import load_adapter
        unknown = sorted(set(kwargs) - {"example_inputs"})
        if unknown:
            raise InputError(f"from_pretrained got unsupported argument(s) {unknown}; peftc takes model, model_id (a "
                             "local adapter directory), adapter_name, is_trainable and example_inputs")
        return load_adapter(model, model_id, adapter_name, is_trainable=is_trainable, **kwargs)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, selected_adapters=None,
                        is_main_process: bool | None = None, **kwargs):
        """PEFT's save_pretrained: `save_adapter` for every adapter (or those in `selected_adapters`), in PEFT's
        layout ("default" in the directory, any other in a sub-directory of its name); nothing is written where
        `is_main_process` is False (by default: written, or by rank 0 alone when the module is sharded, where every
        rank must call it). Always safetensors: `safe_serialization=False` (a pickle) is refused, as are
        PEFT's options that convert weights on the way (name them and they are refused, rather than ignored)."""
        if kwargs:
            raise InputError(f"save_pretrained got unsupported argument(s) {sorted(kwargs)}; peftc takes "
                             "save_directory, selected_adapters and is_main_process (it writes safetensors only)")
        if not safe_serialization:
            raise InputError("save_pretrained(safe_serialization=False) would write a pickle, which can run code when "
                             "loaded; peftc writes safetensors only: leave safe_serialization=True")
        names = list(self.adapters) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise UnknownAdapter(unknown, self.adapters, "selected_adapters")
        return [p for n in names for p in self.save_adapter(save_directory, n, is_main_process=is_main_process)]

    def add_model_tags(self, tags: list[str] | str) -> None:
        """transformers' add_model_tags (PEFT reaches the base model's): tags for the model card, kept without
        duplicates in `model_tags` of this module (the user's model is not changed)."""
        tags = [tags] if isinstance(tags, str) else list(tags)
        have = list(getattr(self, "model_tags", None) or [])
        object.__setattr__(self, "model_tags", have + [t for t in tags if t not in have])

    # --- merging -------------------------------------------------------------------------------------------------
    def merge_and_unload(self, adapter_names: list[str] | None = None, safe_merge: bool = False,
                         progressbar: bool = False):
        """A NEW module with the adapter folded in: `self.merge(name)` (a MergedModule) for the one adapter in
        `adapter_names` (default: the active one). PEFT merges in place and returns its changed base model; here this
        module and the user's model stay as they were. Merging always checks that the weights stay finite (PEFT's
        safe_merge), and `progressbar` is accepted and ignored. Several adapters at once: MergeError (combine them
        with add_weighted_adapter(..., combination_type="cat") and merge that)."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if len(names) != 1:
            raise MergeError(f"merge_and_unload folds one adapter into the weights, got adapter_names={names}; "
                             "make one adapter of several with add_weighted_adapter(adapters, weights, name, "
                             "combination_type='cat') and merge_and_unload([name])")
        return self.merge(names[0])

    def unload(self) -> nn.Module:
        """The base model without adapters: the user's own model (as `get_base_model()`). PEFT removes its adapter
        layers in place and returns that model; peftc never put any there, so nothing is removed and this module
        keeps its adapters."""
        return self.base_model

    def merge_adapter(self, *args, **kwargs):
        raise MergeError("merge_adapter() merges in place in PEFT; a PeftModule never changes its weights: use "
                         "pm.merge(adapter_name) (or merge_and_unload()), which returns a new merged module and "
                         "leaves this one unmerged")

    def unmerge_adapter(self, *args, **kwargs):
        raise MergeError("unmerge_adapter() undoes an in-place merge in PEFT; a PeftModule is never merged in place, "
                         "so there is nothing to undo: keep using this module, and use pm.merge() for a merged copy")

    # --- status --------------------------------------------------------------------------------------------------
    def get_layer_status(self) -> list[LayerStatus]:
        """One LayerStatus per adapted layer, in graph order (PEFT's get_layer_status). `merged_adapters` is always
        [] (merge() makes a new module); `enabled` is False inside disable_adapter()."""
        enabled = not getattr(self, "_disabled", 0)
        paths: dict[str, str] = {}          # layer path -> PEFT's path of it
        for a in self.adapters:
            ad = self.store[a]
            for t in ad.targets:
                paths.setdefault(t, ad.peft_paths.get(t, t))
        out = []
        order = {p: i for i, p in enumerate(self.sites)}      # the graph's order (PEFT's: the modules')
        for path, peft_path in sorted(paths.items(), key=lambda kv: order.get(kv[0], len(order))):
            names = sorted(a for a in self.adapters if path in self.store[a].targets)
            held = {a: self.store[a].sites[site_key(path)] for a in names}
            kind = self.sites[path].kind
            peft_type = self.store[names[0]].method.peft_type.lower()
            out.append(LayerStatus(
                name=f"model.{peft_path}", module_type=f"{peft_type}.{_LAYER_CLASS.get(kind, kind)}", enabled=enabled,
                active_adapters=self.active_adapters, merged_adapters=[],
                requires_grad={a: _agree(p.requires_grad for p in held[a].parameters()) for a in names},
                available_adapters=names,
                devices={a: sorted({t.device.type for t in (*held[a].parameters(), *held[a].buffers())})
                         for a in names},
                quantization_backend=_QUANT_BACKEND.get(kind)))
        return out

    def get_model_status(self) -> ModelStatus:
        """The model-wide summary of get_layer_status (PEFT's get_model_status): a field is "irregular" where layers
        disagree. trainable_params counts every adapter's trainable parameters, as PEFT does."""
        layers = self.get_layer_status()
        _, total = self.get_nb_trainable_parameters()
        trainable = sum(p.numel() for a in self.adapters for p in self.store[a].parameters() if p.requires_grad)
        grads, devices = collections.defaultdict(list), collections.defaultdict(set)
        for s in layers:
            for a, v in s.requires_grad.items():
                grads[a].append(v)
            for a, v in s.devices.items():
                devices[a].update(v)
        active = _agree(tuple(s.active_adapters) for s in layers)
        return ModelStatus(
            base_model_type=self.model_class, adapter_model_type=type(self).__name__,
            peft_types={a: self.store[a].method.peft_type for a in self.adapters},
            trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
            enabled=_agree(s.enabled for s in layers),
            active_adapters=list(active) if active != "irregular" else active, merged_adapters=[],
            requires_grad={a: _agree(v) for a, v in grads.items()},
            available_adapters=sorted({a for s in layers for a in s.available_adapters}),
            devices={a: sorted(v) for a, v in devices.items()},
            quantization_backend=_agree(s.quantization_backend for s in layers))

    # --- training helpers ----------------------------------------------------------------------------------------
    def enable_input_require_grads(self) -> None:
        """HF's enable_input_require_grads: what the embedding computes requires grad, so that reentrant gradient
        checkpointing over frozen embeddings still backpropagates into the adapters. The traced graph calls the
        embedding as an op, not a module, so the hook sits where its output enters the first block of each stack
        of blocks (`model.layers.0`, ...): a forward pre-hook that gives the block's floating-point inputs that need
        no grad a grad (on the module at that path when this runs, or when checkpointing is switched: wrap the
        blocks yourself only before calling this). A single-adapter call passes the adapter's weights into the
        blocks, so it trains under reentrant checkpointing even without this; a mixed batch (per-row adapters, read
        from the store inside the blocks) needs it."""
        object.__setattr__(self, "_input_grads", True)
        self._place_input_grad_hooks()

    def disable_input_require_grads(self) -> None:
        """Remove the hooks of enable_input_require_grads."""
        object.__setattr__(self, "_input_grads", False)
        self._place_input_grad_hooks()

    def _first_blocks(self) -> list[str]:
        """The path of the first block of each stack (the first item of each ModuleList of blocks)."""
        firsts: dict[str, str] = {}
        for path in self._blocks:
            firsts.setdefault(path.rpartition(".")[0], path)
        return list(firsts.values())

    def _place_input_grad_hooks(self) -> None:
        for h in getattr(self, "_input_grad_handles", ()):
            h.remove()
        handles = []
        if getattr(self, "_input_grads", False):
            handles = [self.graph_module.get_submodule(p).register_forward_pre_hook(_inputs_require_grad)
                       for p in self._first_blocks()]
        object.__setattr__(self, "_input_grad_handles", handles)

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(self._blocks)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the blocks run under activation checkpointing (gradient_checkpointing_enable)."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        return any(isinstance(parent._modules[leaf], CheckpointWrapper)
                   for parent, leaf in map(self._slot, self._blocks))

    @property
    def is_activation_checkpointing(self) -> bool:
        """transformers 5's name of is_gradient_checkpointing."""
        return self.is_gradient_checkpointing

    def _slot(self, path: str) -> tuple[nn.Module, str]:
        parent, _, leaf = path.rpartition(".")
        return (self.graph_module.get_submodule(parent) if parent else self.graph_module), leaf

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """As transformers': every block (peftc.Block, e.g. `model.layers.0`) runs under
        torch.utils.checkpoint.checkpoint(..., **gradient_checkpointing_kwargs) (default use_reentrant=False, as
        transformers 5), so its activations are recomputed in backward; gradients are unchanged. `every_n_layers`
        (transformers 5.2x): only blocks 0, n, 2n, ... (counted over all blocks in order) are checkpointed;
        `offload`: the activations saved for the recompute are held on the CPU (torch's save_on_cpu). On a model
        whose main input is input_ids it also calls enable_input_require_grads(), as transformers does."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
        if not self._blocks:
            raise InputError(f"{self.model_class or 'this model'} has no repeated blocks (layers in an nn.ModuleList) "
                             "to checkpoint")
        if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
            raise InputError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.gradient_checkpointing_disable()
        impl = CheckpointImpl.REENTRANT if kwargs["use_reentrant"] else CheckpointImpl.NO_REENTRANT
        fn = functools.partial(_offloaded_checkpoint if offload else torch.utils.checkpoint.checkpoint, **kwargs)
        for i, (path, block) in enumerate(self._blocks.items()):
            if i % every_n_layers:
                continue
            parent, leaf = self._slot(path)
            parent._modules[leaf] = checkpoint_wrapper(block, checkpoint_impl=impl, checkpoint_fn=fn)
        if self.main_input_name == "input_ids":
            object.__setattr__(self, "_input_grads", True)
        self._place_input_grad_hooks()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5's name (what HF Trainer calls): gradient_checkpointing_enable."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        """Undo gradient_checkpointing_enable: the blocks run plainly again."""
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        for path, block in self._blocks.items():
            parent, leaf = self._slot(path)
            if isinstance(parent._modules[leaf], CheckpointWrapper):
                parent._modules[leaf] = block
        self._place_input_grad_hooks()

    activation_checkpointing_disable = gradient_checkpointing_disable


def _offloaded_checkpoint(function, *args, **kwargs):
    """torch.utils.checkpoint.checkpoint with what it saves held in host memory (transformers' offload=True)."""
    pin = torch.cuda.is_available() or torch.xpu.is_available()
    with torch.autograd.graph.save_on_cpu(pin_memory=pin):
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


def _inputs_require_grad(module, args):
    """Forward pre-hook: floating-point tensor inputs that need no grad get one (as new leaves: no graph is cut,
    since they had none). 0-dim inputs (a routed adapter's scale or dropout rate, read as numbers) are left alone."""
    if not torch.is_grad_enabled():
        return None
    return tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 and a.dim() > 0 and not a.requires_grad else a for a in args)
