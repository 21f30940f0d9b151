"""LoRA's plain form fused with quantized base layers (what passes.fuse_quant puts in place of a LoraGroup and the
quantized site calls it follows): one call per group of sites reading one x, with its own backward.

    Before:  q = linear_4bit(x, Wq4, ...);  k = linear_4bit(x, Wk4, ...)
             q', k' = LoraGroup(x, [q, k], [A_q, A_k], [B_q, B_k], [s_q, s_k], [p_q, p_k])
    After:   q', k' = QuantLoraGroup(x, [(Wq4, ...), (Wk4, ...)], [A_q, A_k], [B_q, B_k], [s_q, s_k], [p_q, p_k])

    forward    y_i = base_i(x) + s_i (drop_i(x) A_i^T) B_i^T         (no dropout: one GEMM x [A_1; ...; A_n]^T)
    saved      x (or the tensors x is made from, LoraGroup.remake), drop_i's mask as bool, h_i = drop_i(x) A_i^T
               (r-wide): never a dequantized weight, never a dropped copy of x
    backward   g_B_i = s_i g_i^T h_i    g_h_i = s_i g_i B_i    g_A_i = g_h_i^T drop_i(x)   (drop_i(x) made again
               from x and the mask)    g_x = sum_i g_i W_i + drop_i'(g_h_i A_i)   (W_i dequantized again, one at a
               time)

Dropout draws each site's mask as LoraGroup does (torch.native_dropout: F.dropout's own draws on every device), so
one seed drops what the unfused graph (and PEFT) drops. Without autograd (eval, no_grad, inference_mode, frozen
adapters) it runs the base ops and LoraGroup's in-place update. Under torch.compile the autograd.Function is traced
(the base ops and the dequantization are peftc's custom ops, opaque to it), with LoraGroup's tensor-rate dropout.
"""
from __future__ import annotations

import functools

from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from .ops import LoraGroup, _autocast_state, _down, _dropout, _rate, _update_



class QuantBase(NamedTuple):
    """A quantized base op as a fused call runs it: `op(x, *args)` (args: the op's arguments after x), W again for
    the backward (`weight(args, x dtype)` -> W [out, in] in the dtype dL/dx is computed in, the base op's own
    backward's), and the index of the bias among args."""

    op: Callable
    weight: Callable
    bias: int


class QuantLoraGroup(nn.Module):
    """A LoraGroup fused with the quantized base calls it follows (one per site, `bases`): the same sites, dropout
    flag and recipe for x (`remake`)."""

    adapter = LoraGroup      # the module it replaces (passes.fuse_quant's table)

    def __init__(self, group: LoraGroup, bases: Sequence[QuantBase]):
        super().__init__()
        self.paths, self.live, self.remake = list(group.paths), group.live, group.remake
        self.bases = tuple(bases)

    # --- what passes.fuse_quant asks of a fused module ------------------------------------------------------------
    @staticmethod
    def bind(call) -> dict:
        """The adapter call's arguments by LoraGroup.forward's names."""
        names = ("x", "ys", "As", "Bs", "scales", "rates", "doras", "biases", "srcs")
        bound = dict(zip(names, call.args), **call.kwargs)
        return {"doras": (), "biases": (), "srcs": (), **bound}

    @classmethod
    def refusal(cls, group: LoraGroup, call) -> str | None:
        """Why this group call stays unfused (a variant the fused op has no formula for), else None."""
        b = cls.bind(call)
        if any(d is not None for d in b["doras"]):
            return "DoRA (its rescale reads the dense weight)"
        if any(c is not None for c in b["biases"]):
            return "lora_bias"
        return None

    @classmethod
    def args_of(cls, call, base_args: list[list]) -> tuple:
        """The fused call's arguments: the group call's, with each site's base-op arguments in place of its
        output."""
        b = cls.bind(call)
        return (b["x"], base_args, b["As"], b["Bs"], b["scales"], b["rates"], b["srcs"])

    # --- the call ----------------------------------------------------------------------------------------------
    def forward(self, x, args, As, Bs, scales, rates, srcs=()):
        """args: for each site, its base op's arguments after x."""
        drop = self.training and self.live
        if As and any(t.dtype != x.dtype for t in (*As, *Bs)):
            return self._wide(x, args, As, Bs, scales, rates, drop)
        biases = [a[b.bias] for a, b in zip(args, self.bases)]
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (x, *As, *Bs, *biases, *srcs)):
            drops = [_draw(x.detach(), p) for p in rates] if drop else [(None, None, None)] * len(As)
            remake = self.remake if any(t.requires_grad for t in srcs) else None   # LoraGroup's rule
            plan = (len(As), len(srcs), tuple(len(a) for a in args), tuple(b.op for b in self.bases),
                    tuple(b.weight for b in self.bases), tuple(b.bias for b in self.bases), remake)
            flat = [t for a in args for t in a]
            return _QuantLoraFn.apply(x, plan, *srcs, *flat, *As, *Bs, *scales, *(d for t in drops for d in t))
        ys = [b.op(x, *a) for b, a in zip(self.bases, args)]
        if not drop:
            return _update_(x, ys, As, Bs, scales)
        return tuple(_update_(_dropout(x, p), [y], [A], [B], [s])[0]
                     for y, A, B, s, p in zip(ys, As, Bs, scales, rates))

    def _wide(self, x, args, As, Bs, scales, rates, drop: bool) -> tuple:
        """Adapters in a wider dtype than the model's (float32 on bfloat16: autocast_adapter_dtype), as PEFT's
        bitsandbytes LoRA layers compute: y + (s B A drop(x.to(A's dtype))).to(y's dtype), unfused (plain autograd
        through the base op)."""
        dt = functools.reduce(torch.promote_types, [t.dtype for t in (*As, *Bs)])
        xc = x.to(dt)
        outs = []
        for b, a, A, B, s, p in zip(self.bases, args, As, Bs, scales, rates):
            y = b.op(x, *a)
            xd = _dropout(xc, p) if drop else xc
            outs.append(y + ((xd @ A.to(dt).t()) @ B.to(dt).t() * s).to(y.dtype))
        return tuple(outs)

    def extra_repr(self) -> str:
        ops = sorted({getattr(b.op, "__name__", str(b.op)) for b in self.bases})
        return (f"sites={self.paths}, base={', '.join(ops)}, dropout={self.live}"
                + (", x recomputed" if self.remake else ""))


