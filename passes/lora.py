"""LoRA pass: add every adapter's low-rank update at each site, routed per row by data (arXiv:2106.09685; the
gathered-bank form of Punica/S-LoRA, arXiv:2310.18547, arXiv:2311.03285).

    Before:  y = linear(x, W, b)                       (GPT-2 Conv1D: y = addmm(b, x, W), x: [N, in])
    After:   y = linear(x, W, b)
             rows = where(store.mixed, store.rows[arange(batch)], store.active.expand(batch))  # (batch,) slot per row
             A = stack([0, pad(A_1), pad(A_2), ...])[rows]                                # (batch, R, in)
             B = stack([0, pad(B_1), pad(B_2), ...])[rows]                                # (batch, out, R)
             s = scales[rows]                                                             # (batch,)
             x3 = row_dropout(x.reshape(batch, -1, in), rows)
             y' = y.reshape(batch, -1, out).baddbmm_(bmm(x3, A^T) * s, B^T).reshape(y.shape)

The scale multiplies the rank-R intermediate, and the second product accumulates in place into the site's output, in
the same GEMM: no full-size delta is written, scaled and added, and the output is not copied (the site's output has
no other reader, and no backward needs it: linear and addmm save their inputs, not their output).

Slot 0 is the base model (zero weights, zero scale); an adapter that does not target a site has zeros there, and
ranks are zero-padded to the largest rank R. With a declared capacity (AdapterStore.capacity) the graph has every
slot of it and reads slot i's weights from store.lanes[i] (an adapter's, or zeros), allocated at the capacity's rank
R: adding or deleting an adapter then writes data too. Which adapter applies is data: switching, disabling and
per-row choice never change the graph. Every new node carries meta["peftc"] so merge and export can find the
subgraph.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.store import STORE, AdapterStore, site_key

from .match import Site, tensor_at

aten = torch.ops.aten


class RowDropout(nn.Module):
    """Dropout on (batch, T, in) with each row's adapter's rate; identity in eval mode, and while no slot has a rate
    (`live`, a Python flag: under torch.compile a change of it recompiles once, a change of the rates does not)."""

    def __init__(self, rates: list[float], device=None):
        super().__init__()
        self.register_buffer("rates", torch.tensor(rates, device=device), persistent=False)
        self.live = any(rates)

    def set_rate(self, slot: int, rate: float) -> None:
        with torch.no_grad():
            self.rates[slot] = rate
        self.live = bool((self.rates > 0).any())

    def forward(self, x, rows):
        if not self.training or not self.live:
            return x
        keep = 1.0 - self.rates.to(x.dtype)[rows].view(-1, *([1] * (x.dim() - 1)))     # (batch, 1, 1)
        return x * torch.bernoulli(keep.expand_as(x)) / keep


class SiteBank(nn.Module):
    """Per-site data of the routed subgraph: every slot's scale (and dropout rate), and zero weights for slot 0 and
    for slots whose adapter does not target the site. AdapterStore.point_slot writes a slot's entries."""

    def __init__(self, slots: int, rank: int, in_f: int, out_f: int, dtype, device, dropout: bool):
        super().__init__()
        self.register_buffer("scales", torch.zeros(slots, dtype=dtype, device=device), persistent=False)
        self.empty = nn.Module()            # buffers, not parameters: no one trains or counts them
        self.empty.register_buffer("A", torch.zeros(rank, in_f, dtype=dtype, device=device), persistent=False)
        self.empty.register_buffer("B", torch.zeros(out_f, rank, dtype=dtype, device=device), persistent=False)
        if dropout:
            self.dropout = RowDropout([0.0] * slots, device)


def _input_of(site: Site, node: Node) -> Node:
    return node.args[0] if site.kind == "linear" else node.args[1]


