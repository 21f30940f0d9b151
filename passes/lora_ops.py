"""LoRA's modules: its weights at a site (LoraWeights), and the updates the graph calls. The update of sites that
read one input, as the plain-form subgraph calls it: one down-projection GEMM over
the sites' stacked A's, one accumulating GEMM per site, and in training a backward that saves only x (which the
base layers' inputs share): the rank-R intermediate h is recomputed from it (one skinny GEMM per group) instead of
kept, so autograd holds less than PEFT's modules do (they keep x and h), and no scaled copies or gathered weights.

    y_i' = y_i + s_i * (x A_i^T) B_i^T      for each site i reading x   (y_i = the site's own output)

    h = x @ cat(A_1, ..., A_k)^T            (N, R_1 + ... + R_k): one GEMM for q, k and v, say
    y_i.addmm_(h[:, R_i] * s_i, B_i^T)      in place without autograd; out of place, same GEMM, with it
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Sequence

import torch
from torch import nn

from peftc.errors import SpecError
from peftc.methods import work_dtype
from peftc.inits import orthogonal_init, residual_init


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
        # DoRA: the trained magnitude per output channel (set from the site's weight when built), and the flag a
        # call passes in (1: DoRA; a plain adapter routes 0 where the graph has DoRA's subgraph)
        # (PEFT's shapes: [out] for linear layers and embeddings, [1, out, 1, ...] for convolutions)
        m_shape = (1, out_features, *(1,) * len(self.kernel)) if kind == "conv" else (out_features,)
        self.magnitude = nn.Parameter(torch.ones(m_shape, dtype=dtype, device=device)) if dora else None
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
        r = self.r // self.groups
        return self.B if self.B.shape[1] == r else self.B[:, :r]

    def zeros(self, rank: int) -> "LoraWeights":
        """Frozen zero weights of the same site at `rank` (r = 0): an empty slot's lane."""
        return zero_weights(rank, self.A.shape[1], self.B.shape[0], self.A.dtype, self.A.device, kind=self.kind,
                            kernel=self.kernel, groups=self.groups)

    def like(self, r: int, rank: int | None = None) -> "LoraWeights":
        """Zero weights of the same site shapes, rank r (allocated at `rank`), frozen flags as given by callers."""
        return LoraWeights(r, self.A.shape[1], self.B.shape[0], self.scale, self.p, True, dtype=self.A.dtype,
                           device=self.A.device, rank=rank, dora=self.dora, bias=self.B_bias is not None,
                           kind=self.kind, kernel=self.kernel, groups=self.groups)

    @torch.no_grad()
    def reset(self, init=True) -> None:
        """PEFT's initialisations: True (Kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B), False (both
        random, as nn.Linear initialises them: the adapter is not the identity), "orthogonal" (peftc.inits). PiSSA
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
            if self.dora:
                new.magnitude.copy_(self.magnitude)
            if self.B_bias is not None:
                new.B_bias.copy_(self.B_bias)
        if self.residual is not None:
            new.register_buffer("residual", self.residual, persistent=False)
        new.requires_grad_(self.A.requires_grad)
        return new


def zero_weights(rank: int, in_f: int, out_f: int, dtype, device, **shape) -> "LoraWeights":
    """Frozen zero LoraWeights at `rank` (r = 0): a site or slot with no adapter (`shape`: kind, kernel, groups)."""
    w = LoraWeights(0, in_f, out_f, 0.0, 0.0, True, dtype=dtype, device=device, rank=rank, **shape)
    return w.requires_grad_(False)


class LoraGroup(nn.Module):
    """Call-site module of one group of sites that read the same input. Stateless but for `live`: whether any
    adapter routed here has a dropout rate (a Python flag, so a model without dropout draws no masks; under
    torch.compile a change of it recompiles once, a change of the rates does not). Dropout, where live in training,
    draws each site's own mask as PEFT does, so the sites then run one by one.

    `remake`, where given, is a function of the tensors `srcs` that returns x again (an earlier pass's recipe, e.g.
    act(gate) * up, whose operands autograd keeps for that op when they need gradients): where they do, the
    backward keeps srcs instead of a copy of x."""

    def __init__(self, paths: list[str], live: bool = False, remake=None, dora: Sequence[bool] = (),
                 kinds: Sequence[str] = ()):
        super().__init__()
        self.paths = list(paths)
        self.live = live
        self.remake = remake
        self.dora = list(dora) or [False] * len(self.paths)   # sites where some adapter is DoRA (DoraSite args)
        self.norms = [DoraScale(kind) if on else None for on, kind in zip(self.dora, kinds or ["linear"] * len(paths))]

    def forward(self, x, ys, As, Bs, scales, rates, doras=(), biases=(), srcs=()):
        """doras: for each site, None or (W, bias or None, magnitude m, DoRA flag d) of the call's adapter;
        biases: for each site, None or B's bias (lora_bias; never with DoRA, which PEFT refuses too)."""
        if self.training and self.live:
            outs = []
            for i, (y, A, B, s, p) in enumerate(zip(ys, As, Bs, scales, rates)):
                xd = _dropout(x, p)
                if doras and doras[i] is not None:     # PEFT: the base product is taken again on the dropped x
                    outs.append(self.norms[i].dropped(y, xd, A, B, s, *doras[i]))
                else:
                    outs.append(lora_update(xd, [y], [A], [B], [s])[0])
        elif not any(t.requires_grad for t in srcs):        # only where autograd keeps them anyway
            outs = lora_update(x, ys, As, Bs, scales)
        else:
            outs = lora_update(x, ys, As, Bs, scales, self.remake, srcs)
        if doras and not (self.training and self.live):
            outs = tuple(u if d is None else self.norms[i].rescale(u, A, B, s, *d)
                         for i, (u, A, B, s, d) in enumerate(zip(outs, As, Bs, scales, doras)))
        if biases:
            outs = tuple(u if c is None else _add_bias(u, c, s) for u, c, s in zip(outs, biases, scales))
        return tuple(outs)

    def extra_repr(self) -> str:
        return (f"sites={self.paths}, dropout={self.live}" + (", x recomputed" if self.remake else "")
                + (f", dora={self.dora}" if any(self.dora) else ""))


