"""LoRA's weights at one site of one adapter (LoraWeights: A, B, scale, dropout rate, and what its variants add),
as the store holds them; their initialisations (passes.lora.inits), padded and empty forms for a capacity."""
from __future__ import annotations

import math

import torch
from torch import nn

from peftc.errors import SpecError

from ..match import Site
from .inits import orthogonal_init, residual_init
from .variants import variants_at


class DropoutRate(nn.Dropout):
    """A LoraWeights' dropout rate seen as an nn.Dropout (PEFT's lora_dropout module), never called: code that sets
    `p` on a model's nn.Dropout modules (TRL's disable_dropout_in_model, DPO's default) sets the adapter's rate, as
    it sets PEFT's. Holds no tensors (nothing in state dicts or checkpoints)."""

    def __init__(self, owner: nn.Module):
        nn.Module.__init__(self)
        object.__setattr__(self, "_owner", owner)     # not a submodule: the owner holds this one
        self.inplace = False

    @property
    def p(self) -> float:
        return self._owner.p

    @p.setter
    def p(self, value: float) -> None:
        if not 0.0 <= float(value) < 1.0:
            raise SpecError(f"LoRA dropout must be in [0, 1), got p={value!r}")
        self._owner.p = float(value)
        with torch.no_grad():
            self._owner.p_t.fill_(float(value))

    def forward(self, x):
        raise RuntimeError("DropoutRate only holds a LoRA site's rate; the graph applies the dropout")