def _batch_source(gm: GraphModule) -> tuple[Node, Node]:
    """(the first tensor input, whose dim 0 is the batch; the last placeholder, after which new nodes may go)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return next(n for n in phs if hasattr(n.meta.get("val"), "shape")), phs[-1]


def insert_lora(gm: GraphModule, sites: dict[str, Site], store: AdapterStore) -> int:
    """Wire every adapter in `store` into the graph (the store already holds their weights); returns the number of
    rewritten site calls."""
    slots = store.slots()
    names = [a for a in slots[1:] if a is not None]
    capacity = store.capacity
    routed = store.routed_sites()
    paths = [p for p in sites if p in routed]
    if not paths:
        return 0
    rank = capacity.rank if capacity else max(store[a].spec.r for a in names)
    g = gm.graph
    meta = {"method": "lora", "adapter": "*"}
    new: list[Node] = []

    first, last = _batch_source(gm)
    with g.inserting_after(last):
        batch = g.call_function(aten.sym_size.int, (first, 0))
    with g.inserting_after(batch):
        rows_all = g.get_attr(f"{STORE}.rows")
    with g.inserting_after(rows_all):
        first_rows = g.call_function(aten.arange.default, (batch,), {"device": store.rows.device})
    with g.inserting_after(first_rows):   # index_select, not a slice: no guard on the batch against the capacity
        rows_b = g.call_function(aten.index_select.default, (rows_all, 0, first_rows))
    with g.inserting_after(rows_b):
        active = g.get_attr(f"{STORE}.active")
    with g.inserting_after(active):
        active_b = g.call_function(aten.expand.default, (active, [batch]))
    with g.inserting_after(active_b):
        mixed = g.get_attr(f"{STORE}.mixed")
    with g.inserting_after(mixed):
        rows = g.call_function(aten.where.self, (mixed, rows_b, active_b))          # (batch,)
    new += [batch, rows_all, first_rows, rows_b, active, active_b, mixed, rows]

    count = 0
    outs: set[Node] = set()
    by_name = {n.name: n for n in g.nodes}
    for path in paths:
        site = sites[path]
        key = site_key(path)
        w = tensor_at(gm, site.weight)
        dropout = capacity is not None or any(store[a].sites[key].p for a in names if path in store[a].targets)
        store.banks[key] = SiteBank(len(slots), rank, site.in_features, site.out_features, w.dtype, w.device,
                                    dropout)
        if capacity is not None:       # fixed shapes: every slot's lane has weights here, whoever fills it
            for i in range(1, len(slots)):
                store.lane_weights(i, key, site.in_features, site.out_features, w.dtype, w.device)
        for node in (by_name[n.name] for n in site.nodes):   # the site's calls in this copy of the graph
            made, out = _rewrite(gm, site, node, key, store, rank, rows, batch, dropout)
            new += made
            outs.add(out)
            count += 1
    for i in range(1, len(slots)):
        store.point_slot(i)
    for n in new:   # role "out": a site's new output, whose base_output() is the site's own output
        n.meta["peftc"] = dict(meta, role="out" if n in outs else "part")
    return count


def _rewrite(gm, site, node, key, store, rank, rows, batch, dropout) -> tuple[list[Node], Node]:
    """Insert the routed subgraph after the site call `node`; returns (the new nodes, the site's new output)."""
    g = gm.graph
    bank = f"{STORE}.banks.{key}"
    x = _input_of(site, node)
    made: list[Node] = []

    def call(target, *args):
        made.append(g.call_function(target, args))
        return made[-1]

    def attr(target):
        made.append(g.get_attr(target))
        return made[-1]

    with g.inserting_before(node.next):
        a_list, b_list = [attr(f"{bank}.empty.A")], [attr(f"{bank}.empty.B")]
        for i, a in enumerate(store.slots()[1:], start=1):
            if store.capacity is not None:        # the slot's lane, whoever fills it
                a_list.append(attr(f"{STORE}.lanes.{i}.{key}.A"))
                b_list.append(attr(f"{STORE}.lanes.{i}.{key}.B"))
                continue
            w = store[a].sites[key] if key in store[a].sites else None
            if w is None:
                a_list.append(a_list[0])
                b_list.append(b_list[0])
                continue
            prefix = f"{STORE}.adapters.{a}.sites.{key}"
            A, B = attr(f"{prefix}.A"), attr(f"{prefix}.B")
            pad = rank - w.A.shape[0]
            a_list.append(call(aten.constant_pad_nd.default, A, [0, 0, 0, pad]) if pad else A)   # (R, in)
            b_list.append(call(aten.constant_pad_nd.default, B, [0, pad]) if pad else B)         # (out, R)
        A_rows = call(aten.index.Tensor, call(aten.stack.default, a_list), [rows])             # (batch, R, in)
        B_rows = call(aten.index.Tensor, call(aten.stack.default, b_list), [rows])             # (batch, out, R)
        s_rows = call(aten.index.Tensor, attr(f"{bank}.scales"), [rows])                       # (batch,)
        x3 = call(aten.reshape.default, x, [batch, -1, site.in_features])                     # (batch, T, in)
        if dropout:
            made.append(g.call_module(f"{bank}.dropout", (x3, rows)))
            x3 = made[-1]
        h = call(aten.bmm.default, x3, call(aten.transpose.int, A_rows, 1, 2))                  # (batch, T, R)
        h = call(aten.mul.Tensor, h, call(aten.view.default, s_rows, [-1, 1, 1]))   # scale the small tensor
        y3 = call(aten.reshape.default, node, [batch, -1, site.out_features])
        y3 = call(aten.baddbmm_.default, y3, h, call(aten.transpose.int, B_rows, 1, 2))  # y += h @ B^T, one GEMM
        shape = [call(aten.sym_size.int, node, i) for i in range(len(node.meta["val"].shape))] \
            if "val" in node.meta else [-1, site.out_features]
        y = call(aten.reshape.default, y3, shape)
    mine = set(made)
    node.replace_all_uses_with(y, delete_user_cb=lambda u: u not in mine)
    for n in made:
        n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    return made, y


def base_output(out: Node) -> Node:
    """The site's own output under the LoRA subgraph whose output is `out` (what merging reads instead)."""
    return out.args[0].args[0].args[0]     # reshape(baddbmm_(reshape(y), ...)) -> y
