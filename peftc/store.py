"""The adapter store: every adapter's weights, per adapter and per site, in one module outside the graph."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import torch
from torch import nn

from .errors import SpecError
from .inits import orthogonal_init, residual_init
from .spec import AdapterSpec

STORE = "peftc_store"  # the store's attribute name on the GraphModule


def site_key(path: str) -> str:
    """Module paths contain dots, which module names cannot: model.layers.0.q_proj -> model-layers-0-q_proj."""
    return path.replace(".", "-")


class LoraWeights(nn.Module):
    """One LoRA site of one adapter: A [r, in], B [out, r], the scale and the dropout rate on the site's input.

    With a declared capacity (AdapterStore.capacity) the Parameters are allocated at the capacity's rank, zero past
    the adapter's own r: every slot then has the same shapes, so an adapter can take a slot without a recompile.
    The pads get zero gradients (B's pad columns meet A's zero pad rows), so training leaves them zero. `A_r` and
    `B_r` are the adapter's own weights (views), what checkpoints, merging and combinations read."""

    def __init__(self, r: int, in_features: int, out_features: int, scale: float, dropout: float, init,
                 dtype: torch.dtype, device: torch.device, *, rank: int | None = None, dora: bool = False,
                 bias: bool = False):
        super().__init__()
        alloc = r if rank is None else rank
        self.r = r
        self.A = nn.Parameter(torch.zeros(alloc, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, alloc, dtype=dtype, device=device))
        self.scale = float(scale)
        self.p = float(dropout)
        # the same as 0-dim tensors: what a call of the plain-form graph passes in (data, so adapters switch freely)
        self.register_buffer("scale_t", torch.tensor(self.scale, dtype=dtype, device=device), persistent=False)
        self.register_buffer("p_t", torch.tensor(self.p, dtype=dtype, device=device), persistent=False)
        # DoRA: the trained magnitude per output channel (set from the site's weight when built), and the flag a
        # call passes in (1: DoRA; a plain adapter routes 0 where the graph has DoRA's subgraph)
        self.magnitude = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device)) if dora else None
        self.register_buffer("d_t", torch.tensor(float(dora), dtype=dtype, device=device), persistent=False)
        # lora_bias: B's own bias (PEFT's lora_B.bias), y + s (B A x + B_bias)
        self.B_bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("residual", None, persistent=False)   # PiSSA / OLoRA: the base weight it runs on
        if r:
            self.reset(init)

    @torch.no_grad()
    def set_residual_init(self, init: str, weight: torch.Tensor, conv1d: bool) -> None:
        """PiSSA / OLoRA (peftc.inits.residual_init): A and B from `weight` (the site's, in its own layout) and the
        residual weight, which the adapter's calls read instead of it (a frozen buffer in the same layout).
        "pissa_niter_N" draws its random projection from seed 0 (not the caller's generator), so that loading a
        saved adapter rebuilds the same residual; PEFT draws it from the global generator on every load."""
        w = weight.t() if conv1d else weight
        if init.startswith("pissa_niter_"):   # the randomized SVD from a fixed seed: a reload gives the same residual
            devices = [w.device] if w.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                A, B, res = residual_init(init, w, self.r, self.scale)
        else:
            A, B, res = residual_init(init, w, self.r, self.scale)
        self.A_r.copy_(A)
        self.B_r.copy_(B)
        self.register_buffer("residual", (res.t() if conv1d else res).contiguous(), persistent=False)

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def A_r(self) -> torch.Tensor:
        return self.A if self.A.shape[0] == self.r else self.A[: self.r]

    @property
    def B_r(self) -> torch.Tensor:
        return self.B if self.B.shape[1] == self.r else self.B[:, : self.r]

    @torch.no_grad()
    def reset(self, init=True) -> None:
        """PEFT's initialisations: True (Kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B), False (both
        random, as nn.Linear initialises them: the adapter is not the identity), "orthogonal" (peftc.inits). PiSSA
        and OLoRA need the site's weight: set_residual_init writes them."""
        A, B = self.A_r, self.B_r
        if init == "orthogonal":
            a, b = orthogonal_init(A.shape[1], B.shape[0], self.r, dtype=A.dtype, device=A.device)
            A.copy_(a)
            B.copy_(b)
            return
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            if self.B_bias is not None:        # as nn.Linear(r, out) initialises its bias
                nn.init.uniform_(self.B_bias, -1 / math.sqrt(self.r), 1 / math.sqrt(self.r))
        else:
            nn.init.zeros_(B)
            if self.B_bias is not None:
                nn.init.zeros_(self.B_bias)

    def padded(self, rank: int) -> "LoraWeights":
        """A copy allocated at `rank` (same weights, zero pads, same requires_grad)."""
        new = LoraWeights(0, self.A.shape[1], self.B.shape[0], self.scale, self.p, True, dtype=self.A.dtype,
                          device=self.A.device, rank=rank, dora=self.dora, bias=self.B_bias is not None)
        new.r = self.r
        with torch.no_grad():
            new.A_r.copy_(self.A_r)
            new.B_r.copy_(self.B_r)
            if self.dora:
                new.magnitude.copy_(self.magnitude)
            if self.B_bias is not None:
                new.B_bias.copy_(self.B_bias)
        if self.residual is not None:
            new.register_buffer("residual", self.residual, persistent=False)
        new.requires_grad_(self.A.requires_grad)
        return new


