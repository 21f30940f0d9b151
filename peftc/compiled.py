"""CompiledPeftModule: a PeftModule under torch.compile (fullgraph), with the PeftModule's methods on it."""
from __future__ import annotations

import weakref
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
        object.__setattr__(self, "_compile_args", dict(backend=backend, fullgraph=True, **compile_kwargs))
        object.__setattr__(self, "_decoder_graphs", weakref.WeakKeyDictionary())

    def forward(self, *args, **kwargs):
        return self.compiled(*args, **kwargs)

    def generate(self, input_ids=None, attention_mask=None, *, generation_config=None, streamer=None,
                 generator=None, adapter_names=None, **kwargs):
        """PeftModule.generate with its prefill and decode graphs under torch.compile (this module's backend), each
        compiled once per graph: routes are data, so switching adapters or mixing them per row never recompiles."""
        return self.peft._generate(input_ids, attention_mask, generation_config=generation_config,
                                   streamer=streamer, generator=generator, adapter_names=adapter_names,
                                   wrap=self._compiled_graph, **kwargs)

    def _compiled_graph(self, gm):
        compiled = self._decoder_graphs.get(gm)
        if compiled is None:
            compiled = torch.compile(gm, **self._compile_args)
            self._decoder_graphs[gm] = compiled
        return compiled

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["peft"], name)
