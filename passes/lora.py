"""LoRA pass: add every adapter's low-rank update at each site (arXiv:2106.09685), in one of two forms. Which
adapter applies is the call's own data (passes.route): switching adapters and per-row choice never change the graph.

Plain form ("single": every row of the call uses one adapter, whose weights the call passes in). Sites that read the
same input (q, k, v; gate, up) share one down-projection GEMM over their stacked A's (passes.lora_ops):

    Before:  q = linear(x, Wq);  k = linear(x, Wk);  v = linear(x, Wv)
    After:   q = linear(x, Wq);  k = linear(x, Wk);  v = linear(x, Wv)
             q', k', v' = LoraGroup(x, [q, k, v], [A_q, A_k, A_v], [B_q, B_k, B_v], [s_q, s_k, s_v], [p_q, ...])
             (A_*, B_*, s_*, p_*: route inputs, the call's adapter's own Parameters, scales and dropout rates)

Gathered form ("mixed": each row has its own adapter; Punica/S-LoRA's gathered banks, arXiv:2310.18547,
arXiv:2311.03285):

    Before:  y = linear(x, W, b)                       (GPT-2 Conv1D: y = addmm(b, x, W), x: [N, in])
    After:   y = linear(x, W, b)
             rows = route input                                                           # (batch,) slot per row
             A = stack([0, pad(A_1), pad(A_2), ...])[rows]                                # (batch, R, in)
             B = stack([0, pad(B_1), pad(B_2), ...])[rows]                                # (batch, out, R)
             s = scales[rows]                                                             # (batch,)
             x3 = row_dropout(x.reshape(batch, -1, in), rows)
             y' = y.reshape(batch, -1, out).baddbmm_(bmm(x3, A^T) * s, B^T).reshape(y.shape)

In both forms the second product accumulates into the site's output in one GEMM (in place where no autograd
needs the output): no full-size delta is written, scaled and added. In the gathered form slot 0 is the base model
(zero weights, zero scale), an adapter that does not target a site has zeros there, and ranks are zero-padded to
the largest rank R; with a declared capacity (AdapterStore.capacity) the graph has every slot of it and reads slot
i's weights from store.lanes[i], allocated at the capacity's rank. Every new node carries meta["peftc"] so merge
and export can find the subgraph.
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.methods import Method, register_method
from peftc.spec import LoRA, lora_from_config, lora_to_config
from peftc.store import STORE, Adapter, AdapterStore, site_key

from .lora_ops import LoraGroup, dora_norm
from .match import Site, tensor_at
from .route import route_input, route_value

aten = torch.ops.aten
FORMS = ("single", "mixed")
def _input_of(site: Site, node: Node) -> Node:
    return node.args[0] if site.kind == "linear" else node.args[1]


def _batch_source(gm: GraphModule) -> Node:
    """The first tensor input, whose dim 0 is the batch."""
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and hasattr(n.meta.get("val"), "shape"))


def routed_paths(sites: dict[str, Site], store: AdapterStore) -> list[str]:
    """The sites the graph adapts (every adapter's targets and a capacity's reserved sites), in graph order."""
    routed = store.routed_sites()
    return [p for p in sites if p in routed]


def site_rank(store: AdapterStore, path: str) -> int:
    """The rank every slot has at site `path` in the graph: the capacity's, else the largest routed there (the
    zeros that stand for an adapter not targeting the site have it too, so every adapter's inputs are alike)."""
    if store.capacity is not None:
        return store.capacity.rank
    return max((store[a].sites[site_key(path)].A.shape[0] for a in store.names() if path in store[a].targets),
               default=1)


@route_value("lora")
def _lora_value(store: AdapterStore, name: str, key: tuple, like: torch.Tensor, gm: GraphModule):
    """Adapter `name`'s A, B, scale or dropout rate at a site; zeros of the graph's rank where it does not target
    the site. The rank dim is dynamic where the adapters' ranks differ at that site."""
    _, path, part = key
    adapter = store[name]
    w = adapter.sites[site_key(path)] if path in adapter.targets else None
    t = None if w is None else {"A": w.A, "B": w.B, "s": w.scale_t, "p": w.p_t, "m": w.magnitude, "d": w.d_t,
                                "c": w.B_bias}[part]
    if t is None:             # not targeted here, or not DoRA / without lora_bias: zeros (d = 0: no rescale)
        t = torch.zeros(like.shape, dtype=like.dtype, device=store.device)
    if part not in "AB":
        return t, ()
    r = site_rank(store, path)
    ranks = {store[a].sites[site_key(path)].A.shape[0] if path in store[a].targets else r for a in store.names()}
    return t, ((0 if part == "A" else 1),) if len(ranks) > 1 else ()


