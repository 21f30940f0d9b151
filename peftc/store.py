"""The adapter store: every adapter's weights, per adapter and per site, in one module outside the graph.

The store knows adapters, slots and a capacity's lanes; what a site's weights are is each method's own business (its
pass file builds them and reads them; a capacity's lanes are made by its Method's pad and empty). The store holds
data only: the modules a form's graph calls belong to that graph (peftc.pipeline.emit)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import SpecError
from .methods import method_of
from .spec import AdapterSpec

STORE = "peftc_store"  # the store's attribute name on the GraphModule


def site_key(path: str) -> str:
    """Module paths contain dots, which module names cannot: model.layers.0.q_proj -> model-layers-0-q_proj."""
    return path.replace(".", "-")


class Adapter(nn.Module):
    """One named adapter: its spec, its sites' weights and its trainable copies of modules_to_save."""

    def __init__(self, spec: AdapterSpec, targets: list[str], saved_modules: list[str]):
        super().__init__()
        self.spec = spec
        self.targets = list(targets)          # module paths of adapted sites, in graph order
        self.saved_modules = list(saved_modules)  # module paths of modules_to_save, then of trained biases
        self.sites = nn.ModuleDict()
        self.saved = nn.ModuleDict()          # site_key(module path) -> module holding trainable parameter copies
        self.peft_paths: dict[str, str] = {}  # target -> PEFT's module path, for targets chosen by target_parameters
        self.tokens = nn.ModuleDict()         # site_key(module path) -> its trained embedding rows (TokenRows)

    @property
    def method(self):
        return method_of(self.spec)