# --- dropout as a mask ---------------------------------------------------------------------------------------------
def _draw(x: torch.Tensor, p: torch.Tensor) -> tuple:
    """(drop(x), its mask (bool), d) at rate p (a 0-dim tensor), drawn as LoraGroup draws it; (None, None, None)
    where the rate is 0 (nothing drawn, as F.dropout). d: the scale 1 / (1 - p) (a number), or compiled, the kept
    fraction 1 - p (a tensor: a new rate does not recompile)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        keep = (1.0 - p).to(x.dtype)
        m = torch.bernoulli(keep.expand_as(x))
        return x * (m / keep), m.bool(), keep
    rate = _rate(p)
    if rate == 0.0:
        return None, None, None
    xd, mask = torch.native_dropout(x, rate, True)      # F.dropout's draws (its own kernel on CPU and CUDA)
    return xd, mask, 1.0 / (1.0 - rate)


def _kept(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """t where the drawn mask kept it, 0 elsewhere (the scale left out: _scaled puts it on the r-wide factor), in
    one pass over t: the dropout's backward and drop(x) again, without drop(x) ever being kept."""
    if mask is None:
        return t
    return torch.where(mask.view(t.shape), t, 0.0)  # masks are x-shaped, t may be its (N, in) view; no float mask


def _scaled(t: torch.Tensor, d) -> torch.Tensor:
    """t times the dropout's scale d (1 / (1 - p), or compiled the kept fraction 1 - p, a tensor: t / d)."""
    if d is None:
        return t
    return t / d if isinstance(d, torch.Tensor) else t * d


