"""LoRA's update of sites that read one input, as the plain-form subgraph calls it: one down-projection GEMM over
the sites' stacked A's, one accumulating GEMM per site, and in training a backward that saves only x (which the
base layers' inputs share): the rank-R intermediate h is recomputed from it (one skinny GEMM per group) instead of
kept, so autograd holds less than PEFT's modules do (they keep x and h), and no scaled copies or gathered weights.

    y_i' = y_i + s_i * (x A_i^T) B_i^T      for each site i reading x   (y_i = the site's own output)

Adapter weights in another dtype than the model's (float32 on a bfloat16 model: autocast_adapter_dtype, as PEFT's
default) compute as PEFT's LoRA Linear does: x cast to the weights' dtype, y_i' = (y_i + update) in that dtype,
then cast back to y_i's dtype.

    h = x @ cat(A_1, ..., A_k)^T            (N, R_1 + ... + R_k): one GEMM for q, k and v, say
    y_i.addmm_(h[:, R_i] * s_i, B_i^T)      in place without autograd; out of place, same GEMM, with it
"""
from __future__ import annotations

import functools
import weakref
from typing import Sequence

import torch
from torch import nn

from .dora import DoraScale


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
        dt = functools.reduce(torch.promote_types, [A.dtype for A in As[1:]], As[0].dtype) if As else x.dtype
        if any(t.dtype != dt for t in (*As, *Bs)):      # a site the adapter leaves: zeros in the model's dtype
            As, Bs = [A.to(dt) for A in As], [B.to(dt) for B in Bs]
        if dt != x.dtype:              # PEFT: x = _cast_input_dtype(x, lora_A.weight.dtype); result.to(result dtype)
            back = [y.dtype for y in ys]
            outs = self._update(x.to(dt), [y.to(dt) for y in ys], As, Bs, scales, rates, doras, biases, srcs)
            return tuple(u.to(b) for u, b in zip(outs, back))
        return self._update(x, ys, As, Bs, scales, rates, doras, biases, srcs)

    def _update(self, x, ys, As, Bs, scales, rates, doras, biases, srcs):
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


def _autocast_state(device: str) -> tuple[str, torch.dtype, bool]:
    """(device type, autocast dtype, enabled) of the autocast region a forward runs in (HF Trainer's bf16=True is
    CPU or CUDA autocast): its backward's matmuls must run in the same dtypes as the forward's."""
    return device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)


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
        ctx.amp = _autocast_state(x.device.type)     # backward runs under it, as torch.amp.custom_bwd does
        ctx.save_for_backward(*(srcs if remake is not None else (x,)), *As, *Bs, *scales)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        device, dtype, enabled = ctx.amp
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _LoraFn._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        n, k = ctx.n, ctx.k
        saved = ctx.saved_tensors
        if ctx.remake is not None:
            x, rest = ctx.remake(*saved[:k]), saved[k:]
        else:
            x, rest = saved[0], saved[1:]
        As, Bs, scales = rest[:n], rest[n:2 * n], rest[2 * n:]
        x = x.to(As[0].dtype)       # remake gives x in the model's dtype; the adapter's may be wider (no-op else)
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
