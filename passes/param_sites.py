"""Parameter sites: a model parameter read by an op other than a module's layer op, matched by how the op reads it.
Today's rows are the stacked expert weights of transformers 5 mixture-of-experts layers (Mixtral, Qwen2-MoE,
Qwen3-MoE, ...: W [E, out, in], or [E, in, out] where the experts module says is_transposed), in the two forms
transformers exports them in (its "eager" experts loop does not export):

    grouped_mm:  y = grouped_mm(x, transpose(W, -2, -1), offs)    x [S, in] sorted by expert, offs [E] (cumsum)
                 y = grouped_mm(x, W, offs)                       W [E, in, out]
    batched_mm:  y = bmm(index(W, [ids]), x[:, :, None])          one expert per row: ids [S]; y [S, out, 1]
                 y = bmm(x[:, None, :], index(W, [ids]))          W [E, in, out];               y [S, 1, out]

(grouped_mm is transformers.grouped_mm_fallback, or aten._grouped_mm where torch's kernel serves the dtype.)

A parameter is a site when every read of it is one of these forms, all of one kind. The site's fqn is the
parameter's own name (model.layers.0.mlp.experts.gate_up_proj), its nodes the ops that read it; its params say
`experts` (E), `transposed` (True: W is [E, in, out]) and, for batched_mm, which bmm argument is the weight. A new
form is one row in READS.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.fx import GraphModule, Node

from .match import Site, module_path

aten = torch.ops.aten
GROUPED = ("transformers::grouped_mm_fallback", "aten::_grouped_mm")


def op_name(node: Node) -> str:
    """The op's schema name (aten::bmm), or what the node calls."""
    schema = getattr(node.target, "_schema", None)
    return schema.name if schema is not None else str(getattr(node.target, "__name__", node.target))


def _arg(node: Node, i: int, name: str):
    return node.args[i] if i < len(node.args) else node.kwargs.get(name)


def _is_transpose(node: Node, src: Node) -> bool:
    return (node.op == "call_function" and node.target is aten.transpose.int and node.args[0] is src
            and {d - 3 if d >= 0 else d for d in node.args[1:3]} == {-2, -1})     # the last two of 3 dims


def _grouped(use: Node, w: Node) -> Optional[tuple[str, Node, dict]]:
    """grouped_mm(x, W^T, offs) -> W [E, out, in]; grouped_mm(x, W, offs) -> W [E, in, out]."""
    transposed = True
    if _is_transpose(use, w) and len(use.users) == 1:
        use, transposed = next(iter(use.users)), False
        w = next(a for a in use.all_input_nodes if _is_transpose(a, w))
    if use.op != "call_function" or op_name(use) not in GROUPED or use.args[1] is not w:
        return None
    if _arg(use, 2, "offs") is None or _arg(use, 3, "bias") is not None:     # not grouped, or a fused bias
        return None
    return "grouped_mm", use, {"transposed": transposed}


def _batched(use: Node, w: Node) -> Optional[tuple[str, Node, dict]]:
    """bmm(W[ids], x[:, :, None]) -> W [E, out, in]; bmm(x[:, None, :], W[ids]) -> W [E, in, out]."""
    if use.target is not aten.index.Tensor or use.args[0] is not w or len(use.args[1]) != 1 or len(use.users) != 1:
        return None
    bmm = next(iter(use.users))
    if bmm.target is not aten.bmm.default:
        return None
    arg = bmm.args.index(use)
    return "batched_mm", bmm, {"transposed": arg == 1, "weight_arg": arg}


# how an op reads a 3-D parameter -> (site kind, the reading op, layout); one row per form
READS: tuple[Callable[[Node, Node], Optional[tuple[str, Node, dict]]], ...] = (_grouped, _batched)


def _read(use: Node, w: Node):
    return next((r for r in (f(use, w) for f in READS) if r is not None), None)


def find_param_sites(gm: GraphModule) -> dict[str, Site]:
    """Every 3-D parameter all of whose reads are one form of READS, keyed by the parameter's name."""
    params = dict(gm.named_parameters())
    sites: dict[str, Site] = {}
    for w in gm.graph.nodes:
        if w.op != "get_attr" or w.target not in params or params[w.target].dim() != 3 or not w.users:
            continue
        reads = [_read(u, w) for u in w.users]
        if any(r is None for r in reads) or len({r[0] for r in reads}) != 1 or \
                len({tuple(sorted(r[2].items())) for r in reads}) != 1:
            continue
        kind, _, layout = reads[0]
        shape = tuple(params[w.target].shape)
        E, d1, d2 = shape
        in_f, out_f = (d1, d2) if layout["transposed"] else (d2, d1)
        site = sites.get(w.target)
        if site is None:
            _, typ = module_path(reads[0][1])
            site = sites[w.target] = Site(w.target, kind, in_f, out_f, weight=w.target, module_type=typ,
                                          weight_shape=shape, params={"experts": E, **layout})
        site.nodes.extend(r[1] for r in reads if r[1] not in site.nodes)
    return sites


def param_reads(gm: GraphModule, name: str) -> list[str]:
    """How the graph reads parameter `name`, for error messages: each reading op, through one view-like op
    ("aten::transpose -> aten::einsum"); [] when the graph never reads it."""
    out = []
    for w in gm.graph.nodes:
        if w.op != "get_attr" or w.target != name:
            continue
        for u in w.users:
            nxt = [op_name(v) for v in u.users]
            view = op_name(u) in ("aten::transpose", "aten::t", "aten::permute", "aten::view", "aten::reshape",
                                  "aten::index", "aten::to", "aten::_to_copy", "aten::alias", "aten::detach")
            out.append(f"{op_name(u)} -> {', '.join(dict.fromkeys(nxt))}" if view and nxt else op_name(u))
    return list(dict.fromkeys(out))
