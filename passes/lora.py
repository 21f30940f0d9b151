"""LoRA pass: add a low-rank update at each targeted site (arXiv:2106.09685).

    Before:  y = linear(x, W, b)                      (GPT-2 Conv1D: y = addmm(b, x, W), x: [N, in])
    After:   y = linear(x, W, b)
             d = self.peftc_store.adapters.<name>.sites.<site>.dropout(x)
             y' = y + linear(linear(d, A), B) * s      (A: [r, in], B: [out, r], s = alpha/r or alpha/sqrt(r))

The weights live in the adapter store (get_attr into it); every new node carries meta["peftc"] so later passes
(merge, export) can find the adapter subgraph.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.spec import LoRA
from peftc.store import STORE, Adapter, LoraWeights, site_key

from .match import Site

aten = torch.ops.aten


def _input_of(site: Site, node: Node) -> Node:
    return node.args[0] if site.kind == "linear" else node.args[1]


def insert_lora(gm: GraphModule, sites: dict[str, Site], spec: LoRA, adapter: Adapter, name: str) -> int:
    """Create `adapter`'s LoRA weights for `adapter.targets` and wire them into the graph; returns the rewrite count."""
    count = 0
    for path in adapter.targets:
        site = sites[path]
        w = gm.get_parameter(site.weight) if _has_param(gm, site.weight) else gm.get_buffer(site.weight)
        key = site_key(path)
        adapter.sites[key] = LoraWeights(spec.r, site.in_features, site.out_features, spec.scale, spec.dropout,
                                         spec.init, dtype=w.dtype, device=w.device)
        prefix = f"{STORE}.adapters.{name}.sites.{key}"
        for node in site.nodes:
            _rewrite(gm, site, node, prefix, adapter.sites[key], name)
            count += 1
    return count


def _has_param(gm: GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _rewrite(gm: GraphModule, site: Site, node: Node, prefix: str, weights: LoraWeights, adapter: str) -> None:
    g = gm.graph
    meta = {"adapter": adapter, "site": site.fqn, "method": "lora"}
    x = _input_of(site, node)
    new: list[Node] = []
    with g.inserting_before(node.next):
        d = x if isinstance(weights.dropout, torch.nn.Identity) else g.call_module(f"{prefix}.dropout", (x,))
        if d is not x:
            new.append(d)
        a = g.get_attr(f"{prefix}.A")
        b = g.get_attr(f"{prefix}.B")
        ax = g.call_function(aten.linear.default, (d, a))        # (N, r)
        bax = g.call_function(aten.linear.default, (ax, b))      # (N, out)
        delta = g.call_function(aten.mul.Tensor, (bax, weights.scale))
        y = g.call_function(aten.add.Tensor, (node, delta))
        new += [a, b, ax, bax, delta, y]
    node.replace_all_uses_with(y, delete_user_cb=lambda u: u is not y)
    for n in new:
        n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        n.meta["peftc"] = meta
