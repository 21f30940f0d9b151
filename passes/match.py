"""Matching pass: find linear-like sites (nn.Linear, GPT-2 Conv1D) and their attention roles from the graph itself.

A site is one module: `y = linear(x, W, b)` (W: [out, in]) or, for Conv1D, `y = addmm(b, x, W)` (W: [in, out]).
Roles come from the scaled-dot-product-attention pattern, not from names:

    q = site_q(x) -> view/transpose/rotary ... ─┐
    k = site_k(x) -> ...                        ├─ sdpa(q, k, v) -> transpose/reshape -> site_o
    v = site_v(x) -> ...                        ─┘
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten
SDPA = (aten.scaled_dot_product_attention.default,)
ROLES = ("q", "k", "v", "o")


@dataclass
class Site:
    """A linear-like module in the graph; one module may be called at several nodes (weight sharing)."""

    fqn: str                     # module path, e.g. model.layers.0.self_attn.q_proj
    kind: str                    # "linear" (W: [out, in]) or "conv1d" (GPT-2 Conv1D, W: [in, out])
    in_features: int
    out_features: int
    nodes: list[Node] = field(default_factory=list)
    weight: str = ""             # get_attr target of the weight
    roles: set[str] = field(default_factory=set)  # subset of ROLES found from the attention pattern
    module_type: str = ""

    @property
    def name(self) -> str:
        return self.fqn.rsplit(".", 1)[-1]

    def __deepcopy__(self, memo) -> "Site":
        """Nodes are handles into the graph the site was matched on, read by name afterwards; a copy (e.g. of a
        PeftModule) shares them rather than copying their traced metadata (fake tensors cannot be copied)."""
        return replace(self, nodes=list(self.nodes), roles=set(self.roles))


def module_path(node: Node) -> tuple[str, str]:
    """(fqn, type name) of the innermost module a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    return path, typ.rsplit(".", 1)[-1]


def _site_of(gm: GraphModule, node: Node) -> tuple[str, str, int, int, str, str] | None:
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        w = node.args[1]
        kind = "linear"
    elif node.target == aten.addmm.default and module_path(node)[1] == "Conv1D":
        w = node.args[2]
        kind = "conv1d"
    else:
        return None
    if not isinstance(w, Node) or w.op != "get_attr":
        return None  # weight computed in the graph: not an adapter site
    try:
        shape = tuple(tensor_at(gm, w.target).shape)
    except AttributeError:   # a plain tensor attribute: the traced value's shape
        shape = tuple(w.meta["val"].shape)
    if len(shape) != 2:
        return None
    out_f, in_f = shape if kind == "linear" else shape[::-1]
    fqn, typ = module_path(node)
    if not fqn:
        fqn = w.target.rsplit(".", 1)[0]
    return fqn, kind, in_f, out_f, w.target, typ


def tensor_at(gm: GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr target names."""
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return gm.get_buffer(target)


def find_sites(gm: GraphModule) -> dict[str, Site]:
    """All linear-like sites, keyed by module path, in graph order, with attention roles filled in."""
    sites: dict[str, Site] = {}
    for node in gm.graph.nodes:
        found = _site_of(gm, node)
        if found is None:
            continue
        fqn, kind, in_f, out_f, weight, typ = found
        site = sites.setdefault(fqn, Site(fqn, kind, in_f, out_f, weight=weight, module_type=typ))
        site.nodes.append(node)
    _assign_roles(gm, sites)
    return sites


def _as_digraph(gm: GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def _nearest(g: nx.DiGraph, start: Node, stop: dict[Node, Site], upstream: bool) -> set[str]:
    """Sites reached from `start` walking the data flow (up or down) and stopping at the first site on every path."""
    found: set[str] = set()
    seen = {start}
    queue = deque([start])
    while queue:
        n = queue.popleft()
        for nxt in (g.predecessors(n) if upstream else g.successors(n)):
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in stop:
                found.add(stop[nxt].fqn)
            elif nxt.op not in ("placeholder", "get_attr", "output"):
                queue.append(nxt)
    return found


def _assign_roles(gm: GraphModule, sites: dict[str, Site]) -> None:
    by_node = {n: s for s in sites.values() for n in s.nodes}
    attn = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]
    if not attn:
        return
    g = _as_digraph(gm)
    for n in attn:
        for role, arg in zip("qkv", n.args[:3]):
            if isinstance(arg, Node):
                start = arg if arg not in by_node else None
                hits = {by_node[arg].fqn} if start is None else _nearest(g, arg, by_node, upstream=True)
                for fqn in hits:
                    sites[fqn].roles.add(role)
        for fqn in _nearest(g, n, by_node, upstream=False):
            sites[fqn].roles.add("o")


def output_heads(gm: GraphModule, sites: dict[str, Site]) -> set[str]:
    """Sites whose output reaches the graph output with no other site in between (lm_head, classifier)."""
    by_node = {n: s for s in sites.values() for n in s.nodes}
    g = _as_digraph(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    heads: set[str] = set()
    seen = {out}
    queue = deque([out])
    while queue:
        n = queue.popleft()
        for prev in g.predecessors(n):
            if prev in seen:
                continue
            seen.add(prev)
            if prev in by_node:
                heads.add(by_node[prev].fqn)
            elif prev.op not in ("placeholder", "get_attr"):
                queue.append(prev)
    return heads