class _QuantLoraFn(torch.autograd.Function):
    """Arguments: x, plan = (n sites, k srcs, each site's number of base args, base ops, weight functions, bias
    indices, remake), srcs (k), the base args (flat), As (n), Bs (n), scales (n), (drop(x), mask, d) per site."""

    @staticmethod
    def forward(ctx, x, plan, *t):
        n, k, counts, ops, weights, bias_at, remake = plan
        srcs, args, t = t[:k], _split(t[k:], counts), t[k + sum(counts):]
        As, Bs, scales, drops = t[:n], t[n:2 * n], t[2 * n:3 * n], t[3 * n:]
        xds, masks, ds = drops[0::3], drops[1::3], drops[2::3]
        ys = [op(x, *a) for op, a in zip(ops, args)]                           # the base ops, as unfused
        x2 = x.reshape(-1, x.shape[-1])                                        # (N, in)
        if all(m is None for m in masks):
            h = _down(x2, As)                                                  # (N, R): one GEMM for the group
            hs = list(h.split([A.shape[0] for A in As], 1))
        else:
            hs = [torch.mm(x2 if xd is None else xd.reshape(x2.shape), A.t()) for xd, A in zip(xds, As)]
        ctx.amp = _autocast_state(x.device.type)          # backward runs under it, as torch.amp.custom_bwd does
        for y, h, B, s in zip(ys, hs, Bs, scales):
            if ctx.amp[2]:     # under autocast: the update in its dtype, added into y's (PEFT's result + update)
                y.view(-1, y.shape[-1]).add_(torch.mm(h * s, B.t()))
            else:
                y.view(-1, y.shape[-1]).addmm_(h * s, B.t())                   # y_i += s_i h_i B_i^T
        ctx.plan, ctx.x_shape, ctx.x_dtype = plan, x.shape, x.dtype
        # what a saved slot holds: base args' constants stay on ctx, tensors (the packed weights) are saved
        ctx.consts = [[None if isinstance(v, torch.Tensor) else v for v in a] for a in args]
        ctx.is_t = [[isinstance(v, torch.Tensor) for v in a] for a in args]
        ctx.mask_at = [m is not None for m in masks]
        ctx.ds = [None if isinstance(d, torch.Tensor) else d for d in ds]
        ctx.d_at = [isinstance(d, torch.Tensor) for d in ds]
        ctx.save_for_backward(*((x,) if remake is None else srcs),
                              *(v for a in args for v in a if isinstance(v, torch.Tensor)),
                              *As, *Bs, *scales, *(m for m in masks if m is not None),
                              *(d for d in ds if isinstance(d, torch.Tensor)), *hs)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        device, dtype, enabled = ctx.amp
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _QuantLoraFn._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        n, k, counts, ops, weights, bias_at, remake = ctx.plan
        saved = iter(ctx.saved_tensors)
        kept = [next(saved) for _ in range(1 if remake is None else k)]
        args = [[next(saved) if is_t else c for is_t, c in zip(ts, cs)] for ts, cs in zip(ctx.is_t, ctx.consts)]
        As, Bs, scales = ([next(saved) for _ in range(n)] for _ in range(3))
        masks = [next(saved) if on else None for on in ctx.mask_at]
        ds = [next(saved) if on else d for on, d in zip(ctx.d_at, ctx.ds)]
        hs = list(saved)
        need = ctx.needs_input_grad
        need_x, need_args = need[0], _split(need[2 + k:], counts)
        need_A, need_B = need[2 + k + sum(counts):][:n], need[2 + k + sum(counts):][n:2 * n]
        grouped = all(m is None for m in masks)
        g2s = [g.reshape(-1, g.shape[-1]) for g in grads]                      # (N, out_i)
        g_Bs = [torch.mm(g2.t(), h) * s if nb else None for g2, h, s, nb in zip(g2s, hs, scales, need_B)]
        g_hs = ([torch.mm(g2, B) * s for g2, B, s in zip(g2s, Bs, scales)]     # (N, r_i)
                if need_x or any(need_A) else [])
        g_h = g_hs[0] if n == 1 or not g_hs else torch.cat(g_hs, 1)            # (N, R)
        g_As: list = [None] * n
        if any(need_A):
            x = kept[0] if remake is None else remake(*kept)
            x2 = x.reshape(-1, x.shape[-1])
            if grouped:
                g_As = [ga if na else None                                     # (R, in): one GEMM
                        for ga, na in zip(torch.mm(g_h.t(), x2).split([A.shape[0] for A in As], 0), need_A)]
            else:       # g_A_i = (d g_h_i)^T (x * m_i): the scale on the r-wide side, one pass over x per site
                g_As = [torch.mm(_scaled(gh, d).t(), _kept(x2, m)) if na else None
                        for gh, m, d, na in zip(g_hs, masks, ds, need_A)]
        g_x = None
        if need_x:
            with torch.autocast(ctx.amp[0], enabled=False):                    # the base ops' own dtypes
                g_x = _base_grad(g2s, args, weights, ctx.x_dtype)              # sum_i g_i W_i
            if grouped and ctx.amp[2]:
                g_x.add_(torch.mm(g_h, As[0] if n == 1 else torch.cat(As)))
            elif grouped:
                g_x.addmm_(g_h, As[0] if n == 1 else torch.cat(As))
            else:
                for gh, A, m, d in zip(g_hs, As, masks, ds):
                    g_x.add_(_kept(torch.mm(_scaled(gh, d), A), m))
            g_x = g_x.view(ctx.x_shape)
        g_args = []
        for g2, a, nd, b in zip(g2s, args, need_args, bias_at):
            g_args += [g2.sum(0).to(v.dtype) if j == b and nd[j] else None for j, v in enumerate(a)]
        return (g_x, None, *([None] * k), *g_args, *g_As, *g_Bs, *([None] * (4 * n)))


def _split(t: Sequence, counts: Sequence[int]) -> list:
    """t cut into consecutive pieces of `counts` items."""
    out, off = [], 0
    for c in counts:
        out.append(t[off:off + c])
        off += c
    return out


def _base_grad(g2s, args, weights, dtype: torch.dtype) -> torch.Tensor:
    """sum_i g_i W_i (N, in) in `dtype`, each W_i dequantized again (in the dtype the base op's own backward
    multiplies in) and freed before the next."""
    acc = None
    for g2, a, weight in zip(g2s, args, weights):
        W = weight(a, dtype)                                                   # [out, in]
        g2 = g2 if g2.dtype == W.dtype else g2.to(W.dtype)      # (under autocast g_i comes in its dtype)
        if W.dtype == dtype:
            acc = torch.mm(g2, W) if acc is None else acc.addmm_(g2, W)
        else:
            part = (g2.to(W.dtype) @ W).to(dtype)
            acc = part if acc is None else acc.add_(part)
        del W
    return acc
