"""Merge pass: fold an adapter into the weights it adapts, as a compiler folds constants.

    Before:  y = linear(x, W)                       the base graph (no adapter in it); W: get_attr q_proj.weight,
                                                    shared with the user's model
    After:   y = linear(x, W')                      W' = W + fold(adapter) (LoRA: W + s B A; Conv1D: W + (s B A)^T;
                                                    IA3: diag(l) W), a new constant
             (a quantized layer is dequantized first, passes.dequantize: the fold is exact;
             the adapter's modules_to_save and trained-bias copies, and embeddings with its trained token rows,
             become plain constants; a trained bias is the base of a bias fold there)

Every method's rewrite only adds to the base graph, so merging never unwinds it: the pass folds each weight update,
by the method's fold rule (Method.fold, the "merge" capability), into a copy of the base graph
(`merge_graph_module`). The PeftModule it came from is not changed, so going back to the unmerged model is exact.
"""
from __future__ import annotations

import copy
import torch
from torch.fx import GraphModule

from peftc.errors import MergeError
from peftc.methods import method_of, work_dtype
from peftc.store import Adapter

from .dequantize import dequantize_sites, requantize_sites
from .match import Site, set_tensor, tensor_at, weight_reader
from .modules_to_save import fold_saved_copies
from .trainable_tokens import fold_token_rows


