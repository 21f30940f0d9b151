"""Dequantize pass (and its inverse): a quantized site becomes a dense linear layer, so that merging folds an adapter
into full-precision weights instead of rounding it onto the 4-bit or 8-bit grid (what drifts in PEFT's merge).

    Before:  y = peftc.linear_4bit(x, codes, absmax, ..., b, out, in, 64, "nf4", float32)
    After:   y = linear(x, W, b)               W = dequantize(codes, absmax, ...), a new constant in the layer's dtype

`requantize` goes back the other way after the fold, on request: W' is quantized again in the site's own format
(nf4 / fp4, its block size and double quantization; int8 rows) and the call is the quantized op again. It reports the
error that rounding introduces, per layer and overall.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import GraphModule, Node

from peftc.errors import MergeError
from peftc.quant import bnb, dense_from_args

from .match import QUANTIZED, Site, dense_weight, set_tensor, tensor_at

aten = torch.ops.aten


def dequantize_sites(gm: GraphModule, sites: dict[str, Site], paths) -> dict[str, Site]:
    """Make the quantized sites among `paths` dense linear layers in gm (in place); returns `sites` with those sites
    replaced by their dense form (kind "linear", weight under the layer's own `<path>.weight`)."""
    out = dict(sites)
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    for path in paths:
        site = sites[path]
        if site.kind not in QUANTIZED:
            continue
        weight = dense_weight(gm, site).detach()
        bias_arg = site.spec.bias_arg
        set_tensor(gm, site.weight, weight)
        new_nodes = []
        for old in (by_name[n.name] for n in site.nodes):
            x, bias = old.args[site.spec.input_arg], old.args[bias_arg]
            with g.inserting_before(old):
                w = g.get_attr(site.weight)
                new = g.call_function(aten.linear.default, (x, w, bias))
            new.meta = dict(old.meta)
            old.replace_all_uses_with(new)
            g.erase_node(old)
            new_nodes.append(new)
        out[path] = dataclasses.replace(site, kind="linear", nodes=new_nodes, params={},
                                        weight_shape=tuple(weight.shape))
    for n in list(g.nodes):
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    return out


@dataclasses.dataclass
class RequantizeReport:
    """The rounding error of quantizing merged weights again: per layer (max |W_q - W'|, ||W_q - W'|| / ||W'||)
    and over all of them."""

    layers: dict[str, tuple[float, float]]
    max_abs: float
    relative: float

    def __str__(self) -> str:
        worst = max(self.layers.items(), key=lambda kv: kv[1][0]) if self.layers else ("-", (0.0, 0.0))
        return (f"requantized {len(self.layers)} layers: max |error| {self.max_abs:.3g}, relative "
                f"{self.relative:.3g} (worst {worst[0]}: {worst[1][0]:.3g})")


def _quantize(site: Site, call: Node, gm: GraphModule, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
    """W' in the format of the quantized call `call`: (tensors by the stand-in's buffer names, the op's constants)."""
    b = bnb()
    if site.kind == "linear8bit":
        cb, scb, _ = b.functional.int8_vectorwise_quant(w.to(torch.float16))
        return {"weight": cb, "weight_scb": scb}, ()
    out_f, in_f, bs, qt = call.args[7:11]
    nested = call.args[3] is not None
    packed, state = b.functional.quantize_4bit(w.contiguous(), blocksize=bs, compress_statistics=nested,
                                               quant_type=qt)
    tensors = {"weight": packed, "weight_absmax": state.absmax}
    if nested:
        tensors.update(weight_nested_absmax=state.state2.absmax, weight_nested_code=state.state2.code,
                       weight_nested_offset=state.offset if isinstance(state.offset, torch.Tensor)
                       else torch.tensor(float(state.offset)))
    return tensors, ()


def requantize_sites(gm: GraphModule, dense: dict[str, Site], quantized: dict[str, Site], paths) -> RequantizeReport:
    """Quantize the (merged) dense weights of `paths` again in their original formats (`quantized`: the sites before
    dequantize_sites) and put the quantized op back; returns the rounding error."""
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    base = {n.name: n for s in quantized.values() for n in s.nodes}
    layers: dict[str, tuple[float, float]] = {}
    sq_err = sq_ref = 0.0
    worst = 0.0
    for path in paths:
        q = quantized[path]
        if q.kind not in QUANTIZED:
            continue
        d = dense[path]
        merged = tensor_at(gm, d.weight).detach()
        for i, node in enumerate(by_name[n.name] for n in d.nodes):
            orig = base[q.nodes[i].name]
            if i == 0:
                tensors, _ = _quantize(q, orig, gm, merged)
                prefix = q.weight          # <path>.weight: the codes, and <path>.weight_* the rest
                for name, t in tensors.items():
                    set_tensor(gm, prefix + name[len("weight"):], t, buffer=True)
            here = {n.name: n for n in g.nodes}        # the base graph's other inputs (the mode flag), in gm
            args = [here.get(a.name) if isinstance(a, Node) else a for a in orig.args]   # the rest is set below
            with g.inserting_before(node):
                reads = {name: g.get_attr(prefix + name[len("weight"):]) for name in tensors}
            args[0] = node.args[0]
            args[q.spec.bias_arg] = node.args[2] if len(node.args) > 2 else None
            args[1] = reads["weight"]
            if q.kind == "linear8bit":
                args[2] = reads["weight_scb"]
            else:
                args[2] = reads["weight_absmax"]
                args[3:6] = [reads.get("weight_nested_absmax"), reads.get("weight_nested_code"),
                             reads.get("weight_nested_offset")]
            with g.inserting_before(node):
                new = g.call_function(orig.target, tuple(args))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
        values = [tensor_at(gm, a.target) if isinstance(a, Node) and a.op == "get_attr" else a for a in new.args]
        back = dense_from_args(new.target, values, merged.dtype).float()
        diff = (back - merged.float())
        err, ref = float(diff.abs().max()), float(merged.float().norm())
        rel = float(diff.norm()) / ref if ref > 0 else 0.0
        layers[path] = (err, rel)
        worst = max(worst, err)
        sq_err += float(diff.norm()) ** 2
        sq_ref += ref ** 2
    for n in list(g.nodes):
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    if not layers:
        raise MergeError("requantize=True: no adapted layer of this model is quantized (requantizing applies to "
                         "bitsandbytes 4-bit and 8-bit bases); merge without it")
    return RequantizeReport(layers, worst, math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0)