def dora_norm(W, A, B, s, kind: str = "linear") -> torch.Tensor:
    """||W + s B A|| per output channel, in work_dtype (float32; float64 for float64 weights), without forming B A:
    W is [out, in] ("conv1d": [in, out]), A [r, in], B [out, r], s a number or 0-dim tensor. An embedding's W
    [num, dim] is laid out as Conv1D's (its output channels are the columns, PEFT's norm runs over the vocabulary); a
    convolution's [out, in, *k] with A [r, in, *k] and B [out, r, 1, ...] flattens to the linear case. A fresh
    adapter's magnitude is this same function of its weights, so it starts as the identity exactly.

    A grouped convolution (B [out, r / groups, 1, ...]) takes PEFT's norm (DoraConvNdLayer.get_lora_weight): the
    rows of W + s (B.view(-1, r) @ A.view(r, -1)).view(W.shape), a full-size product laid out as PEFT lays it out
    (not the grouped update lora_B(lora_A(x)) applies), formed here as PEFT forms it."""
    # detached inputs rather than no_grad(): the same code traces into an exported graph as plain ops
    dt = work_dtype(W.dtype, A.dtype, B.dtype)
    Wf, Af, Bf = W.detach().to(dt), A.detach().to(dt), B.detach().to(dt)
    sf = s.detach().to(dt) if isinstance(s, torch.Tensor) else float(s)
    if kind == "conv" and A.shape[0] != B.shape[1]:                          # grouped: r != r / groups
        r = A.shape[0]
        return (Wf + sf * (Bf.reshape(-1, r) @ Af.reshape(r, -1)).reshape(W.shape)).flatten(1).norm(dim=1)
    if kind == "embedding":
        kind = "conv1d"
    elif kind == "conv":
        Wf, Af, Bf, kind = Wf.flatten(1), Af.flatten(1), Bf.flatten(1), "linear"
    if kind == "conv1d":
        w2, wa = Wf.pow(2).sum(0), (Af @ Wf).t()                             # (out,), (out, r)
    else:
        w2, wa = Wf.pow(2).sum(1), Wf @ Af.t()
    n2 = w2 + 2 * sf * (wa * Bf).sum(1) + sf * sf * ((Bf @ (Af @ Af.t())) * Bf).sum(1)
    return n2.clamp_min(0).sqrt()


