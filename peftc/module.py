"""PeftModule: the rewritten graph, its adapter store and the model's config, called like the model itself."""
from __future__ import annotations

import copy
import inspect
import logging
import types
from typing import Any, Iterator

import torch
from torch import nn

from .errors import InputError
from .loss import compute_loss
from .store import STORE, AdapterStore
from .trace import Traced

log = logging.getLogger(__name__)


class PeftModule(nn.Module):
    """An adapted model. Takes the model's own arguments (plus `labels`) and returns the model's own output type.

    Base weights are shared with the user's model, frozen; adapter weights live in `self.store`.
    """

    def __init__(self, traced: Traced, store: AdapterStore, *, config: Any = None, loss_type: str | None = None,
                 model_class: str = "", base_name: str | None = None, sites: dict | None = None):
        super().__init__()
        self.graph_module = traced.gm
        self._traced = traced
        self.config = copy.deepcopy(config)      # never the user's object: losses may set config.problem_type
        self.loss_type = loss_type
        self.model_class = model_class
        self.base_name = base_name
        self.sites = sites or {}
        self.active_adapter = store.names()[0] if store.names() else None
        self.main_input_name = (traced.input_names or ("input_ids",))[0]
        self.forward = types.MethodType(_forward_with_signature(self.input_names), self)

    @property
    def store(self) -> AdapterStore:
        return getattr(self.graph_module, STORE)

    @property
    def input_names(self) -> list[str]:
        """The inputs the graph was traced with (constants such as use_cache=False left out)."""
        return [n for n in self._traced.input_names if n not in self._traced.constants]

    @property
    def adapters(self) -> list[str]:
        return self.store.names()

    # --- calling -----------------------------------------------------------------------------------------------
    def forward(self, *args, labels: torch.Tensor | None = None, return_dict: bool | None = None,
                num_items_in_batch: Any = None, **kwargs):
        t = self._traced
        if t.positional:
            if kwargs:
                raise InputError(f"this PeftModule was traced with positional inputs; got keyword inputs {sorted(kwargs)}")
            out = self.graph_module(*args)
        else:
            if args:
                if len(args) > len(t.input_names):
                    raise InputError(f"expected at most {len(t.input_names)} positional inputs "
                                     f"({', '.join(t.input_names)}), got {len(args)}")
                kwargs.update(zip(t.input_names, args))
            out = self.graph_module(**self._complete(kwargs))
        if labels is not None:
            loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            out = self._with_loss(out, labels, loss_kwargs)
        if return_dict is False and hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out

    def _complete(self, kwargs: dict) -> dict:
        t = self._traced
        unknown = [k for k in kwargs if k not in t.input_names]
        for k in list(unknown):
            if k in t.constants and kwargs[k] == t.constants[k]:
                unknown.remove(k)
            elif kwargs[k] is None:   # an optional input left at its default
                unknown.remove(k)
                kwargs.pop(k)
        if unknown:
            raise InputError(
                f"unexpected input(s) {unknown}: this PeftModule was traced with inputs {self.input_names}. "
                "Pass example_inputs=... to peftc.compile with these inputs included to trace them."
            )
        full = {}
        for name in t.input_names:
            if name in t.constants:
                full[name] = t.constants[name]
            elif kwargs.get(name) is not None:
                full[name] = kwargs[name]
            elif name in t.defaults:
                full[name] = t.defaults[name](kwargs)
            else:
                raise InputError(f"missing input {name!r}; this PeftModule takes {self.input_names}")
        return full

    def _with_loss(self, out, labels: torch.Tensor, loss_kwargs: dict):
        if self.loss_type is None:
            raise InputError(
                f"labels were given, but peftc does not know the loss of {self.model_class or 'this model'}; "
                "call without labels and compute the loss from the outputs"
            )
        logits = out["logits"] if isinstance(out, dict) else out.logits
        loss = compute_loss(self.loss_type, self.config, logits, labels, **loss_kwargs)
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})

    # --- parameters ----------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters a fine-tune updates (adapter weights and modules_to_save copies)."""
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them (shared tensors once)."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- checkpoints -----------------------------------------------------------------------------------------------
    def save_adapter(self, directory, adapter_name: str | None = None) -> None:
        """Write adapter_config.json + adapter_model.safetensors in PEFT's format (atomically)."""
        from .checkpoint import save_adapter

        save_adapter(self, directory, adapter_name or self.active_adapter)

    save_pretrained = save_adapter

    def extra_repr(self) -> str:
        return f"model={self.model_class}, adapters={self.adapters}, active={self.active_adapter!r}"


def _forward_with_signature(input_names: list[str]):
    """PeftModule.forward with the traced inputs spelled out in its signature: HF Trainer (and other tools) read the
    signature to decide which batch columns to keep."""

    def forward(self, *args, **kwargs):
        return PeftModule.forward(self, *args, **kwargs)

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in input_names]
    params += [P(n, P.KEYWORD_ONLY, default=None) for n in ("labels", "return_dict", "num_items_in_batch")]
    params.append(P("kwargs", P.VAR_KEYWORD))
    forward.__signature__ = inspect.Signature(params)
    forward.__doc__ = PeftModule.forward.__doc__
    return forward
