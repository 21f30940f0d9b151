"""CompiledPeftModule: a PeftModule under torch.compile (fullgraph), with the PeftModule's methods on it."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .module import PeftModule


class CompiledPeftModule(nn.Module):
    """`torch.compile(pm, fullgraph=True)`, plus pm's attributes (set_adapter, add_adapter, save_adapter, merge,
    ...). Routing is data, so switching adapters, disabling them, per-row `adapter_names`/`adapter_index` and new
    weights in an adapter never recompile; adding or deleting an adapter changes the graph and compiles it once."""

    def __init__(self, pm: PeftModule, *, backend: str = "inductor", **compile_kwargs: Any):
        super().__init__()
        self.peft = pm
        self.compiled = torch.compile(pm, backend=backend, fullgraph=True, **compile_kwargs)

    def forward(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["peft"], name)
