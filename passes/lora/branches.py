"""LoRA at embedding and convolution sites: one LoraBranch call per site call, PEFT's lora_embedding_A/B, its lora_A
conv and 1x1 lora_B conv.

    Before:  y = embedding(W, ids)                      y = conv2d(x, W, b, stride, padding, ...)
    After:   y' = LoraBranch(ids, y, A, B, s, p)  = y + s (B(A(x)) + b_B)    (plain form: the call's adapter's)
             y' = LoraBranchRows(x, y, rows, As, Bs, scales, cs)              (gathered form: each slot's own rows)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.methods import form_module
from peftc.store import STORE, AdapterStore, lane_target, site_key

from ..match import Site, tensor_at
from ..route import route_input
from .dora import DoraScale
from .gathered import SiteBank
from .ops import _dropout
from .values import input_of, live_at, site_rank, variant_at, weights_at
from .variants import DORA, LORA_BIAS
from .weights import zeros_at


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
        (never with c: PEFT refuses lora_bias with DoRA). Adapter weights wider than the model's (float32 on
        bfloat16: autocast_adapter_dtype) compute as PEFT does: x and y in their dtype, the result cast back."""
        if A.dtype != y.dtype:
            back = y.dtype
            x = x if self.op == "embedding" else x.to(A.dtype)
            B = B.to(A.dtype)
            return self._forward(x, y.to(A.dtype), A, B, s, p, c, dora).to(back)
        return self._forward(x, y, A, B, s, p, c, dora)

    def _forward(self, x, y, A, B, s, p, c=None, dora=None):
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
            xa = x if self.op == "embedding" or A.dtype == x.dtype else x.to(A.dtype)   # wider adapter weights
            u = self.update(xa, A, B.to(A.dtype)).to(y.dtype)
            if c is not None:
                u = u + c.view(-1, *(1,) * (u.dim() - 2))
            mask = (rows == slot).to(u.dtype) * s                             # (batch,): this slot's rows, scaled
            out = out + u * mask.view(-1, *(1,) * (u.dim() - 1))
        return out


def insert_branches(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore, rows: Node | None) -> int:
    """y' = y + s B(A(x)) at each embedding / convolution site call (PEFT's lora_embedding_A/B, its lora_A conv and
    1x1 lora_B conv): in the plain form with the call's adapter's weights as route inputs; in the gathered form
    (`rows` given) with every slot's weights, each applied to its own rows."""
    g = gm.graph
    slots = store.slots()
    for site, node in calls:
        key = site_key(site.fqn)
        w = tensor_at(gm, site.weight)
        op = {"embedding": "embedding", "conv": f"conv{len(site.weight_shape) - 2}d"}[site.kind]
        dora = rows is None and variant_at(store, site.fqn, DORA)
        branch = (LoraBranch if rows is None else LoraBranchRows)(op, site.params, [site.fqn],
                                                                  live=live_at(store, [site.fqn]), dora=dora)
        x = input_of(site, node)
        biased = variant_at(store, site.fqn, LORA_BIAS)
        if rows is None:
            r = site_rank(store, site.fqn)
            kernel, groups = site.weight_shape[2:] if site.kind == "conv" else (), site.params.get("groups", 1)
            A = w.new_empty(r, site.in_features, *kernel)
            B = w.new_empty(site.out_features, r // groups, *(1,) * len(kernel))
            parts = [route_input(gm, ("lora", site.fqn, part), ex) for part, ex in
                     (("A", A), ("B", B), ("s", w.new_empty(())), ("p", w.new_empty(())))]
            parts.append(LORA_BIAS.inputs(gm, site, node, w) if biased else None)
            if dora:
                parts.append(DORA.inputs(gm, site, node, w))
            while parts[-1] is None:
                parts.pop()
            target = form_module(gm, "single", branch, "b")
            with g.inserting_after(node):
                out = g.call_module(target, (x, node, *parts))
        else:
            bank = form_module(gm, "mixed", SiteBank(0, 0, 0, w.dtype, w.device, dropout=False), "bank")
            gm.get_submodule(bank).branch = branch
            A_s, B_s, c_s, s_s = [], [], [], []
            with g.inserting_after(node):
                anchor = node
                for i, a in enumerate(slots[1:], start=1):
                    if store.capacity is not None:
                        lw = store.lane_weights(i, "lora", key, zeros_at(site, store.capacity.rank, w))
                        prefix = f"{lane_target(i, 'lora', key)}"
                    elif weights_at(store, a, site.fqn) is not None:
                        lw, prefix = weights_at(store, a, site.fqn), f"{STORE}.adapters.{a}.sites.{key}"
                    else:
                        A_s.append(None), B_s.append(None), c_s.append(None), s_s.append(None)
                        continue
                    for lst, attr in ((A_s, "A"), (B_s, "B"), (c_s, "B_bias"), (s_s, "scale_t")):
                        if attr == "B_bias" and lw.B_bias is None:
                            lst.append(None)
                            continue
                        with g.inserting_after(anchor):
                            anchor = g.get_attr(f"{prefix}.{attr}")
                        lst.append(anchor)
                with g.inserting_after(anchor):
                    out = g.call_module(f"{bank}.branch", (x, node, rows, A_s, B_s, s_s, c_s))
        out.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        for n in [out, *[a for a in out.all_input_nodes if a.op == "get_attr" and STORE in a.target]]:
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    return len(calls)
