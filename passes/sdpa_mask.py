"""Attention-mask pass: turn a boolean SDPA mask into the additive float mask once, for every attention layer.

    Before:  m = <boolean mask, built once>            (B, 1, T, T)
             a_i = sdpa(q_i, k_i, v_i, m)              every layer converts m to 0 / -inf inside, and in training
                                                       keeps its own float copy for backward
    After:   f = zeros_like(m, dtype=q.dtype).masked_fill(~m, -inf)      (what sdpa does inside, done once)
             a_i = sdpa(q_i, k_i, v_i, f)              one float mask, shared by every layer's backward

The values are the ones sdpa computes from a boolean mask itself, so outputs are unchanged; the saving is one
(B, 1, T, T) float tensor per layer, in time and in activation memory.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _mask_of(node: Node) -> tuple[Node | None, str | int]:
    if len(node.args) > 3:
        return node.args[3], 3
    return node.kwargs.get("attn_mask"), "attn_mask"


def float_attention_masks(gm: GraphModule) -> int:
    """Give every SDPA call with a boolean mask the shared float mask; returns the number of calls rewritten."""
    g = gm.graph
    made: dict[tuple[Node, torch.dtype], Node] = {}
    count = 0
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not SDPA:
            continue
        mask, where = _mask_of(node)
        val = getattr(mask, "meta", {}).get("val")
        q = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
        if val is None or q is None or val.dtype != torch.bool:
            continue
        key = (mask, q.dtype)
        if key not in made:
            with g.inserting_after(mask):
                zeros = g.call_function(aten.zeros_like.default, (mask,), {"dtype": q.dtype})
            with g.inserting_after(zeros):
                off = g.call_function(aten.logical_not.default, (mask,))
            with g.inserting_after(off):
                made[key] = g.call_function(aten.masked_fill.Scalar, (zeros, off, float("-inf")))
            for n in (zeros, off, made[key]):
                n.meta["nn_module_stack"] = mask.meta.get("nn_module_stack", {})
        if isinstance(where, int):
            node.update_arg(where, made[key])
        else:
            node.update_kwarg(where, made[key])
        count += 1
    return count