def insert_lora(gm: GraphModule, sites: dict[str, Site], store: AdapterStore, form: str = "single") -> int:
    """Wire the store's adapters into the graph in `form` ("single" or "mixed"); the store already holds their
    weights. Returns the number of rewritten site calls."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    paths = routed_paths(sites, store)
    if not paths:
        return 0
    by_name = {n.name: n for n in gm.graph.nodes}
    calls = [(sites[p], by_name[n.name]) for p in paths for n in sites[p].nodes]   # this copy's site calls
    if form == "single":
        return _insert_plain(gm, calls, store)
    return _insert_gathered(gm, calls, store)


@route_value("residual")
def _residual_value(store: AdapterStore, name: str, key: tuple, like: torch.Tensor, gm: GraphModule):
    """The base weight adapter `name` runs on at a site: its PiSSA / OLoRA residual, else the model's weight."""
    _, path, target = key
    adapter = store[name]
    w = adapter.sites[site_key(path)] if path in adapter.targets else None
    return (w.residual if w is not None and w.residual is not None else tensor_at(gm, target)), ()


def _route_residuals(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore) -> None:
    """Where an adapter runs on a residual weight (PiSSA / OLoRA), the site call reads its weight from the call's
    route: that adapter's residual, the model's own weight for every other adapter."""
    for site, node in calls:
        if store.residual_at(site.fqn):
            idx = 1 if site.kind == "linear" else 2
            node.update_arg(idx, route_input(gm, ("residual", site.fqn, site.weight), tensor_at(gm, site.weight)))


# --- plain form -------------------------------------------------------------------------------------------------
def _insert_plain(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore) -> int:
    _route_residuals(gm, calls, store)
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    groups: dict[Node, list[tuple[Site, Node]]] = {}
    for site, node in sorted(calls, key=lambda c: order[c[1]]):
        groups.setdefault(_input_of(site, node), []).append((site, node))
    store.groups = nn.ModuleDict()
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


def _dora_args(gm: GraphModule, site: Site, node: Node, w: torch.Tensor) -> list:
    """DoRA's inputs at one site call: the site's own weight and bias nodes, and the call's magnitude and flag."""
    weight, bias = (node.args[1], node.args[2] if len(node.args) > 2 else None) if site.kind == "linear" \
        else (node.args[2], node.args[0])
    m = route_input(gm, ("lora", site.fqn, "m"), w.new_empty(site.out_features))
    d = route_input(gm, ("lora", site.fqn, "d"), w.new_empty(()))
    return [weight, bias, m, d]


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
    doras: list = []
    biases: list = []                   # lora_bias: B's bias, where some adapter has one
    for site, node in members:
        w = tensor_at(gm, site.weight)
        r = site_rank(store, site.fqn)
        like = {"A": w.new_empty(r, site.in_features), "B": w.new_empty(site.out_features, r), "s": w.new_empty(()),
                "p": w.new_empty(())}
        for part, example in like.items():
            parts[part].append(route_input(gm, ("lora", site.fqn, part), example))
        doras.append(_dora_args(gm, site, node, w) if store.dora_at(site.fqn) else None)
        biases.append(route_input(gm, ("lora", site.fqn, "c"), w.new_empty(site.out_features))
                      if store.lora_bias_at(site.fqn) else None)
    key = f"g{len(store.groups)}"
    remake, srcs = _recipe(gm, x)
    store.groups[key] = LoraGroup(paths, live=store.dropout_live(paths), remake=remake,
                                  dora=[d is not None for d in doras], kinds=[site.kind for site, _ in members])
    ys = [node for _, node in members]
    meta = {"method": "lora", "adapter": "*"}
    made = []
    extra = [doras if any(d is not None for d in doras) else [],
             biases if any(c is not None for c in biases) else [], srcs]
    while extra and not extra[-1]:
        extra.pop()
    with g.inserting_after(last):
        call = g.call_module(f"{STORE}.groups.{key}",
                             (x, ys, parts["A"], parts["B"], parts["s"], parts["p"], *extra))
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
        n.meta["peftc"] = dict(meta, role="out" if n in outs else "part")


# --- gathered form ----------------------------------------------------------------------------------------------
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
        self.empty.register_buffer("c", torch.zeros(out_f, dtype=dtype, device=device), persistent=False)
        if dropout:
            self.dropout = RowDropout([0.0] * slots, device)


