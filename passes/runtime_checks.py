"""Runtime-checks pass: drop what torch.export leaves in a graph to re-check its own trace on every call, and casts
that cast nothing.

    Before:  _assert_tensor_metadata(h, dtype=torch.float32)     # export's check that h is still float32
             h32 = to(h, torch.float32)                           # h is float32: to() returns h itself
             r = mul(h32, h32)
    After:   r = mul(h, h)

`aten.to` without a dtype, device or layout change and without copy=True returns its input itself, so the graph
computes the same values (and the same aliases); each dropped node is one dispatch less per call, which is what a
one-token decode step of a small model is made of. Input-shape guards (`_guards_fn`) stay: they are the graph's
answer to a bad call (peftc.decoder drops them from the generation graphs, whose inputs peftc builds itself).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten
ASSERTS = (aten._assert_tensor_metadata.default,)


def _no_op_cast(node: Node) -> bool:
    """to(x, dtype) where x already has that dtype, nothing else asked (no copy, no memory format)."""
    if node.op != "call_function" or node.target is not aten.to.dtype or not isinstance(node.args[0], Node):
        return False
    x = node.args[0].meta.get("val")
    args = list(node.args[1:]) + [None] * 4
    dtype, non_blocking, copy, memory_format = args[:4]
    dtype = node.kwargs.get("dtype", dtype)
    copy = node.kwargs.get("copy", copy)
    memory_format = node.kwargs.get("memory_format", memory_format)
    return (isinstance(x, torch.Tensor) and x.dtype == dtype and not copy
            and memory_format in (None, torch.preserve_format))


def drop_runtime_checks(gm: GraphModule) -> int:
    """Remove export's tensor-metadata asserts and no-op casts; returns how many nodes went."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERTS and not node.users:
            gm.graph.erase_node(node)
            count += 1
        elif _no_op_cast(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    return count


def drop_input_guards(gm: GraphModule) -> int:
    """Remove the call of export's input-shape guard function (for graphs whose every caller is peftc's own)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
            count += 1
    if count and hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    return count
