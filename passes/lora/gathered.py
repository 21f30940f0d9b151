"""LoRA's gathered form ("mixed": each row has its own adapter; Punica/S-LoRA's gathered banks, arXiv:2310.18547,
arXiv:2311.03285):

    Before:  y = linear(x, W, b)                       (GPT-2 Conv1D: y = addmm(b, x, W), x: [N, in])
    After:   y = linear(x, W, b)
             rows = route input                                                           # (batch,) slot per row
             A = stack([0, pad(A_1), pad(A_2), ...])[rows]                                # (batch, R, in)
             B = stack([0, pad(B_1), pad(B_2), ...])[rows]                                # (batch, out, R)
             s = scales[rows]                                                             # (batch,)
             x3 = row_dropout(x.reshape(batch, -1, in), rows)
             y' = y.reshape(batch, -1, out).baddbmm_(bmm(x3, A^T) * s, B^T).reshape(y.shape)

Slot 0 is the base model (zero weights, zero scale), an adapter that does not target a site has zeros there, and
ranks are zero-padded to the largest rank R; with a declared capacity (AdapterStore.capacity) the graph has every
slot of it and reads slot i's weights from store.lanes[i], allocated at the capacity's rank.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.errors import InputError
from peftc.methods import form_module
from peftc.store import STORE, AdapterStore, lane_target, site_key
from peftc.targets import MHA

from ..match import Site, tensor_at, weight_like
from .values import input_of, live_at, lora_adapter, variant_at, weights_at
from .variants import LORA_BIAS
from .weights import zeros_at

aten = torch.ops.aten


class RowDropout(nn.Module):
    """Dropout on (batch, T, in) with each row's adapter's rate (`rates`: (batch,), the slots' rates gathered by
    row); identity in eval mode. Only where the graph has it: where some adapter has a rate, or a capacity."""

    def forward(self, x, rates):
        if not self.training:
            return x
        keep = 1.0 - rates.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))                # (batch, 1, 1)
        return x * torch.bernoulli(keep.expand_as(x)) / keep


class SiteBank(nn.Module):
    """The gathered form's constants at one site (the form's graph owns them): zero weights, scale and rate for
    slot 0 and for slots whose adapter does not target the site, and the row dropout where the graph has one. The
    slots' own weights, scales and rates are read from the store (its adapters, or a capacity's lanes) on every
    call, so a slot changing hands is data."""

    def __init__(self, rank: int, in_f: int, out_f: int, dtype, device, dropout: bool):
        super().__init__()
        self.empty = nn.Module()            # buffers, not parameters: no one trains or counts them
        self.empty.register_buffer("A", torch.zeros(rank, in_f, dtype=dtype, device=device), persistent=False)
        self.empty.register_buffer("B", torch.zeros(out_f, rank, dtype=dtype, device=device), persistent=False)
        self.empty.register_buffer("c", torch.zeros(out_f, dtype=dtype, device=device), persistent=False)
        self.empty.register_buffer("s", torch.zeros((), dtype=dtype, device=device), persistent=False)
        if dropout:
            self.dropout = RowDropout()


def batch_source(gm: GraphModule) -> Node:
    """The first tensor input, whose dim 0 is the batch."""
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and hasattr(n.meta.get("val"), "shape"))


def insert_gathered(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore, rows: Node) -> int:
    mha = [site.fqn for site, _ in calls if site.module_type == MHA or site.parent]
    if mha:
        raise InputError(f"{mha[0]} (nn.MultiheadAttention) has no per-row form, as in PEFT (which refuses "
                         "adapter_names there): a row of an unbatched or sequence-first input is a position, which "
                         "attention mixes with the others; run each adapter's rows in a batch of their own")
    slots = store.slots()
    names = [a for a in slots[1:] if lora_adapter(store, a) is not None]
    capacity = store.capacity
    rank = capacity.rank if capacity else max((w.r for a in names for w in store[a].sites.values()), default=1)
    g = gm.graph
    first = batch_source(gm)
    with g.inserting_after(rows):
        batch = g.call_function(aten.sym_size.int, (first, 0))
    new: list[Node] = [batch]
    outs: set[Node] = set()
    banks: dict[str, str] = {}
    for site, node in calls:
        key = site_key(site.fqn)
        if key not in banks:
            w = weight_like(gm, site)
            banks[key] = form_module(gm, "mixed", SiteBank(rank, site.in_features, site.out_features, w.dtype,
                                                           w.device, live_at(store, [site.fqn])), "bank")
            if capacity is not None:       # fixed shapes: every slot's lane has weights here, whoever fills it
                for i in range(1, len(slots)):
                    store.lane_weights(i, "lora", key, zeros_at(site, capacity.rank, w))
        bank = banks[key]
        _rewrite(gm, site, node, key, store, rank, rows, batch, bank, hasattr(gm.get_submodule(bank), "dropout"),
                 batch_dim(site, input_of(site, node), first))
    return len(calls)


_ALIASES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default)


def _exact(val, b) -> list[int]:
    """The dims of a traced value that are the batch symbol `b`."""
    if not hasattr(val, "shape") or not isinstance(b, torch.SymInt):
        return []
    return [i for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt) and d.node.expr == b.node.expr]


def batch_dim(site: Site, x: Node, first: Node) -> int:
    """Which dim of the site's input is the batch (the first input's dim 0, by its symbol): not dim 0 where the
    model moves it (a sequence-first layer). An input whose dim 0 folds the batch with other dims ((B * T, in), as
    GPT-2's Conv1D reads) is routed when the batch is the outer factor (read off the reshape that made it), and
    refused otherwise (nn.MultiheadAttention's out_proj reads (T * B, E)): rows are never routed wrong."""
    val, b = x.meta.get("val"), first.meta["val"].shape[0]
    if not hasattr(val, "shape") or not isinstance(b, torch.SymInt):
        return 0
    hits = _exact(val, b)
    if hits:
        return 0 if 0 in hits else hits[0]
    src = x
    while src.op == "call_function" and src.target in _ALIASES and isinstance(src.args[0], Node):
        src = src.args[0]
        dims = _exact(src.meta.get("val"), b)
        if dims:
            if dims[0] == 0:
                return 0
            break
    else:
        if val.dim() and isinstance(val.shape[0], torch.SymInt) and b.node.expr in val.shape[0].node.expr.free_symbols:
            return 0
    raise InputError(f"the input of {site.fqn} (shape {tuple(val.shape)}) does not keep the batch as an outer "
                     "dimension, so its rows cannot take different adapters; run each adapter's rows in a batch of "
                     "their own")


def _adapter_dtype(gm: GraphModule, store: AdapterStore, site: Site, key: str) -> torch.dtype | None:
    """The dtype the slots' weights at `site` compute in where it is wider than the model's (float32 adapters on a
    bfloat16 model: autocast_adapter_dtype), else None (the update accumulates into the output in place). With a
    capacity on a half-precision model: float32 (an adapter added later may be float32)."""
    model = weight_like(gm, site).dtype
    dts = {w.A.dtype for a in store.slots()[1:] if (w := weights_at(store, a, site.fqn)) is not None}
    if store.capacity is not None:
        dts |= {lane["lora"][key].A.dtype for lane in store.lanes.values() if "lora" in lane and key in lane["lora"]}
    wide = model
    if store.capacity is not None and model in (torch.float16, torch.bfloat16):
        wide = torch.float32           # a capacity's slots take adapters later, without a new graph: float32 ones too
    for dt in dts:
        wide = torch.promote_types(wide, dt)
    return None if wide == model else wide


def _rewrite(gm, site, node, key, store, rank, rows, batch, bank, dropout, bdim: int = 0) -> tuple[list[Node], Node]:
    """Insert the routed subgraph after the site call `node`; returns (the new nodes, the site's new output).
    `bank`: the target of the site's SiteBank; `bdim`: the batch dim of the site's input and output, moved to the
    front and back."""
    g = gm.graph
    x = input_of(site, node)
    made: list[Node] = []
    base = node

    def call(target, *args):
        made.append(g.call_function(target, args))
        return made[-1]

    def attr(target):
        made.append(g.get_attr(target))
        return made[-1]

    with_bias = variant_at(store, site.fqn, LORA_BIAS)
    with g.inserting_before(node.next):
        if bdim:
            x, node = call(aten.movedim.int, x, bdim, 0), call(aten.movedim.int, node, bdim, 0)
        a_list, b_list = [attr(f"{bank}.empty.A")], [attr(f"{bank}.empty.B")]
        s_list = [attr(f"{bank}.empty.s")]
        p_list = s_list[:1]                       # the empty rate: 0
        c_list = [attr(f"{bank}.empty.c")] if with_bias else []
        for i, a in enumerate(store.slots()[1:], start=1):
            if store.capacity is not None:        # the slot's lane, whoever fills it
                a_list.append(attr(f"{lane_target(i, 'lora', key)}.A"))
                b_list.append(attr(f"{lane_target(i, 'lora', key)}.B"))
                s_list.append(attr(f"{lane_target(i, 'lora', key)}.scale_t"))
                if dropout:
                    p_list.append(attr(f"{lane_target(i, 'lora', key)}.p_t"))
                if with_bias:
                    lane = store.lanes[str(i)]["lora"][key]
                    c_list.append(attr(f"{lane_target(i, 'lora', key)}.B_bias") if lane.B_bias is not None else c_list[0])
                continue
            w = weights_at(store, a, site.fqn)
            if w is None:
                a_list.append(a_list[0])
                b_list.append(b_list[0])
                s_list.append(s_list[0])
                p_list += p_list[:1] if dropout else []
                c_list += c_list[:1]
                continue
            prefix = f"{STORE}.adapters.{a}.sites.{key}"
            A, B = attr(f"{prefix}.A"), attr(f"{prefix}.B")
            s_list.append(attr(f"{prefix}.scale_t"))
            if dropout:
                p_list.append(attr(f"{prefix}.p_t"))
            if with_bias:
                c_list.append(attr(f"{prefix}.B_bias") if w.B_bias is not None else c_list[0])
            pad = rank - w.A.shape[0]
            a_list.append(call(aten.constant_pad_nd.default, A, [0, 0, 0, pad]) if pad else A)   # (R, in)
            b_list.append(call(aten.constant_pad_nd.default, B, [0, pad]) if pad else B)         # (out, R)
        A_rows = call(aten.index.Tensor, call(aten.stack.default, a_list), [rows])             # (batch, R, in)
        B_rows = call(aten.index.Tensor, call(aten.stack.default, b_list), [rows])             # (batch, out, R)
        s_rows = call(aten.index.Tensor, call(aten.stack.default, s_list), [rows])              # (batch,)
        x3 = call(aten.reshape.default, x, [batch, -1, site.in_features])                     # (batch, T, in)
        wide = _adapter_dtype(gm, store, site, key)       # float32 adapters on a half-precision model, or None
        if wide is not None:                               # PEFT's mixed batch: x cast to the adapter's dtype
            x3 = call(aten.to.dtype, x3, wide)
            A_rows, B_rows = call(aten.to.dtype, A_rows, wide), call(aten.to.dtype, B_rows, wide)   # mixed slots
        if dropout:
            p_rows = call(aten.index.Tensor, call(aten.stack.default, p_list), [rows])          # (batch,)
            made.append(g.call_module(f"{bank}.dropout", (x3, p_rows)))
            x3 = made[-1]
        h = call(aten.bmm.default, x3, call(aten.transpose.int, A_rows, 1, 2))                  # (batch, T, R)
        h = call(aten.mul.Tensor, h, call(aten.view.default, s_rows, [-1, 1, 1]))   # scale the small tensor
        y3 = call(aten.reshape.default, node, [batch, -1, site.out_features])
        if wide is None:
            y3 = call(aten.baddbmm_.default, y3, h, call(aten.transpose.int, B_rows, 1, 2))  # y += h @ B^T, one GEMM
        else:                          # PEFT's mixed batch: the update cast to the model's dtype, then added
            u = call(aten.bmm.default, h, call(aten.transpose.int, B_rows, 1, 2))              # (batch, T, out)
            y3 = call(aten.add.Tensor, y3, call(aten.to.dtype, u, base.meta["val"].dtype))
        if with_bias:                                                 # lora_bias: y += s c, per row
            c_rows = call(aten.index.Tensor, call(aten.stack.default, c_list), [rows])          # (batch, out)
            c_rows = call(aten.mul.Tensor, c_rows, call(aten.view.default, s_rows, [-1, 1]))
            y3 = call(aten.add_.Tensor, y3, call(aten.unsqueeze.default, c_rows, 1))
        shape = [call(aten.sym_size.int, node, i) for i in range(len(base.meta["val"].shape))] \
            if "val" in base.meta else [-1, site.out_features]
        y = call(aten.reshape.default, y3, shape)
        if bdim:
            y = call(aten.movedim.int, y, 0, bdim)
    mine = set(made)
    base.replace_all_uses_with(y, delete_user_cb=lambda u: u not in mine)
    for n in made:
        n.meta["nn_module_stack"] = base.meta.get("nn_module_stack", {})
    return made, y
