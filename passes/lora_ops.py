"""The LoRA update of sites that read one input, as the plain-form subgraph calls it: one down-projection GEMM over
the sites' stacked A's, one accumulating GEMM per site, and in training a backward that saves only x (which the
base layers' inputs share): the rank-R intermediate h is recomputed from it (one skinny GEMM per group) instead of
kept, so autograd holds less than PEFT's modules do (they keep x and h), and no scaled copies or gathered weights.

    y_i' = y_i + s_i * (x A_i^T) B_i^T      for each site i reading x   (y_i = the site's own output)

    h = x @ cat(A_1, ..., A_k)^T            (N, R_1 + ... + R_k): one GEMM for q, k and v, say
    y_i.addmm_(h[:, R_i] * s_i, B_i^T)      in place without autograd; out of place, same GEMM, with it
"""
from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch
from torch import nn


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
    """||W + s B A|| per output channel, in float32, without forming B A: W is [out, in] ("conv1d": [in, out]), A
    [r, in], B [out, r], s a number or 0-dim tensor. A fresh adapter's magnitude is this same function of its
    weights, so it starts as the identity exactly."""
    with torch.no_grad():
        Wf, Af, Bf = W.detach().float(), A.detach().float(), B.detach().float()
        sf = s.detach().float() if isinstance(s, torch.Tensor) else float(s)
        if kind == "conv1d":
            w2, wa = Wf.pow(2).sum(0), (Af @ Wf).t()                         # (out,), (out, r)
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
        with torch.no_grad():
            n = dora_norm(W, A, B, s, self.kind).to(m.dtype)
            live = (n > 0) & (d > 0)
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
        c = None if bias is None else (1 - g) * bias
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
        return u * g if bias is None else torch.addcmul((1 - g) * bias, u, g)

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
    """Inverted dropout at rate p (a 0-dim tensor: the adapter's rate is data); p = 0 returns x exactly."""
    keep = (1.0 - p).to(x.dtype)
    return x * torch.bernoulli(keep.expand_as(x)) / keep


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