def zero_weights(rank: int, in_f: int, out_f: int, dtype, device) -> "LoraWeights":
    """Frozen zero LoraWeights at `rank` (r = 0): a site or slot with no adapter."""
    w = LoraWeights(0, in_f, out_f, 0.0, 0.0, True, dtype=dtype, device=device, rank=rank)
    return w.requires_grad_(False)


class Adapter(nn.Module):
    """One named adapter: its spec, its sites' weights and its trainable copies of modules_to_save."""

    def __init__(self, spec: AdapterSpec, targets: list[str], saved_modules: list[str]):
        super().__init__()
        self.spec = spec
        self.targets = list(targets)          # module paths of adapted sites, in graph order
        self.saved_modules = list(saved_modules)  # module paths of modules_to_save
        self.sites = nn.ModuleDict()
        self.saved = nn.ModuleDict()          # site_key(module path) -> module holding trainable parameter copies

    @property
    def max_rank(self) -> int:
        """The largest rank among its sites (per-site ranks differ with rank_pattern)."""
        return max((w.r for w in self.sites.values()), default=1)


BASE = "__base__"  # slot 0: no adapter (PEFT's name for it in adapter_names)


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Room declared for adapters (PeftModule.reserve): up to `adapters` adapters of rank up to `rank`, on the
    graph's routed sites (those of the adapters present, plus `targets`, in LoRA's target syntax). Within it,
    adding, loading and deleting adapters writes data and never changes the graph."""

    adapters: int
    rank: int
    targets: Any = None

    def __post_init__(self):
        for field in ("adapters", "rank"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise SpecError(f"Capacity {field} must be a positive integer, got {v!r}")


class AdapterStore(nn.Module):
    """Every adapter's state, and which adapter applies, as data.

    adapters[name].sites[site_key(path)] -> LoraWeights; adapters[name].saved[site_key(path)] -> param copies.
    Slots: 0 is the base model, then the adapters in insertion order. With a capacity the slots are fixed (None
    when empty) and lanes[str(slot)][site_key] holds each slot's weights at the capacity's rank: the adapter's own
    LoraWeights (the same module as in adapters[name].sites), or zeros where the slot is empty or its adapter does
    not target the site. The graph reads the lanes, so filling and emptying slots never changes it.

    The store holds no per-call state: a call passes its adapter's weights (plain form) or its rows' slots
    (gathered form) to the graph as its own inputs (passes.route), so concurrent calls never see each other.
    """

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.banks = nn.ModuleDict()          # site_key -> per-site constants of the gathered form (passes.lora)
        self.groups = nn.ModuleDict()         # call modules of the plain form's site groups (passes.lora_ops)
        self.lanes = nn.ModuleDict()          # with a capacity: str(slot) -> site_key -> LoraWeights
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
            lane = self._lane(slot)
            for key, w in adapter.sites.items():   # fresh zeros: the old weights stay the old adapter's alone
                lane[key] = zero_weights(self.capacity.rank, w.A.shape[1], w.B.shape[0], w.A.dtype, w.A.device)
        return slot

    def _lane(self, slot: int) -> nn.ModuleDict:
        if str(slot) not in self.lanes:
            self.lanes[str(slot)] = nn.ModuleDict()
        return self.lanes[str(slot)]

    def _fill_lane(self, slot: int, adapter: Adapter) -> None:
        """Allocate `adapter`'s weights at the capacity's rank and make them slot `slot`'s lane entries."""
        lane = self._lane(slot)
        for key, w in adapter.sites.items():
            padded = w.padded(self.capacity.rank)
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
        """Fix the slot table at `capacity` and allocate every adapter at its rank in its lane (new Parameters)."""
        names = self.names()
        self.capacity = capacity
        self.reserved_sites = list(reserved_sites)
        self._slots = [BASE, *names] + [None] * (capacity.adapters - len(names))
        self.lanes = nn.ModuleDict()
        for slot, name in enumerate(names, start=1):
            self._fill_lane(slot, self.adapters[name])

    def lane_weights(self, slot: int, key: str, in_f: int, out_f: int, dtype, device) -> LoraWeights:
        """Slot `slot`'s weights at site `key`, zeros made on first use (a capacity's empty slots and untargeted
        sites)."""
        lane = self._lane(slot)
        if key not in lane:
            lane[key] = zero_weights(self.capacity.rank, in_f, out_f, dtype, device)
        return lane[key]

    def routed_sites(self) -> set[str]:
        """Module paths the graph routes: every adapter's targets and the capacity's reserved sites."""
        return set(self.reserved_sites).union(*(ad.targets for ad in self.adapters.values()))

    def slots(self) -> list[str | None]:
        return list(self._slots)

    def slot(self, name: str) -> int:
        return self._slots.index(name)

    @torch.no_grad()
    def point_slot(self, slot: int) -> None:
        """Write slot `slot`'s routed data at every site of the gathered form: its adapter's scale and dropout
        rate; zeros where the slot is empty or its adapter does not target the site. The plain form's groups learn
        whether any adapter now has dropout there."""
        name = self._slots[slot]
        for key, bank in self.banks.items():
            w = self.adapters[name].sites[key] if name is not None and key in self.adapters[name].sites else None
            bank.scales[slot] = w.scale if w is not None else 0.0
            if hasattr(bank, "dropout"):
                bank.dropout.set_rate(slot, w.p if w is not None else 0.0)
        for group in self.groups.values():
            group.live = self.dropout_live(group.paths)

    def dora_at(self, path: str) -> bool:
        """Whether any adapter is DoRA at module path `path` (the graph then has DoRA's rescale there)."""
        key = site_key(path)
        return any(ad.sites[key].dora for ad in self.adapters.values() if key in ad.sites)

    def lora_bias_at(self, path: str) -> bool:
        """Whether any adapter has a lora_bias at module path `path` (the graph then adds it there)."""
        key = site_key(path)
        return any(ad.sites[key].B_bias is not None for ad in self.adapters.values() if key in ad.sites)

    def residual_at(self, path: str) -> bool:
        """Whether any adapter runs on its own residual base weight at `path` (PiSSA / OLoRA)."""
        key = site_key(path)
        return any(ad.sites[key].residual is not None for ad in self.adapters.values() if key in ad.sites)

    def dropout_live(self, paths: list[str]) -> bool:
        """Whether any adapter has a dropout rate at one of the module paths `paths`."""
        keys = [site_key(p) for p in paths]
        return any(ad.sites[k].p > 0 for ad in self.adapters.values() for k in keys if k in ad.sites)

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
            yield f"base_model.model.{path}.lora_A.weight", w.A_r
            yield f"base_model.model.{path}.lora_B.weight", w.B_r
            if w.B_bias is not None:
                yield f"base_model.model.{path}.lora_B.bias", w.B_bias
            if w.dora:
                yield f"base_model.model.{path}.lora_magnitude_vector", w.magnitude
        for path in ad.saved_modules:
            for pname, p in ad.saved[site_key(path)].named_parameters():
                yield f"base_model.model.{path}.{pname.replace('-', '.')}", p