def folded_weight(adapter: Adapter, name: str, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """W + delta in W's dtype, checked to be finite (PEFT's safe_merge)."""
    method = method_of(adapter.spec)
    method.require("merge", f"merging adapter {name!r} into the weights (use the unmerged module)", MergeError)
    delta = method.fold(adapter, site, weight).to(weight.device)
    dt = work_dtype(weight.dtype, delta.dtype)                 # fp16/bf16 add in float32, float64 stays float64
    merged = (weight.detach().to(dt) + delta.to(dt)).to(weight.dtype)
    if not torch.isfinite(merged).all():
        raise MergeError(f"merging adapter {name!r} into layer {site.fqn} gives non-finite weights (inf or NaN); "
                         "the adapter weights are broken (check training for divergence); nothing was merged")
    return merged


def folded_bias(adapter: Adapter, name: str, site: Site, bias: torch.Tensor | None,
                like: torch.Tensor) -> torch.Tensor | None:
    """The site's bias + the method's bias delta (the delta alone where the layer has no bias), in `like`'s dtype;
    None where the method leaves the bias alone."""
    fold_bias = method_of(adapter.spec).fold_bias
    delta = fold_bias(adapter, site, bias) if fold_bias is not None else None
    if delta is None:
        return None
    if bias is not None:
        dt = work_dtype(bias.dtype, delta.dtype)
        delta = bias.detach().to(dt) + delta.to(device=bias.device, dtype=dt)
    merged = delta.to(device=like.device, dtype=like.dtype)
    if not torch.isfinite(merged).all():
        raise MergeError(f"merging adapter {name!r} into layer {site.fqn} gives a non-finite bias; nothing was merged")
    return merged


def _folded_bias(gm: GraphModule, adapter: Adapter, name: str, site: Site) -> str | None:
    """Set the site's merged bias in gm (under the layer's own key where the graph reads its bias only at the
    site) and return its get_attr target; None where the method leaves the bias alone."""
    call = next(n for n in gm.graph.nodes if n.name == site.nodes[0].name)
    arg = site.spec.bias_arg
    old = call.args[arg] if arg is not None and arg < len(call.args) else None
    base = tensor_at(gm, old.target) if old is not None and old.op == "get_attr" else None
    merged = folded_bias(adapter, name, site, base, tensor_at(gm, site.weight))
    if merged is None:
        return None
    names = {n.name for n in site.nodes}
    target = f"{site.fqn}.bias"
    if base is not None and old.target != target or any(
            u.name not in names and "peftc" not in u.meta
            for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users):
        target = f"{site.fqn}.bias_merged"
    set_tensor(gm, target, merged)
    return target


def fold_adapter(gm: GraphModule, sites: dict[str, Site], adapter: Adapter, name: str) -> int:
    """Fold `adapter` into the weights of gm, a copy of the base graph (no adapter in it), in place; returns the
    fold count. Its modules_to_save and trained-bias copies first, so that a site's bias fold starts from the
    trained bias; then every adapted site's weight (and bias) becomes a new constant by its method's fold rule."""
    g = gm.graph
    fold_saved_copies(gm, adapter, set_tensor)
    fold_token_rows(gm, adapter, name, set_tensor)   # before the sites' folds read (and replace) their weights
    method = method_of(adapter.spec)
    method.require("merge", f"merging adapter {name!r} into the weights", MergeError)
    count = 0
    for path in adapter.targets:
        site = sites[path]
        weight = tensor_at(gm, site.weight)
        names = {s.name for s in site.nodes}
        # the model's own key, so the merged module's state dict has the model's names; a fresh one if the weight
        # is also read outside the site (a tied embedding keeps the unmerged weight)
        target = site.state_key    # <path>.weight; a parameter site's own name (its every read is the site)
        if not site.param and any(u.name not in names
                                  for n in g.nodes if n.op == "get_attr" and n.target == target for u in n.users):
            target = f"{path}.weight_merged"
        set_tensor(gm, target, folded_weight(adapter, name, site, weight))
        bias = _folded_bias(gm, adapter, name, site)
        new_w = new_b = None
        for node in g.nodes if not site.param else ():     # a parameter site's reads now read W' by name
            if node.op == "call_function" and node.name in names:
                reader, arg = weight_reader(site, node)      # the call, or the chunk of W a row block comes from
                if new_w is None:
                    with g.inserting_before(reader):
                        new_w = g.get_attr(target)
                        new_b = g.get_attr(bias) if bias is not None else None
                reader.update_arg(arg, new_w)
                if new_b is not None:
                    arg = site.spec.bias_arg
                    if arg >= len(node.args):       # the layer had no bias: linear(x, W) -> linear(x, W', b')
                        node.args = (*node.args, *[None] * (arg - len(node.args)), new_b)
                    else:
                        node.update_arg(arg, new_b)
        count += 1
    for n in reversed(list(g.nodes)):
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    return count


def merge_graph_module(base: GraphModule, sites: dict[str, Site], adapter: Adapter, name: str, *,
                       requantize: bool = False) -> GraphModule:
    """A new GraphModule: the base graph `base` (the model's, before any adapter) with `adapter`'s weight updates
    folded in. Weights it does not fold are shared with `base`; mode-carrying modules (dropout) are copied so the
    two modules' train()/eval() stay apart.

    Quantized layers the adapter adapts are dequantized first (passes.dequantize), so the fold is exact and the
    merged layers are full precision; with `requantize` they are quantized again in their own format afterwards,
    and gm.meta["peftc_requantize"] holds the error that introduces (a RequantizeReport)."""
    gm = GraphModule(base, copy.deepcopy(base.graph))
    for node in gm.graph.nodes:
        if node.op == "call_module":
            owner, _, leaf = node.target.rpartition(".")
            parent = gm.get_submodule(owner) if owner else gm
            setattr(parent, leaf, copy.deepcopy(getattr(parent, leaf)))
    for mod in gm.modules():   # statistics the graph updates itself (batch norm) must not be shared with `src`
        for key, buf in list(mod._buffers.items()):
            if getattr(buf, "_peftc_owned", False):
                own = buf.detach().clone()
                own._peftc_owned = True
                mod._buffers[key] = own
    dense = dequantize_sites(gm, sites, adapter.targets)
    fold_adapter(gm, dense, adapter, name)
    if requantize:
        gm.meta["peftc_requantize"] = requantize_sites(gm, dense, sites, adapter.targets)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
