"""LoRA's plain form ("single": every row of the call uses one adapter, whose weights the call passes in as route
inputs, passes.route). Sites that read the same input (q, k, v; gate, up) share one down-projection GEMM over their
stacked A's (passes.lora.ops):

    Before:  q = linear(x, Wq);  k = linear(x, Wk);  v = linear(x, Wv)
    After:   q = linear(x, Wq);  k = linear(x, Wk);  v = linear(x, Wv)
             q', k', v' = LoraGroup(x, [q, k, v], [A_q, A_k, A_v], [B_q, B_k, B_v], [s_q, s_k, s_v], [p_q, ...])
             (A_*, B_*, s_*, p_*: route inputs, the call's adapter's own Parameters, scales and dropout rates)

The second product accumulates into the site's output in one GEMM (in place where no autograd needs the output).
Where an adapter runs on a residual weight (PiSSA / OLoRA) the site call reads its weight from the route too.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from peftc.methods import form_module
from peftc.store import AdapterStore

from ..match import Site, tensor_at, weight_like
from ..route import route_input
from .ops import LoraGroup
from .values import input_of, live_at, residual_at, site_rank, variant_at
from .variants import DORA, VARIANTS

# the variants whose tensors a site call takes (LoraGroup's doras, biases: in this order, the table's)
INPUTS = [v for v in VARIANTS if v.inputs is not None]

aten = torch.ops.aten


def _route_residuals(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore) -> None:
    """Where an adapter runs on a residual weight (PiSSA / OLoRA), the site call reads its weight from the call's
    route: that adapter's residual, the model's own weight for every other adapter."""
    for site, node in calls:
        if residual_at(store, site.fqn):
            node.update_arg(site.spec.weight_arg,
                            route_input(gm, ("residual", site.fqn, site.weight), tensor_at(gm, site.weight)))


def insert_plain(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore) -> int:
    _route_residuals(gm, calls, store)
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    groups: dict[Node, list[tuple[Site, Node]]] = {}
    for site, node in sorted(calls, key=lambda c: order[c[1]]):
        groups.setdefault(input_of(site, node), []).append((site, node))
    count = 0
    for x, members in groups.items():
        for part in _placeable(members, order):
            _rewrite_group(gm, x, part, store)
            count += len(part)
    return count


def _placeable(members: list[tuple[Site, Node]], order: dict[Node, int]) -> list[list[tuple[Site, Node]]]:
    """Split the sites reading one input into groups whose calls can sit side by side: a later call joins the first
    one's group when everything it reads is defined before the first call (then it moves up beside it)."""
    head, rest = members[0], members[1:]
    group, alone = [head], []
    for m in rest:
        (alone if any(order[a] > order[head[1]] for a in m[1].all_input_nodes) else group).append(m)
    return [group] + [[m] for m in alone]


def _recipe(gm: GraphModule, x: Node):
    """(function, its input nodes) that make `x` again, where x is the output of a module that offers one
    (recipe(): e.g. passes.gated's act(gate) * up, whose operands autograd keeps anyway); else (None, ())."""
    if x.op == "call_module" and not x.kwargs:
        recipe = getattr(gm.get_submodule(x.target), "recipe", None)
        if recipe is not None and all(isinstance(a, Node) for a in x.args):
            return recipe(), list(x.args)
    return None, ()


def _rewrite_group(gm: GraphModule, x: Node, members: list[tuple[Site, Node]], store: AdapterStore) -> None:
    g = gm.graph
    last = members[0][1]
    for _, node in members[1:]:      # the group's calls side by side, so the update can follow them all
        last.append(node)
        last = node
    parts: dict[str, list[Node]] = {"A": [], "B": [], "s": [], "p": []}
    paths = [site.fqn for site, _ in members]
    extras: dict[str, list] = {v.name: [] for v in INPUTS}   # each variant's inputs, where some adapter has it
    for site, node in members:
        w = weight_like(gm, site)
        r = site_rank(store, site.fqn)
        like = {"A": w.new_empty(r, site.in_features), "B": w.new_empty(site.out_features, r), "s": w.new_empty(()),
                "p": w.new_empty(())}
        for part, example in like.items():
            parts[part].append(route_input(gm, ("lora", site.fqn, part), example))
        for v in INPUTS:
            extras[v.name].append(v.inputs(gm, site, node, w) if variant_at(store, site.fqn, v) else None)
    remake, srcs = _recipe(gm, x)
    target = form_module(gm, "single", LoraGroup(paths, live=live_at(store, paths), remake=remake,
                                              dora=[d is not None for d in extras[DORA.name]],
                                              kinds=[site.kind for site, _ in members]), "g")
    ys = [node for _, node in members]
    made = []
    extra = [*(lst if any(e is not None for e in lst) else [] for lst in extras.values()), srcs]
    while extra and not extra[-1]:
        extra.pop()
    anchor = last
    for i, (site, node) in enumerate(members):      # a call on W[a:b] (passes.match, Site.rows) takes B[a:b]
        if node.name in site.rows:
            with g.inserting_after(anchor):
                anchor = parts["B"][i] = g.call_function(aten.slice.Tensor, (parts["B"][i], 0, *site.rows[node.name]))
            anchor.meta.update(nn_module_stack=last.meta.get("nn_module_stack", {}))
    with g.inserting_after(anchor):
        call = g.call_module(target, (x, ys, parts["A"], parts["B"], parts["s"], parts["p"], *extra))
    made.append(call)
    prev = call
    outs = []
    for i in range(len(ys)):
        with g.inserting_after(prev):
            out = g.call_function(operator.getitem, (call, i))
        out.meta["val"] = ys[i].meta.get("val")
        outs.append(out)
        prev = out
    for y, out in zip(ys, outs):
        y.replace_all_uses_with(out, delete_user_cb=lambda u: u is not call)
    for n in [call, *outs]:
        n.meta["nn_module_stack"] = last.meta.get("nn_module_stack", {})
