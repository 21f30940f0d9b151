"""CompiledPeftModule: a PeftModule under torch.compile whose routing always enters as a tensor, so switching
adapters, disabling them and per-row adapter names never recompile."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .module import PeftModule


class CompiledPeftModule(nn.Module):
    """`torch.compile(pm, fullgraph=True)` behind a thin eager shell: the shell turns `adapter_names` (Python
    strings, which torch.compile would specialize on) or the active adapter into a per-row slot tensor, and the
    compiled graph reads only tensors. Other attributes (set_adapter, add_adapter, save_adapter, merge, ...) are the
    PeftModule's; adding or deleting an adapter changes the graph and recompiles once."""

    def __init__(self, pm: PeftModule, *, backend: str = "inductor", **compile_kwargs: Any):
        super().__init__()
        self.peft = pm
        self.compiled = torch.compile(pm, backend=backend, fullgraph=True, **compile_kwargs)

    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        pm = self.peft
        if adapter_names is None:
            batch = pm._batch_size(args, kwargs)
            rows = pm.store.active.repeat(batch)          # contiguous, like an adapter_index tensor
            return self.compiled(*args, adapter_index=rows, **kwargs)
        rows = pm.adapter_index(adapter_names)
        with torch.no_grad():                              # the batch's whole-batch slot (modules_to_save), as data
            pm.store.active.fill_(pm.call_slot(adapter_names))
        try:
            return self.compiled(*args, adapter_index=rows, **kwargs)
        finally:
            pm._sync_active()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["peft"], name)
