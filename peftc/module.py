"""PeftModule: the rewritten graph, its adapter store and the model's config, called like the model itself."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from .errors import MergeError
from .graph_model import GraphModel
from .store import STORE, AdapterStore
from .trace import Traced

log = logging.getLogger(__name__)


class PeftModule(GraphModel):
    """An adapted model. Takes the model's own arguments (plus `labels`) and returns the model's own output type.

    Base weights are shared with the user's model, frozen; adapter weights live in `self.store`.
    """

    def __init__(self, traced: Traced, store: AdapterStore, *, base_model: nn.Module, sites: dict,
                 loss_type: str | None = None, base_name: str | None = None):
        super().__init__(traced, config=getattr(base_model, "config", None), loss_type=loss_type,
                         model_class=type(base_model).__name__, base_name=base_name)
        self.sites = sites
        self.active_adapter = store.names()[0] if store.names() else None
        # The user's model, not registered as a submodule: export_merged reads its state dict (key names, tied
        # weights, tensors the graph never reads). Its weights are the ones the graph shares anyway.
        object.__setattr__(self, "base_model", base_model)

    @property
    def store(self) -> AdapterStore:
        return getattr(self.graph_module, STORE)

    @property
    def adapters(self) -> list[str]:
        return self.store.names()

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

    # --- merging and export ----------------------------------------------------------------------------------------
    def merge(self, adapter_name: str | None = None) -> "MergedModule":
        """A new module with the adapter (the active one, or `adapter_name`) folded into the weights: its graph has
        the base model's ops only. This PeftModule is not changed, so the unmerged model stays exact."""
        from .passes.merge import merge_graph_module

        name = adapter_name or self.active_adapter
        if name not in self.adapters:
            raise MergeError(f"no adapter named {name!r}; adapters: {self.adapters}")
        gm = merge_graph_module(self.graph_module, self.sites, self.store[name], name)
        merged = MergedModule(dataclasses.replace(self._traced, gm=gm), config=self.config, loss_type=self.loss_type,
                              model_class=self.model_class, base_name=self.base_name)
        return merged.train(self.training)

    def export(self, path, *, merged: bool = True, adapter_name: str | None = None) -> Path:
        """Write a torch.export program (.pt2) with dynamic batch and sequence: the merged graph, or with
        merged=False the adapted graph. Load it with torch.export.load(path).module()."""
        from .export import export_program

        module = self.merge(adapter_name) if merged else self
        return export_program(module, path)

    def extra_repr(self) -> str:
        return f"model={self.model_class}, adapters={self.adapters}, active={self.active_adapter!r}"


class MergedModule(GraphModel):
    """A model with an adapter folded into its weights (from PeftModule.merge): same inputs and output types as the
    PeftModule it came from, the base model's ops and cost."""

    def export(self, path) -> Path:
        """Write a torch.export program (.pt2) with dynamic batch and sequence."""
        from .export import export_program

        return export_program(self, path)

    def extra_repr(self) -> str:
        return f"model={self.model_class}, merged"
