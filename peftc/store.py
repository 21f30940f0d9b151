"""The adapter store: every adapter's weights, per adapter and per site, in one module outside the graph."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from .spec import AdapterSpec

STORE = "peftc_store"  # the store's attribute name on the GraphModule


def site_key(path: str) -> str:
    """Module paths contain dots, which module names cannot: model.layers.0.q_proj -> model-layers-0-q_proj."""
    return path.replace(".", "-")


class LoraWeights(nn.Module):
    """One LoRA site of one adapter: A [r, in], B [out, r], the scale and the dropout rate on the site's input."""

    def __init__(self, r: int, in_features: int, out_features: int, scale: float, dropout: float, init,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.scale = float(scale)
        self.p = float(dropout)
        self.reset(init)

    @torch.no_grad()
    def reset(self, init=True) -> None:
        """PEFT's initialisations: True (Kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B), False (both
        random, as nn.Linear initialises them: the adapter is not the identity)."""
        if init == "gaussian":
            nn.init.normal_(self.A, std=1 / self.A.shape[0])
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.B)


class Adapter(nn.Module):
    """One named adapter: its spec, its sites' weights and its trainable copies of modules_to_save."""

    def __init__(self, spec: AdapterSpec, targets: list[str], saved_modules: list[str]):
        super().__init__()
        self.spec = spec
        self.targets = list(targets)          # module paths of adapted sites, in graph order
        self.saved_modules = list(saved_modules)  # module paths of modules_to_save
        self.sites = nn.ModuleDict()
        self.saved = nn.ModuleDict()          # site_key(module path) -> module holding trainable parameter copies


BASE = "__base__"  # slot 0: no adapter (PEFT's name for it in adapter_names)
ROWS_CAPACITY = 1024  # rows of a mixed-adapter batch; a larger batch reallocates (one recompile under torch.compile)


class AdapterStore(nn.Module):
    """Every adapter's state, and which adapter applies, as data.

    adapters[name].sites[site_key(path)] -> LoraWeights; adapters[name].saved[site_key(path)] -> param copies.
    Slots: 0 is the base model, then the adapters in insertion order. The graph reads the routing from buffers:
    `active` (0-dim slot index) for the whole batch, or `rows[:batch]` per row when `mixed` is set; switching
    adapters therefore writes data and never changes the graph.
    """

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.banks = nn.ModuleDict()          # site_key -> per-site constants of the routed subgraph (passes.lora)
        self.register_buffer("active", torch.tensor(0), persistent=False)
        self.register_buffer("mixed", torch.tensor(False), persistent=False)
        self.register_buffer("rows", torch.zeros(ROWS_CAPACITY, dtype=torch.long), persistent=False)

    def add(self, name: str, adapter: Adapter) -> None:
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        del self.adapters[name]

    def slots(self) -> list[str]:
        return [BASE, *self.adapters]

    def slot(self, name: str) -> int:
        return self.slots().index(name)

    def __getitem__(self, name: str) -> Adapter:
        return self.adapters[name]

    def names(self) -> list[str]:
        return list(self.adapters)

    def peft_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's checkpoint key names (adapter name stripped)."""
        return {k: p.detach() for k, p in self.peft_parameters(name)}

    def peft_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        ad = self.adapters[name]
        for path in ad.targets:
            w = ad.sites[site_key(path)]
            yield f"base_model.model.{path}.lora_A.weight", w.A
            yield f"base_model.model.{path}.lora_B.weight", w.B
        for path in ad.saved_modules:
            for pname, p in ad.saved[site_key(path)].named_parameters():
                yield f"base_model.model.{path}.{pname.replace('-', '.')}", p