BASE = "__base__"  # slot 0: no adapter (PEFT's name for it in adapter_names)


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Room declared for adapters (PeftModule.reserve): up to `adapters` adapters on the graph's routed sites
    (those of the adapters present, plus `targets`, in LoRA's target syntax), each method's within its own terms:
    `rank` is LoRA's (the largest rank a LoRA adapter may have; methods without a rank, IA3, ignore it). Within
    it, adding, loading and deleting adapters writes data and never changes the graph."""

    adapters: int
    rank: int | None = None
    targets: Any = None

    def __post_init__(self):
        for field in ("adapters", "rank"):
            v = getattr(self, field)
            if field == "rank" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f"Capacity {field} must be a positive integer, got {v!r}")


class AdapterStore(nn.Module):
    """Every adapter's state, and which adapter applies, as data.

    adapters[name].sites[site_key(path)] -> its method's weights at the site (passes.lora: LoraWeights);
    adapters[name].saved[site_key(path)] -> modules_to_save param copies (and trained bias copies, LoRA's bias);
    adapters[name].tokens[site_key(path)] -> trained rows of an embedding (passes.trainable_tokens.TokenRows).
    Slots: 0 is the base model, then the adapters in insertion order. With a capacity the slots are fixed (None
    when empty) and lanes[str(slot)][method tag][site_key] holds each slot's weights at the capacity's size, per
    method (a slot's LoRA and IA3 lanes never mix; `lane_target`): the adapter's own
    (the same module as in adapters[name].sites, made by its method's pad), or weights that change nothing (its
    method's empty) where the slot is empty or its adapter does not adapt the site. The graph reads the lanes, so
    filling and emptying slots never changes it.

    The store holds no per-call state: a call passes its adapter's weights (plain form) or its rows' slots
    (gathered form) to the graph as its own inputs (passes.route), so concurrent calls never see each other.
    """

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.lanes = nn.ModuleDict()          # with a capacity: str(slot) -> site_key -> site weights
        self.capacity: Capacity | None = None
        self.reserved_sites: list[str] = []   # module paths routed besides the adapters' own targets
        self._slots: list[str | None] = [BASE]

    def add(self, name: str, adapter: Adapter) -> int:
        """Put `adapter` in the first free slot (appended without a capacity); returns the slot."""
        if self.capacity is None:
            self._slots.append(name)
        else:
            if None not in self._slots:
                raise AssertionError("no free slot; check free_slots() first")
            self._slots[self._slots.index(None)] = name
            self._fill_lane(self._slots.index(name), adapter)
        self.adapters[name] = adapter
        return self._slots.index(name)

    def remove(self, name: str) -> int:
        """Take `name` out; returns the slot it had (emptied with a capacity, closed up without)."""
        slot = self._slots.index(name)
        adapter = self.adapters[name]
        del self.adapters[name]
        if self.capacity is None:
            del self._slots[slot]
        else:
            self._slots[slot] = None
            if "capacity" not in adapter.method.capabilities:
                return slot
            lane = self._lane(slot, adapter.method.tag)
            empty = adapter.method.empty
            for key, w in adapter.sites.items():   # fresh weights: the old ones stay the old adapter's alone
                lane[key] = empty(w, self.capacity)
        return slot

    def _lane(self, slot: int, tag: str) -> nn.ModuleDict:
        if str(slot) not in self.lanes:
            self.lanes[str(slot)] = nn.ModuleDict()
        if tag not in self.lanes[str(slot)]:
            self.lanes[str(slot)][tag] = nn.ModuleDict()
        return self.lanes[str(slot)][tag]

    def routed_paths(self, method) -> set[str]:
        """Module paths `method`'s rewrite adapts: its adapters' targets, and a capacity's reserved sites where it
        can fill a capacity's lanes."""
        own = set().union(*(ad.targets for ad in self.adapters.values() if ad.method is method))
        if self.capacity is not None and "capacity" in method.capabilities:
            own |= set(self.reserved_sites)
        return own

    def _fill_lane(self, slot: int, adapter: Adapter) -> None:
        """Allocate `adapter`'s weights at the capacity's size (its method's pad) and make them slot `slot`'s lane
        entries."""
        method = adapter.method
        if "capacity" not in method.capabilities:   # its own weights, no lane: the graph is rebuilt around them
            return
        lane = self._lane(slot, method.tag)
        for key, w in adapter.sites.items():
            padded = method.pad(w, self.capacity)
            adapter.sites[key] = padded
            lane[key] = padded

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def free_slots(self) -> int | None:
        """Free slots left under the capacity, or None without one."""
        return None if self.capacity is None else self._slots.count(None)

    def set_capacity(self, capacity: Capacity, reserved_sites: list[str]) -> None:
        """Fix the slot table at `capacity` and allocate every adapter at its size in its lane (new Parameters)."""
        names = self.names()
        self.capacity = capacity
        self.reserved_sites = list(reserved_sites)
        self._slots = [BASE, *names] + [None] * (capacity.adapters - len(names))
        self.lanes = nn.ModuleDict()
        for slot, name in enumerate(names, start=1):
            self._fill_lane(slot, self.adapters[name])

    def lane_weights(self, slot: int, tag: str, key: str, empty: Callable[[], nn.Module]) -> nn.Module:
        """Slot `slot`'s weights of the method tagged `tag` at site `key`; `empty()` makes them on first use (a
        capacity's empty slots, other methods' adapters and untargeted sites: weights that change nothing)."""
        lane = self._lane(slot, tag)
        if key not in lane:
            lane[key] = empty()
        return lane[key]

    def routed_sites(self) -> set[str]:
        """Module paths the graph routes: every adapter's targets and the capacity's reserved sites."""
        return set(self.reserved_sites).union(*(ad.targets for ad in self.adapters.values()))

    def slots(self) -> list[str | None]:
        return list(self._slots)

    def slot(self, name: str) -> int:
        return self._slots.index(name)

    def __getitem__(self, name: str) -> Adapter:
        return self.adapters[name]

    def names(self) -> list[str]:
        return list(self.adapters)

    def peft_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's checkpoint key names (adapter name stripped)."""
        return {k: p.detach() for k, p in self.peft_parameters(name)}

    def peft_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(PEFT's key, tensor) of every tensor the adapter saves: its method names its site weights' keys."""
        ad = self.adapters[name]
        keys = method_of(ad.spec).peft_keys
        for path in ad.targets:
            for key, t in keys(path, ad.sites[site_key(path)]):
                yield f"base_model.model.{_peft_path(ad, path)}.{key}", t
        yield from self.peft_saved_parameters(name)
        for rows in ad.tokens.values():
            for key, t in rows.peft_keys():
                yield f"base_model.model.{key}", t

    def peft_saved_parameters(self, name: str, paths=None) -> Iterator[tuple[str, nn.Parameter]]:
        """(PEFT's key, tensor) of the adapter's saved copies (modules_to_save, trained biases), of `paths` if given:
        an adapted layer's own tensors (a trained bias) sit at PEFT's base_layer."""
        ad = self.adapters[name]
        for path in ad.saved_modules:
            if paths is not None and path not in paths:
                continue
            at = _peft_path(ad, path)
            owner = f"{at}.base_layer" if path in ad.targets else at
            for pname, p in ad.saved[site_key(path)].named_parameters():
                yield f"base_model.model.{owner}.{pname.replace('-', '.')}", p


def lane_target(slot: int, tag: str, key: str) -> str:
    """The get_attr target of slot `slot`'s lane weights of method `tag` at site `key` (from the graph's root)."""
    return f"{STORE}.lanes.{slot}.{tag}.{key}"


def _peft_path(ad: Adapter, path: str) -> str:
    """Where PEFT puts the layer at `path`: it wraps a targeted attention module (nn.MultiheadAttention) with its
    out_proj inside, so that out_proj sits at <attention>.base_layer.out_proj; a parameter target's wrapper is its
    module's, nested once per later targeted parameter of that module (peftc.param_targets)."""
    if path in ad.peft_paths:
        return ad.peft_paths[path]
    parent, _, leaf = path.rpartition(".")
    return f"{parent}.base_layer.{leaf}" if leaf == "out_proj" and parent in ad.targets else path
