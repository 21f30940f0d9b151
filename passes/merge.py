"""Merge pass: fold an adapter into the weights it adapts, as a compiler folds constants.

    Before:  y = linear(x, W)                       W: get_attr q_proj.weight (shared with the user's model)
             y' = y + s * B @ A @ d   (the LoRA pass's subgraph, either form; its route inputs)
    After:   y = linear(x, W')                      W' = W + s B A, a new constant (Conv1D: W' = W + (s B A)^T)
             (the adapter's nodes are gone; its modules_to_save and trained-bias copies, and the embedding
             with its trained token rows, become plain constants; a trained bias is the base of lora_bias's fold)

The pass works on a copy of the graph (`merge_graph_module`): the PeftModule it came from is not changed, so going
back to the unmerged model is exact.
"""
from __future__ import annotations

import copy
import torch
from torch import nn
from torch.fx import GraphModule

from peftc.errors import MergeError
from peftc.methods import METHODS, method_of, method_tagged, work_dtype
from peftc.store import STORE, Adapter

from .match import Site, tensor_at
from .modules_to_save import copy_of
from .route import drop_route_inputs
from .trainable_tokens import fold_token_rows


def folded_weight(adapter: Adapter, name: str, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """W + delta in W's dtype, checked to be finite (PEFT's safe_merge)."""
    method = method_of(adapter.spec)
    if method.fold is None:
        foldable = [m.name for m in METHODS.values() if m.fold is not None]
        raise MergeError(f"adapter {name!r} ({method.name}) cannot be merged into the weights: its method has no "
                         f"fold rule (methods that fold: {foldable}); use the unmerged module")
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
    _set_attr(gm, target, merged)
    return target


def _set_attr(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, leaf = target.rpartition(".")
    mod = gm
    for part in owner.split(".") if owner else ():
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    mod.register_parameter(leaf, nn.Parameter(value, requires_grad=False))


def _fold_copies(gm: GraphModule, adapter: Adapter) -> None:
    """Every read of a copied tensor (modules_to_save, a trained bias) reads the adapter's copy as a constant, or
    the original where this adapter has no copy of it. First, so that a site's bias fold starts from the trained
    bias."""
    g = gm.graph
    for n in list(g.nodes):
        info = n.meta.get("peftc") or {}
        if info.get("method") != "modules_to_save" or info.get("role") != "out":
            continue
        orig = target = info["saved_from"]
        found = copy_of(adapter, orig)
        if found is not None:
            if any(m.op == "get_attr" and m.target == orig and m.users for m in g.nodes):
                target = f"{orig}_saved"   # a tied weight read elsewhere too (GPT-2's wte) keeps the original
            _set_attr(gm, target, found[0].detach())
        with g.inserting_before(next(m for m in g.nodes if m.op != "placeholder")):
            plain = g.get_attr(target)
        n.replace_all_uses_with(plain)


def fold_adapter(gm: GraphModule, sites: dict[str, Site], adapter: Adapter, name: str) -> int:
    """Fold `adapter` into gm's weights in place (gm must be a copy) and delete its nodes; returns the fold count."""
    g = gm.graph
    _fold_copies(gm, adapter)
    fold_token_rows(gm, adapter, name, _set_attr)   # before the sites' folds read (and replace) their weights
    count = 0
    for path in adapter.targets:
        site = sites[path]
        weight = tensor_at(gm, site.weight)
        names = {s.name for s in site.nodes}
        # the model's own key, so the merged module's state dict has the model's names; a fresh one if the weight
        # is also read outside the site (a tied embedding keeps the unmerged weight)
        target = f"{path}.weight"
        if any(u.name not in names and "peftc" not in u.meta                 # (adapter nodes go away: DoRA reads W)
               for n in g.nodes if n.op == "get_attr" and n.target == target for u in n.users):
            target = f"{path}.weight_merged"
        _set_attr(gm, target, folded_weight(adapter, name, site, weight))
        bias = _folded_bias(gm, adapter, name, site)
        new_w = new_b = None
        for node in g.nodes:
            if node.op == "call_function" and node.name in names:
                if new_w is None:
                    with g.inserting_before(node):
                        new_w = g.get_attr(target)
                        new_b = g.get_attr(bias) if bias is not None else None
                node.update_arg(site.spec.weight_arg, new_w)
                if new_b is not None:
                    arg = site.spec.bias_arg
                    if arg >= len(node.args):       # the layer had no bias: linear(x, W) -> linear(x, W', b')
                        node.args = (*node.args, *[None] * (arg - len(node.args)), new_b)
                    else:
                        node.update_arg(arg, new_b)
        count += 1
    # y' = y + delta: users of y' read y again
    for n in list(g.nodes):
        info = n.meta.get("peftc") or {}
        method = method_tagged(info.get("method", ""))
        if method is not None and info.get("role") == "out":
            if method.base_output is None:
                raise MergeError(f"method {method.name} names no base_output for its subgraph, so merge() cannot "
                                 "remove it")
            n.replace_all_uses_with(method.base_output(n))
    for n in reversed(list(g.nodes)):
        if "peftc" in n.meta and not n.users:
            g.erase_node(n)
        elif n.op == "get_attr" and not n.users:
            g.erase_node(n)
    drop_route_inputs(gm)     # nothing per call is left: the merged graph takes the model's own inputs
    leftover = [n.name for n in g.nodes if "peftc" in n.meta]
    if leftover:
        raise MergeError(f"adapter {name!r}: nodes {leftover[:3]} are still used after folding")
    return count


def merge_graph_module(src: GraphModule, sites: dict[str, Site], adapter: Adapter, name: str) -> GraphModule:
    """A new GraphModule: `src`'s graph with `adapter` folded in. Weights it does not fold are shared with `src`;
    mode-carrying modules (dropout) are copied so the two modules' train()/eval() stay apart."""
    gm = GraphModule(src, copy.deepcopy(src.graph))
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
    fold_adapter(gm, sites, adapter, name)
    gm.delete_all_unused_submodules()
    if hasattr(gm, STORE):
        delattr(gm, STORE)
    gm.graph.lint()
    gm.recompile()
    return gm