class LoraWeights(nn.Module):
    """One LoRA site of one adapter: A [r, in], B [out, r], the scale and the dropout rate on the site's input.

    With a declared capacity (AdapterStore.capacity) the Parameters are allocated at the capacity's rank, zero past
    the adapter's own r: every slot then has the same shapes, so an adapter can take a slot without a recompile.
    The pads get zero gradients (B's pad columns meet A's zero pad rows), so training leaves them zero. `A_r` and
    `B_r` are the adapter's own weights (views), what checkpoints, merging and combinations read."""

    def __init__(self, r: int, in_features: int, out_features: int, scale: float, dropout: float, init,
                 dtype: torch.dtype, device: torch.device, *, rank: int | None = None, dora: bool = False,
                 bias: bool = False, kind: str = "linear", kernel: tuple = (), groups: int = 1):
        super().__init__()
        alloc = r if rank is None else rank
        if groups > 1 and (alloc % groups or r % groups):
            raise SpecError(f"a rank of {alloc} does not divide into the convolution's {groups} groups")
        self.r = r
        self.kind = kind                     # the site kind (passes.match.KINDS): layout and PEFT's key names
        self.kernel, self.groups = tuple(kernel), groups
        # conv: A [r, in, *kernel] (PEFT's lora_A conv), B [out, r / groups, 1, ...] (its 1x1 lora_B, grouped)
        self.A = nn.Parameter(torch.zeros(alloc, in_features, *self.kernel, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, alloc // groups, *(1,) * len(self.kernel), dtype=dtype,
                                          device=device))
        self.scale = float(scale)
        self.p = float(dropout)
        # the same as 0-dim tensors: what a call of the plain-form graph passes in (data, so adapters switch freely)
        self.register_buffer("scale_t", torch.tensor(self.scale, dtype=dtype, device=device), persistent=False)
        self.register_buffer("p_t", torch.tensor(self.p, dtype=dtype, device=device), persistent=False)
        self.lora_dropout = DropoutRate(self)   # the rate as an nn.Dropout's p, for code that sets those (TRL)
        # DoRA: the trained magnitude per output channel (set from the site's weight when built), and the flag a
        # call passes in (1: DoRA; a plain adapter routes 0 where the graph has DoRA's subgraph)
        # (PEFT's shapes: [out] for linear layers and embeddings, [1, out, 1, ...] for convolutions)
        m_shape = (1, out_features, *(1,) * len(self.kernel)) if kind == "conv" else (out_features,)
        self.magnitude = nn.Parameter(torch.ones(m_shape, dtype=dtype, device=device)) if dora else None
        self.register_buffer("d_t", torch.tensor(float(dora), dtype=dtype, device=device), persistent=False)
        # lora_bias: B's own bias (PEFT's lora_B.bias), y + s (B A x + B_bias)
        self.B_bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("residual", None, persistent=False)   # PiSSA / OLoRA / LoftQ: the weight it runs on
        if r:
            self.reset(init)

    @torch.no_grad()
    def set_residual_init(self, init: str, weight: torch.Tensor, conv1d: bool) -> None:
        """PiSSA / OLoRA (inits.residual_init): A and B from `weight` (the site's, in its own layout) and the
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
        self.set_base(A, B, res.t() if conv1d else res)

    @torch.no_grad()
    def set_base(self, A: torch.Tensor, B: torch.Tensor, base: torch.Tensor) -> None:
        """A, B, and the base weight the adapter's calls read instead of the site's (PiSSA / OLoRA's residual, LoftQ's
        quantized weight; a frozen buffer in the site's layout)."""
        self.A_r.copy_(A)
        self.B_r.copy_(B)
        self.register_buffer("residual", base.contiguous(), persistent=False)

    @property
    def A_r(self) -> torch.Tensor:
        return self.A if self.A.shape[0] == self.r else self.A[: self.r]

    @property
    def B_r(self) -> torch.Tensor:
        r = self.r // self.groups
        return self.B if self.B.shape[1] == r else self.B[:, :r]

    def zeros(self, rank: int) -> "LoraWeights":
        """Frozen zero weights of the same site at `rank` (r = 0): an empty slot's lane."""
        return zero_weights(rank, self.A.shape[1], self.B.shape[0], self.A.dtype, self.A.device, kind=self.kind,
                            kernel=self.kernel, groups=self.groups)

    def like(self, r: int, rank: int | None = None) -> "LoraWeights":
        """Zero weights of the same site shapes, rank r (allocated at `rank`), frozen flags as given by callers."""
        return LoraWeights(r, self.A.shape[1], self.B.shape[0], self.scale, self.p, True, dtype=self.A.dtype,
                           device=self.A.device, rank=rank, dora=self.magnitude is not None,
                           bias=self.B_bias is not None, kind=self.kind, kernel=self.kernel, groups=self.groups)

    @torch.no_grad()
    def reset(self, init=True) -> None:
        """PEFT's initialisations: True (Kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B), False (both
        random, as nn.Linear initialises them: the adapter is not the identity), "orthogonal" (passes.lora.inits). PiSSA
        and OLoRA need the site's weight: set_residual_init writes them."""
        A, B = self.A_r, self.B_r
        if self.kind == "embedding":   # PEFT: A zeros and B ~ N(0, 1), or (init False) both ~ N(0, 1)
            if init is False:
                nn.init.normal_(A)
            else:
                nn.init.zeros_(A)
            nn.init.normal_(B)
            return
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
        if self.groups > 1:
            raise SpecError("a declared capacity cannot pad the rank of a LoRA on a grouped convolution (its rank "
                            "splits across the groups); leave grouped convolutions out of the targets, or reserve no "
                            "capacity")
        new = self.like(0, rank)
        new.r = self.r
        with torch.no_grad():
            new.A_r.copy_(self.A_r)
            new.B_r.copy_(self.B_r)
            for v in variants_at(self):          # DoRA's magnitude, lora_bias's bias
                for attr, _ in v.tensors:
                    getattr(new, attr).copy_(getattr(self, attr))
        if self.residual is not None:
            new.register_buffer("residual", self.residual, persistent=False)
        new.requires_grad_(self.A.requires_grad)
        return new


def zero_weights(rank: int, in_f: int, out_f: int, dtype, device, **shape) -> "LoraWeights":
    """Frozen zero LoraWeights at `rank` (r = 0): a site or slot with no adapter (`shape`: kind, kernel, groups)."""
    w = LoraWeights(0, in_f, out_f, 0.0, 0.0, True, dtype=dtype, device=device, rank=rank, **shape)
    return w.requires_grad_(False)


def shape_of(site: Site) -> dict:
    """LoraWeights' shape arguments for a site (kind, and a convolution's kernel and groups)."""
    if site.kind != "conv":
        return {"kind": site.kind}
    return {"kind": site.kind, "kernel": tuple(site.weight_shape[2:]), "groups": site.params.get("groups", 1)}


def zeros_at(site: Site, rank: int, w: torch.Tensor):
    """A maker of frozen zero LoraWeights for `site` at `rank` (a capacity's empty lane)."""
    return lambda: zero_weights(rank, site.in_features, site.out_features, w.dtype, w.device, **shape_of(site))
