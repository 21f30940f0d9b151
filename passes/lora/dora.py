"""DoRA's graph side (arXiv:2402.09353): the weight's norm per output channel with the low-rank update, without
forming B A (dora_norm), the per-channel rescale a site's output takes (DoraScale), and the inputs a plain-form site
call routes to it (dora_args)."""
from __future__ import annotations

import threading
import weakref

import torch
from torch.fx import GraphModule, Node

from peftc.methods import work_dtype

from ..match import Site, weight_node
from ..route import route_input


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


def dora_args(gm: GraphModule, site: Site, node: Node, w: torch.Tensor) -> list:
    """DoRA's inputs at one site call: the site's own weight and bias nodes, and the call's magnitude and flag."""
    kind = site.spec
    weight = weight_node(gm, site, node)
    bias = node.args[kind.bias_arg] if kind.bias_arg is not None and kind.bias_arg < len(node.args) else None
    shape = (1, site.out_features, *(1,) * (w.dim() - 2)) if site.kind == "conv" else (site.out_features,)
    m = route_input(gm, ("lora", site.fqn, "m"), w.new_empty(shape))
    d = route_input(gm, ("lora", site.fqn, "d"), w.new_empty(()))
    return [weight, bias, m, d]