class DoraScale:
    """DoRA's magnitude / direction split at one site (arXiv:2402.09353, PEFT's formula): with g = m / ||W + s B A||
    per output channel (the norm detached, as the paper and PEFT do)

        y' = y + (g - 1)(y - b) + g s B A x  =  g (y + s B A x) + (1 - g) b        (y = W x + b)

    so DoRA is LoRA's update followed by one per-channel scale and shift of the output. The norm comes without a
    full-size delta: ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <(W A^T)_i, B_i> + s^2 <(B (A A^T))_i, B_i>. Without
    autograd, (g, (1 - g) b) are kept per weight state (the tensors' identities and versions, so an optimizer step,
    load or in-place edit computes them again: never stale) and applied in place; under torch.compile they are
    computed in the graph each call. A row with zero norm gets g = 1 (plain LoRA there), so outputs and gradients
    stay finite (PEFT divides by zero). `d` is the call's adapter's DoRA flag (0 for a plain LoRA adapter at a site
    another adapter uses DoRA at: g = 1 exactly)."""

    def __init__(self, kind: str = "linear"):
        self.kind = kind                      # "conv1d": W is [in, out]
        self._cache: dict = {}
        self._lock = threading.Lock()

    def scale(self, W, A, B, s, m, d) -> torch.Tensor:
        """g = m / ||W + s B A||_row (1 where the norm is 0, or where d == 0)."""
        n = dora_norm(W, A, B, s, self.kind).to(m.dtype).view(m.shape)
        live = (n > 0) & (d.detach() > 0)
        return torch.where(live, m / torch.where(live, n, torch.ones_like(n)), torch.ones_like(m))

    def _cached(self, W, A, B, s, m, d, bias):
        """(g, (1 - g) b or None) for this weight state, computed once per state (calls without autograd)."""
        ts = (W, A, B, s, m, d) + ((bias,) if bias is not None else ())
        key = tuple(id(t) for t in ts)
        state = tuple(t._version for t in ts)
        hit = self._cache.get(key)
        if hit is not None and hit[1] == state and all(r() is t for r, t in zip(hit[0], ts)):
            return hit[2], hit[3]
        g = self.scale(W, A, B, s, m, d)
        c = None if bias is None else (1 - g) * bias.view(g.shape)
        with self._lock:
            if len(self._cache) > 16:      # adapters come and go; keep the few in use
                self._cache.clear()
            self._cache[key] = (tuple(weakref.ref(t) for t in ts), state, g, c)
        return g, c

    def rescale(self, u, A, B, s, W, bias, m, d) -> torch.Tensor:
        """g u + (1 - g) b, where u = y + s B A x (LoRA's output at the site)."""
        if not torch.is_grad_enabled() or not (u.requires_grad or m.requires_grad):
            if not torch.compiler.is_compiling():
                g, c = self._cached(W, A, B, s, m, d, bias)
                u = u.mul_(g)
                return u if c is None else u.add_(c)
        g = self.scale(W, A, B, s, m, d)
        return u * g if bias is None else torch.addcmul((1 - g) * bias.view(g.shape), u, g)

    def dropped(self, y, xd, A, B, s, W, bias, m, d) -> torch.Tensor:
        """PEFT's training form with dropout: y + (g - 1) W xd + g s B A xd (xd: the dropped input)."""
        g = self.scale(W, A, B, s, m, d)
        base = xd @ W if self.kind == "conv1d" else xd @ W.t()
        return y + (g - 1) * base + g * (s * ((xd @ A.t()) @ B.t()))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _add_bias(u: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """u + s c (lora_bias), in place where autograd needs neither."""
    if torch.is_grad_enabled() and (u.requires_grad or c.requires_grad):
        return u + s * c
    return u.add_(s * c)


def _dropout(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inverted dropout at rate p (a 0-dim tensor: the adapter's rate is data); p = 0 returns x exactly.

    Run eagerly it is nn.Dropout's own call, F.dropout(x, p): the same draws from the same generator, in the same
    rounding, x * (mask / (1 - p)), so with one seed a training step drops what PEFT's does (p = 0 draws nothing, as
    PEFT's nn.Identity). Compiled or exported, the rate stays a tensor, so a new rate does not recompile."""
    if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return torch.nn.functional.dropout(x, _rate(p), True)
    keep = (1.0 - p).to(x.dtype)
    return x * (torch.bernoulli(keep.expand_as(x)) / keep)


_RATES: dict[int, tuple] = {}      # id(p) -> (weakref to p, p._version, the rate as a float)


def _rate(p: torch.Tensor) -> float:
    """A rate tensor as a Python number: the shortest decimal that rounds to it in its dtype, so 0.3 stored in
    bfloat16 (0.30078125) reads as 0.3, the adapter's rate and PEFT's. Read once per tensor state, keyed as
    DoraScale's cache is (identity and version): a read of a device tensor waits for the device."""
    hit = _RATES.get(id(p))
    if hit is None or hit[0]() is not p or hit[1] != p._version:
        v = float(p)
        rate = next((c for c in (float(f"{v:.{k}g}") for k in range(1, 18))
                     if torch.tensor(c, dtype=p.dtype).item() == v), v)
        if len(_RATES) > 4096:     # adapters come and go
            _RATES.clear()
        hit = _RATES[id(p)] = (weakref.ref(p), p._version, rate)
    return hit[2]


def lora_update(x, ys, As, Bs, scales, remake=None, srcs=()) -> tuple[torch.Tensor, ...]:
    """(y_i + s_i B_i A_i x for each site i). Without autograd (eval, no_grad, inference_mode, frozen adapters) the
    y_i are updated in place; with it, a custom backward saves x (or, with `remake`, the `srcs` it is made from)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in (*ys, *As, *Bs))):
        return _LoraFn.apply(x, remake, len(srcs), *srcs, len(ys), *ys, *As, *Bs, *scales)
    return _update_(x, ys, As, Bs, scales)


def _down(x2: torch.Tensor, As) -> torch.Tensor:
    return torch.mm(x2, (As[0] if len(As) == 1 else torch.cat(As)).t())     # (N, R_1 + ... + R_k)


def _update_(x, ys, As, Bs, scales) -> tuple[torch.Tensor, ...]:
    h = _down(x.reshape(-1, x.shape[-1]), As)
    off = 0
    for y, A, B, s in zip(ys, As, Bs, scales):
        r = A.shape[0]
        y.view(-1, y.shape[-1]).addmm_(h[:, off:off + r] * s, B.t())     # y += (h_i s) B^T, no full-size temporary
        off += r
    return tuple(ys)


class _LoraFn(torch.autograd.Function):
    """Forward as _update_ (out of place); backward from x alone (h = x A^T again; x = remake(*srcs) again where
    given):  g_h_i = s_i g_i B_i     g_B_i = s_i g_i^T h_i     g_A = g_h^T x     g_x = g_h A     (g_y_i = g_i)
    Arguments: x, remake, k, srcs (k), n, ys (n), As (n), Bs (n), scales (n)."""

    @staticmethod
    def forward(ctx, x, remake, k, *t):
        srcs, n, t = t[:k], t[k], t[k + 1:]
        ys, As, Bs, scales = t[:n], t[n:2 * n], t[2 * n:3 * n], t[3 * n:]
        h = _down(x.reshape(-1, x.shape[-1]), As)                             # (N, R)
        outs, off = [], 0
        for y, A, B, s in zip(ys, As, Bs, scales):
            r = A.shape[0]
            outs.append(torch.addmm(y.reshape(-1, y.shape[-1]), h[:, off:off + r] * s, B.t()).view(y.shape))
            off += r
        ctx.n, ctx.k, ctx.remake, ctx.x_shape = n, k, remake, x.shape
        ctx.save_for_backward(*(srcs if remake is not None else (x,)), *As, *Bs, *scales)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n, k = ctx.n, ctx.k
        saved = ctx.saved_tensors
        if ctx.remake is not None:
            x, rest = ctx.remake(*saved[:k]), saved[k:]
        else:
            x, rest = saved[0], saved[1:]
        As, Bs, scales = rest[:n], rest[n:2 * n], rest[2 * n:]
        need = ctx.needs_input_grad[4 + k:]               # (ys..., As..., Bs..., scales...)
        need_x, need_A = ctx.needs_input_grad[0], any(need[n:2 * n])
        x2 = x.reshape(-1, x.shape[-1])
        h = _down(x2, As) if any(need[2 * n:3 * n]) else None                # (N, R), only for B's gradient
        g_ys = [g if need[i] else None for i, g in enumerate(grads)]
        g_hs, g_Bs, off = [], [], 0
        for i, (g, A, B, s) in enumerate(zip(grads, As, Bs, scales)):
            r = A.shape[0]
            g2 = g.reshape(-1, g.shape[-1])                                   # (N, out_i)
            g_Bs.append(torch.mm(g2.t(), h[:, off:off + r]) * s if need[2 * n + i] else None)   # (out_i, r)
            if need_x or need_A:
                g_hs.append(torch.mm(g2, B) * s)                              # (N, r)
            off += r
        g_As: list = [None] * n
        g_x = None
        if g_hs:
            g_h = g_hs[0] if n == 1 else torch.cat(g_hs, 1)                  # (N, R)
            if need_A:
                g_A = torch.mm(g_h.t(), x2)                                  # (R, in)
                g_As = [ga if need[n + i] else None
                        for i, ga in enumerate(g_A.split([A.shape[0] for A in As], 0))]
            if need_x:
                g_x = torch.mm(g_h, As[0] if n == 1 else torch.cat(As)).view(ctx.x_shape)
        return (g_x, None, None, *([None] * k), None, *g_ys, *g_As, *g_Bs, *([None] * n))


class LoraBranch(nn.Module):
    """LoRA at an embedding or convolution site, as PEFT computes it: y + s (B(A(x)) + b_B), where for an embedding
    A(x) = embedding(A^T, ids) (no dropout, as in PEFT) and B is a matmul, and for a convolution A is a conv with the
    site's kernel, stride, padding and dilation and B a 1x1 conv with its groups (dropout on x first).

    Called as (x, y, A, B, s, p[, c]) in the plain form (the call's adapter) and as (x, y, rows, As, Bs, scales, cs)
    in the gathered form, where each slot's update applies to its own rows only (None: the slot has none here).
    `live` as LoraGroup's: whether any adapter routed here has a dropout rate."""

    def __init__(self, op: str, params: dict, paths: list[str], live: bool = False, dora: bool = False):
        super().__init__()
        self.op, self.params, self.paths, self.live = op, dict(params), list(paths), live
        self.norm = DoraScale("embedding" if op == "embedding" else "conv") if dora else None

    def update(self, x, A, B, p=None):
        """B(A(x)), the unscaled update."""
        if self.op == "embedding":
            pad = self.params.get("padding_idx", -1)
            h = torch.nn.functional.embedding(x, A.t(), padding_idx=None if pad is None or pad < 0 else pad)
            return h @ B.t()
        if p is not None and self.training and self.live:
            x = _dropout(x, p)
        conv = getattr(torch.nn.functional, self.op)
        prm = self.params
        h = conv(x, A, None, prm.get("stride", 1), prm.get("padding", 0), prm.get("dilation", 1), 1)
        return conv(h, B, None, 1, 0, 1, prm.get("groups", 1))

    def forward(self, x, y, A, B, s, p, c=None, dora=None):
        """dora: (W, bias or None, magnitude m, DoRA flag d) of the call's adapter where some adapter here is DoRA
        (never with c: PEFT refuses lora_bias with DoRA)."""
        if dora is not None and self.training and self.live and self.op != "embedding":
            return self._dropped(x, y, A, B, s, p, *dora)
        u = self.update(x, A, B, p)
        if c is not None:                    # lora_bias (convolutions; PEFT refuses it on embeddings)
            u = u + c.view(-1, *(1,) * (u.dim() - 2))
        if torch.is_grad_enabled() and (u.requires_grad or y.requires_grad):
            out = y + u * s
        else:
            out = y.add_(u * s)
        return out if dora is None else self.norm.rescale(out, A, B, s, *dora)

    def _dropped(self, x, y, A, B, s, p, W, bias, m, d):
        """DoRA in training with dropout, as PEFT: y + (g - 1) conv(d(x), W) + g s B(A(d(x)))."""
        xd = _dropout(x, p)
        g = self.norm.scale(W, A, B, s, m, d)
        prm = self.params
        base = getattr(torch.nn.functional, self.op)(xd, W, None, prm.get("stride", 1), prm.get("padding", 0),
                                                     prm.get("dilation", 1), prm.get("groups", 1))
        return y + (g - 1) * base + g * (s * self.update(xd, A, B))

    def extra_repr(self) -> str:
        return f"{self.op}, sites={self.paths}, dropout={self.live}"


class LoraBranchRows(LoraBranch):
    """LoraBranch in the gathered form: (x, y, rows, As, Bs, scales, cs), every slot's update on its own rows (a
    slot's A and scale are None where it has no adapter at the site). No dropout: mixed batches serve inference."""

    def forward(self, x, y, rows, As, Bs, scales, cs):
        out = y
        for slot, (A, B, s, c) in enumerate(zip(As, Bs, scales, cs), start=1):
            if A is None:
                continue
            u = self.update(x, A, B)
            if c is not None:
                u = u + c.view(-1, *(1,) * (u.dim() - 2))
            mask = (rows == slot).to(u.dtype) * s                             # (batch,): this slot's rows, scaled
            out = out + u * mask.view(-1, *(1,) * (u.dim() - 1))
        return out