def _insert_gathered(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore) -> int:
    slots = store.slots()
    names = [a for a in slots[1:] if a is not None]
    capacity = store.capacity
    rank = capacity.rank if capacity else max(store[a].max_rank for a in names)
    g = gm.graph
    first = _batch_source(gm)
    rows = route_input(gm, ("rows",), torch.zeros(2, dtype=torch.long))              # (batch,) slot per row
    with g.inserting_after(rows):
        batch = g.call_function(aten.sym_size.int, (first, 0))
    new: list[Node] = [batch]
    outs: set[Node] = set()
    store.banks = nn.ModuleDict()
    for site, node in calls:
        key = site_key(site.fqn)
        if key not in store.banks:
            w = tensor_at(gm, site.weight)
            dropout = capacity is not None or any(store[a].sites[key].p for a in names if site.fqn in store[a].targets)
            store.banks[key] = SiteBank(len(slots), rank, site.in_features, site.out_features, w.dtype, w.device,
                                        dropout)
            if capacity is not None:       # fixed shapes: every slot's lane has weights here, whoever fills it
                for i in range(1, len(slots)):
                    store.lane_weights(i, key, site.in_features, site.out_features, w.dtype, w.device)
        made, out = _rewrite(gm, site, node, key, store, rank, rows, batch, hasattr(store.banks[key], "dropout"))
        new += made
        outs.add(out)
    for i in range(1, len(slots)):
        store.point_slot(i)
    for n in new:   # role "out": a site's new output, whose base_output() is the site's own output
        n.meta["peftc"] = {"method": "lora", "adapter": "*", "role": "out" if n in outs else "part"}
    return len(calls)


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

    with_bias = store.lora_bias_at(site.fqn)
    with g.inserting_before(node.next):
        a_list, b_list = [attr(f"{bank}.empty.A")], [attr(f"{bank}.empty.B")]
        c_list = [attr(f"{bank}.empty.c")] if with_bias else []
        for i, a in enumerate(store.slots()[1:], start=1):
            if store.capacity is not None:        # the slot's lane, whoever fills it
                a_list.append(attr(f"{STORE}.lanes.{i}.{key}.A"))
                b_list.append(attr(f"{STORE}.lanes.{i}.{key}.B"))
                if with_bias:
                    lane = store.lanes[str(i)][key]
                    c_list.append(attr(f"{STORE}.lanes.{i}.{key}.B_bias") if lane.B_bias is not None else c_list[0])
                continue
            w = store[a].sites[key] if key in store[a].sites else None
            if w is None:
                a_list.append(a_list[0])
                b_list.append(b_list[0])
                c_list += c_list[:1]
                continue
            prefix = f"{STORE}.adapters.{a}.sites.{key}"
            A, B = attr(f"{prefix}.A"), attr(f"{prefix}.B")
            if with_bias:
                c_list.append(attr(f"{prefix}.B_bias") if w.B_bias is not None else c_list[0])
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
        if with_bias:                                                 # lora_bias: y += s c, per row
            c_rows = call(aten.index.Tensor, call(aten.stack.default, c_list), [rows])          # (batch, out)
            c_rows = call(aten.mul.Tensor, c_rows, call(aten.view.default, s_rows, [-1, 1]))
            y3 = call(aten.add_.Tensor, y3, call(aten.unsqueeze.default, c_rows, 1))
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
    if out.target is operator.getitem:     # plain form: getitem(LoraGroup(x, ys, ...), i) -> ys[i]
        return out.args[0].args[1][out.args[1]]
    while "peftc" in out.meta:             # gathered form: reshape(add_(baddbmm_(reshape(y), ...), ...)) -> y
        out = out.args[0]
    return out


def lora_delta(adapter: Adapter, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """LoRA's fold rule for merge(): s B A in the layout of the site's weight ([out, in]; Conv1D: [in, out]), in
    float32. DoRA: m (V + s B A) / ||V + s B A||_row - W (its rescale, with the group's zero-norm rule), where V is
    the weight the adapter runs on: W, or its PiSSA / OLoRA residual (which the delta then replaces W by)."""
    w = adapter.sites[site_key(site.fqn)]
    delta = w.scale * (w.B_r.detach().float() @ w.A_r.detach().float())   # (out, in)
    conv1d = site.kind == "conv1d"
    if w.dora or w.residual is not None:
        base = weight if w.residual is None else w.residual                # what the adapter runs on
        W, V = (t.detach().float() for t in (weight, base))
        W, V = (W.t(), V.t()) if conv1d else (W, V)
        g = 1.0
        if w.dora:
            n = dora_norm(base, w.A_r, w.B_r, w.scale, site.kind)
            m = w.magnitude.detach().float()
            g = torch.where(n > 0, m / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))[:, None]
        delta = g * (V + delta) - W
    return delta.T if conv1d else delta


def lora_bias_delta(adapter: Adapter, site: Site) -> torch.Tensor | None:
    """s b_B, what merge() adds to the layer's bias for lora_bias (None without it), in float32."""
    w = adapter.sites[site_key(site.fqn)]
    return None if w.B_bias is None else w.scale * w.B_bias.detach().float()


register_method(Method(LoRA, "LORA", lora_from_config, lora_to_config, site_kinds=("linear", "conv1d"),
                       fold=lora_delta, fold_bias=lora_bias_delta))
