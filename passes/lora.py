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
i's weights from store.lanes[i], allocated at the capacity's rank. The modules the subgraph calls belong to the
form's graph (peftc.methods.form_module); the store holds only weights.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.errors import InputError, MergeError, SpecError
from peftc.inits import changes_base_weight
from peftc.methods import Method, form_module, register_method, work_dtype
from peftc.targets import MHA, check_rank
from peftc.spec import LoRA, lora_from_config, lora_to_config
from peftc.store import STORE, Adapter, AdapterStore, Capacity, lane_target, site_key

from .lora_ops import LoraBranch, LoraBranchRows, LoraGroup, LoraWeights, dora_norm, zero_weights
from .match import Site, tensor_at
from .route import route_input

aten = torch.ops.aten
FORMS = ("single", "mixed")
def _input_of(site: Site, node: Node) -> Node:
    return node.args[site.spec.input_arg]


def _batch_source(gm: GraphModule) -> Node:
    """The first tensor input, whose dim 0 is the batch."""
    return next(n for n in gm.graph.nodes if n.op == "placeholder" and hasattr(n.meta.get("val"), "shape"))


def _lora(store: AdapterStore, name: str | None) -> Adapter | None:
    """Adapter `name` if it is a LoRA adapter (the store may hold other methods' adapters too), else None."""
    ad = store.adapters[name] if name is not None and name in store.adapters else None
    return ad if ad is not None and isinstance(ad.spec, LoRA) else None


def _weights(store: AdapterStore, name: str | None, path: str) -> LoraWeights | None:
    """LoRA adapter `name`'s weights at module path `path`, or None (not LoRA, or not targeting it)."""
    ad = _lora(store, name)
    return ad.sites[site_key(path)] if ad is not None and path in ad.targets else None


def _all_weights(store: AdapterStore, path: str) -> list[LoraWeights]:
    return [w for a in store.names() if (w := _weights(store, a, path)) is not None]


def dora_at(store: AdapterStore, path: str) -> bool:
    """Whether any adapter is DoRA at `path` (the graph then has DoRA's rescale there)."""
    return any(w.dora for w in _all_weights(store, path))


def lora_bias_at(store: AdapterStore, path: str) -> bool:
    """Whether any adapter has a lora_bias at `path` (the graph then adds it there)."""
    return any(w.B_bias is not None for w in _all_weights(store, path))


def residual_at(store: AdapterStore, path: str) -> bool:
    """Whether any adapter runs on its own residual base weight at `path` (PiSSA / OLoRA)."""
    return any(w.residual is not None for w in _all_weights(store, path))


def dropout_live(store: AdapterStore, paths: list[str]) -> bool:
    """Whether any adapter has a dropout rate at one of the module paths `paths`."""
    return any(w.p > 0 for p in paths for w in _all_weights(store, p))


def _live(store: AdapterStore, paths: list[str]) -> bool:
    """Whether the graph draws dropout masks at `paths` in training: where an adapter has a rate, and everywhere
    under a capacity (an adapter with a rate may take a slot without a rebuild; a rate of 0 keeps x as it is)."""
    return store.capacity is not None or dropout_live(store, paths)


def site_rank(store: AdapterStore, path: str) -> int:
    """The rank every slot has at site `path` in the graph: the capacity's, else the largest routed there (the
    zeros that stand for an adapter not targeting the site have it too, so every adapter's inputs are alike)."""
    if store.capacity is not None:
        return store.capacity.rank
    return max((w.A.shape[0] for w in _all_weights(store, path)), default=1)


def _lora_value(w: LoraWeights | None, key: tuple, like: torch.Tensor, gm: GraphModule) -> torch.Tensor:
    """An adapter's A, B, scale or dropout rate at a site (`w`: its weights there); zeros of the graph's rank where
    it has none (another method's adapter, or one not targeting the site)."""
    part = key[2]
    t = None if w is None else {"A": w.A, "B": w.B, "s": w.scale_t, "p": w.p_t, "m": w.magnitude, "d": w.d_t,
                                "c": w.B_bias}[part]
    if t is None:             # not targeted here, or not DoRA / without lora_bias: zeros (d = 0: no rescale)
        t = torch.zeros(like.shape, dtype=like.dtype, device=_device(gm))
    return t


def _device(gm: GraphModule) -> torch.device:
    t = next(gm.parameters(), None)
    t = next(gm.buffers(), None) if t is None else t
    return t.device if t is not None else torch.device("cpu")


def insert_lora(gm: GraphModule, sites: dict[str, Site], store: AdapterStore, form: str = "single",
                paths: list[str] | None = None) -> int:
    """Wire the store's LoRA adapters into the graph at `paths` (the sites they adapt, in graph order) in `form`
    ("single" or "mixed"); the store already holds their weights. Returns the number of rewritten site calls."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if paths is None:
        routed = set(store.reserved_sites).union(*(store[a].targets for a in store.names() if _lora(store, a)))
        paths = [p for p in sites if p in routed]
    if not paths:
        return 0
    by_name = {n.name: n for n in gm.graph.nodes}
    calls = [(sites[p], by_name[n.name]) for p in paths for n in sites[p].nodes]   # this copy's site calls
    matmuls = [c for c in calls if c[0].linear_like]
    others = [c for c in calls if not c[0].linear_like]          # embeddings, convolutions: LoraBranch
    if form == "single":
        return _insert_plain(gm, matmuls, store) + _insert_branches(gm, others, store, None)
    rows = route_input(gm, ("rows",), torch.zeros(2, dtype=torch.long))              # (batch,) slot per row
    return (_insert_gathered(gm, matmuls, store, rows) if matmuls else 0) + _insert_branches(gm, others, store, rows)


def _residual_value(w: LoraWeights | None, key: tuple, like: torch.Tensor, gm: GraphModule) -> torch.Tensor:
    """The base weight an adapter runs on at a site: its PiSSA / OLoRA residual, else the model's weight."""
    return w.residual if w is not None and w.residual is not None else tensor_at(gm, key[2])


def _route_residuals(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore) -> None:
    """Where an adapter runs on a residual weight (PiSSA / OLoRA), the site call reads its weight from the call's
    route: that adapter's residual, the model's own weight for every other adapter."""
    for site, node in calls:
        if residual_at(store, site.fqn):
            node.update_arg(site.spec.weight_arg,
                            route_input(gm, ("residual", site.fqn, site.weight), tensor_at(gm, site.weight)))


# --- plain form -------------------------------------------------------------------------------------------------
def _insert_plain(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore) -> int:
    _route_residuals(gm, calls, store)
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    groups: dict[Node, list[tuple[Site, Node]]] = {}
    for site, node in sorted(calls, key=lambda c: order[c[1]]):
        groups.setdefault(_input_of(site, node), []).append((site, node))
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
    kind = site.spec
    weight = node.args[kind.weight_arg]
    bias = node.args[kind.bias_arg] if kind.bias_arg is not None and kind.bias_arg < len(node.args) else None
    shape = (1, site.out_features, *(1,) * (w.dim() - 2)) if site.kind == "conv" else (site.out_features,)
    m = route_input(gm, ("lora", site.fqn, "m"), w.new_empty(shape))
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
        doras.append(_dora_args(gm, site, node, w) if dora_at(store, site.fqn) else None)
        biases.append(route_input(gm, ("lora", site.fqn, "c"), w.new_empty(site.out_features))
                      if lora_bias_at(store, site.fqn) else None)
    remake, srcs = _recipe(gm, x)
    target = form_module(gm, "single", LoraGroup(paths, live=_live(store, paths), remake=remake,
                                              dora=[d is not None for d in doras],
                                              kinds=[site.kind for site, _ in members]), "g")
    ys = [node for _, node in members]
    made = []
    extra = [doras if any(d is not None for d in doras) else [],
             biases if any(c is not None for c in biases) else [], srcs]
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


# --- gathered form ----------------------------------------------------------------------------------------------
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


def _insert_gathered(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore, rows: Node) -> int:
    mha = [site.fqn for site, _ in calls if site.module_type == MHA or site.parent]
    if mha:
        raise InputError(f"{mha[0]} (nn.MultiheadAttention) has no per-row form, as in PEFT (which refuses "
                         "adapter_names there): a row of an unbatched or sequence-first input is a position, which "
                         "attention mixes with the others; run each adapter's rows in a batch of their own")
    slots = store.slots()
    names = [a for a in slots[1:] if _lora(store, a) is not None]
    capacity = store.capacity
    rank = capacity.rank if capacity else max((w.r for a in names for w in store[a].sites.values()), default=1)
    g = gm.graph
    first = _batch_source(gm)
    with g.inserting_after(rows):
        batch = g.call_function(aten.sym_size.int, (first, 0))
    new: list[Node] = [batch]
    outs: set[Node] = set()
    banks: dict[str, str] = {}
    for site, node in calls:
        key = site_key(site.fqn)
        if key not in banks:
            w = tensor_at(gm, site.weight)
            banks[key] = form_module(gm, "mixed", SiteBank(rank, site.in_features, site.out_features, w.dtype,
                                                           w.device, _live(store, [site.fqn])), "bank")
            if capacity is not None:       # fixed shapes: every slot's lane has weights here, whoever fills it
                for i in range(1, len(slots)):
                    store.lane_weights(i, "lora", key, _zeros(site, capacity.rank, w))
        bank = banks[key]
        _rewrite(gm, site, node, key, store, rank, rows, batch, bank, hasattr(gm.get_submodule(bank), "dropout"),
                 _batch_dim(site, _input_of(site, node), first))
    return len(calls)


_ALIASES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default)


def _exact(val, b) -> list[int]:
    """The dims of a traced value that are the batch symbol `b`."""
    if not hasattr(val, "shape") or not isinstance(b, torch.SymInt):
        return []
    return [i for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt) and d.node.expr == b.node.expr]


def _batch_dim(site: Site, x: Node, first: Node) -> int:
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


def _rewrite(gm, site, node, key, store, rank, rows, batch, bank, dropout, bdim: int = 0) -> tuple[list[Node], Node]:
    """Insert the routed subgraph after the site call `node`; returns (the new nodes, the site's new output).
    `bank`: the target of the site's SiteBank; `bdim`: the batch dim of the site's input and output, moved to the
    front and back."""
    g = gm.graph
    x = _input_of(site, node)
    made: list[Node] = []
    base = node

    def call(target, *args):
        made.append(g.call_function(target, args))
        return made[-1]

    def attr(target):
        made.append(g.get_attr(target))
        return made[-1]

    with_bias = lora_bias_at(store, site.fqn)
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
            w = _weights(store, a, site.fqn)
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
        if dropout:
            p_rows = call(aten.index.Tensor, call(aten.stack.default, p_list), [rows])          # (batch,)
            made.append(g.call_module(f"{bank}.dropout", (x3, p_rows)))
            x3 = made[-1]
        h = call(aten.bmm.default, x3, call(aten.transpose.int, A_rows, 1, 2))                  # (batch, T, R)
        h = call(aten.mul.Tensor, h, call(aten.view.default, s_rows, [-1, 1, 1]))   # scale the small tensor
        y3 = call(aten.reshape.default, node, [batch, -1, site.out_features])
        y3 = call(aten.baddbmm_.default, y3, h, call(aten.transpose.int, B_rows, 1, 2))  # y += h @ B^T, one GEMM
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


# --- embeddings and convolutions: one LoraBranch call per site ---------------------------------------------------
def _insert_branches(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore, rows: Node | None) -> int:
    """y' = y + s B(A(x)) at each embedding / convolution site call (PEFT's lora_embedding_A/B, its lora_A conv and
    1x1 lora_B conv): in the plain form with the call's adapter's weights as route inputs; in the gathered form
    (`rows` given) with every slot's weights, each applied to its own rows."""
    g = gm.graph
    slots = store.slots()
    for site, node in calls:
        key = site_key(site.fqn)
        w = tensor_at(gm, site.weight)
        op = {"embedding": "embedding", "conv": f"conv{len(site.weight_shape) - 2}d"}[site.kind]
        dora = rows is None and dora_at(store, site.fqn)
        branch = (LoraBranch if rows is None else LoraBranchRows)(op, site.params, [site.fqn],
                                                                  live=_live(store, [site.fqn]), dora=dora)
        x = _input_of(site, node)
        biased = lora_bias_at(store, site.fqn)
        if rows is None:
            r = site_rank(store, site.fqn)
            kernel, groups = site.weight_shape[2:] if site.kind == "conv" else (), site.params.get("groups", 1)
            A = w.new_empty(r, site.in_features, *kernel)
            B = w.new_empty(site.out_features, r // groups, *(1,) * len(kernel))
            parts = [route_input(gm, ("lora", site.fqn, part), ex) for part, ex in
                     (("A", A), ("B", B), ("s", w.new_empty(())), ("p", w.new_empty(())))]
            parts.append(route_input(gm, ("lora", site.fqn, "c"), w.new_empty(site.out_features))
                         if biased else None)
            if dora:
                parts.append(_dora_args(gm, site, node, w))
            while parts[-1] is None:
                parts.pop()
            target = form_module(gm, "single", branch, "b")
            with g.inserting_after(node):
                out = g.call_module(target, (x, node, *parts))
        else:
            bank = form_module(gm, "mixed", SiteBank(0, 0, 0, w.dtype, w.device, dropout=False), "bank")
            gm.get_submodule(bank).branch = branch
            A_s, B_s, c_s, s_s = [], [], [], []
            with g.inserting_after(node):
                anchor = node
                for i, a in enumerate(slots[1:], start=1):
                    if store.capacity is not None:
                        lw = store.lane_weights(i, "lora", key, _zeros(site, store.capacity.rank, w))
                        prefix = f"{lane_target(i, 'lora', key)}"
                    elif _weights(store, a, site.fqn) is not None:
                        lw, prefix = _weights(store, a, site.fqn), f"{STORE}.adapters.{a}.sites.{key}"
                    else:
                        A_s.append(None), B_s.append(None), c_s.append(None), s_s.append(None)
                        continue
                    for lst, attr in ((A_s, "A"), (B_s, "B"), (c_s, "B_bias"), (s_s, "scale_t")):
                        if attr == "B_bias" and lw.B_bias is None:
                            lst.append(None)
                            continue
                        with g.inserting_after(anchor):
                            anchor = g.get_attr(f"{prefix}.{attr}")
                        lst.append(anchor)
                with g.inserting_after(anchor):
                    out = g.call_module(f"{bank}.branch", (x, node, rows, A_s, B_s, s_s, c_s))
        out.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        for n in [out, *[a for a in out.all_input_nodes if a.op == "get_attr" and STORE in a.target]]:
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    return len(calls)


def _shape_of(site: Site) -> dict:
    """LoraWeights' shape arguments for a site (kind, and a convolution's kernel and groups)."""
    if site.kind != "conv":
        return {"kind": site.kind}
    return {"kind": site.kind, "kernel": tuple(site.weight_shape[2:]), "groups": site.params.get("groups", 1)}


def _zeros(site: Site, rank: int, w: torch.Tensor):
    """A maker of frozen zero LoraWeights for `site` at `rank` (a capacity's empty lane)."""
    return lambda: zero_weights(rank, site.in_features, site.out_features, w.dtype, w.device, **_shape_of(site))


def lora_delta(adapter: Adapter, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """LoRA's fold rule for merge(), in the layout of the site's weight (linear [out, in], Conv1D [in, out],
    embedding [num, dim], convolution [out, in, *kernel]), in work_dtype (float32; float64 for float64 weights):
    s B A; with DoRA g (V + s B A) - W, where g = m / ||V + s B A|| per output channel (1 where the norm is 0, as the
    unmerged graph has it) and V is the weight the adapter runs on: W, or its PiSSA / OLoRA residual (which the
    delta then replaces W by)."""
    w = adapter.sites[site_key(site.fqn)]
    dt = work_dtype(weight.dtype, w.A_r.dtype)
    A, B = w.A_r.detach().to(dt), w.B_r.detach().to(dt)
    if site.kind == "conv" and w.groups > 1:
        raise MergeError(f"{site.fqn} is a convolution with groups={w.groups}: its LoRA update (a dense A conv) is "
                         "not a grouped weight, so it cannot be merged (PEFT refuses it too); use the unmerged module")
    if site.kind == "conv":
        delta = w.scale * torch.einsum("or,ri...->oi...", B.flatten(1), A)       # [out, in, *kernel]
    elif site.kind in ("embedding", "conv1d"):
        delta = w.scale * (B @ A).t()                                             # [in, out] layouts
    else:
        delta = w.scale * (B @ A)                                                 # [out, in]
    if not w.dora and w.residual is None:
        return delta
    base = weight if w.residual is None else w.residual
    W, V = weight.detach().to(dt), base.detach().to(dt)
    if w.dora:
        n = dora_norm(base, w.A_r, w.B_r, w.scale, site.kind)
        m = w.magnitude.detach().to(dt).flatten()
        g = torch.where(n > 0, m / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
        channel = 1 if site.kind in ("embedding", "conv1d") else 0                # the output channels' axis
        shape = [1] * W.dim()
        shape[channel] = -1
        return g.view(shape) * (V + delta) - W
    return V + delta - W


def lora_bias_delta(adapter: Adapter, site: Site, bias: torch.Tensor | None) -> torch.Tensor | None:
    """s b_B, what merge() adds to the layer's bias for lora_bias (None without it), in work_dtype."""
    w = adapter.sites[site_key(site.fqn)]
    if w.B_bias is None:
        return None
    dt = work_dtype(w.B_bias.dtype, *(() if bias is None else (bias.dtype,)))
    return w.scale * w.B_bias.detach().to(dt)


def check_lora(spec: LoRA, sites: dict[str, Site], chosen: list[str], loading: bool) -> None:
    """LoRA's own rules before any weight is made: ranks that fit (PEFT accepts r > min(in, out), so checkpoints
    it wrote must load: not checked when loading) and options only some layer kinds serve (refused by name, as PEFT
    refuses them)."""
    if not loading:
        check_rank(spec, sites, chosen)
    for path in chosen:
        site = sites[path]
        if site.module_type == "MultiheadAttention" and (spec.use_dora or spec.init not in (True, False, "gaussian")):
            raise SpecError(f"{'use_dora' if spec.use_dora else f'init={spec.init!r}'} on {path} "
                            "(nn.MultiheadAttention) is not supported (as in PEFT); leave it out of targets "
                            "(exclude_modules) or drop the option")
        if site.module_type == "MultiheadAttention" and spec.lora_bias:
            # PEFT 0.21.2 makes and saves the packed in_proj's lora_B.bias but never applies it (its forward adds
            # only s B A to in_proj_weight): an adapter with that bias would mean one thing here and another there
            raise SpecError(f"lora_bias on {path} (nn.MultiheadAttention) is not supported: PEFT keeps a bias for "
                            "its packed in_proj but never applies it, so the adapter would not carry over between "
                            "peftc and PEFT; leave it out of targets (exclude_modules) or pass lora_bias=False")
        if site.linear_like:
            if spec.init == "olora" and site.kind == "conv1d":
                raise SpecError(f"init 'olora' on {path} (a GPT-2 Conv1D layer) is not supported: PEFT's OLoRA "
                                "factors the stored [in, out] weight, which does not reproduce the layer; use "
                                "'pissa' or another init there")
            continue
        what = {"embedding": "an embedding", "conv": "a convolution"}[site.kind]
        unsupported = ["lora_bias"] if spec.lora_bias and site.kind == "embedding" else []
        if spec.init not in (True, False, "gaussian"):
            unsupported.append(f"init={spec.init!r}")
        if unsupported:
            raise SpecError(f"{', '.join(unsupported)} on {site.fqn} ({what}, {site.module_type or site.kind}) is "
                            "not supported: peftc serves it on linear and Conv1D layers; leave the layer out "
                            "of targets (exclude_modules) or drop the option")


def build_lora(spec: LoRA, site: Site, weight: torch.Tensor) -> LoraWeights:
    """LoRA's weights at one site: A and B by the spec's init (PiSSA / OLoRA from the weight, with the residual the
    adapter runs on), and DoRA's magnitude m = ||W + s B A|| per output channel, so that it starts as the identity."""
    at = site.pattern_path        # an nn.MultiheadAttention's out_proj: its attention module's r and alpha
    p = 0.0 if site.module_type == MHA or site.parent else spec.dropout   # PEFT runs MHA on merged weights
    lw = LoraWeights(spec.rank_at(at), site.in_features, site.out_features, spec.scale_at(at), p,
                     spec.init, dtype=weight.dtype, device=weight.device, dora=spec.use_dora, bias=spec.lora_bias,
                     **_shape_of(site))
    if changes_base_weight(spec.init):
        lw.set_residual_init(spec.init, weight, site.kind == "conv1d")
    if spec.use_dora:
        base = weight if lw.residual is None else lw.residual
        with torch.no_grad():
            lw.magnitude.copy_(dora_norm(base, lw.A_r, lw.B_r, lw.scale, site.kind).view(lw.magnitude.shape))
    return lw


def lora_keys(path: str, w: LoraWeights):
    """PEFT's checkpoint names of LoRA's tensors at a site (after base_model.model.<path>.)."""
    if w.kind == "embedding":            # PEFT's Embedding holds bare Parameters
        yield "lora_embedding_A", w.A_r
        yield "lora_embedding_B", w.B_r
    else:
        yield "lora_A.weight", w.A_r
        yield "lora_B.weight", w.B_r
    if w.B_bias is not None:
        yield "lora_B.bias", w.B_bias
    if w.dora:
        yield "lora_magnitude_vector", w.magnitude


def lora_param_count(spec: LoRA, site: Site) -> int:
    """A [r, in, *kernel] + B [out, r / groups, 1...] + a magnitude (DoRA) or B's bias (lora_bias) per channel."""
    r = spec.rank_at(site.pattern_path)
    kernel = math.prod(site.weight_shape[2:]) if site.kind == "conv" else 1
    groups = site.params.get("groups", 1) if site.kind == "conv" else 1
    return r * site.in_features * kernel + site.out_features * (r // groups) + \
        (spec.use_dora or spec.lora_bias) * site.out_features


def lora_mixed_refusal(adapter: Adapter) -> str | None:
    """Why a LoRA adapter cannot join a mixed batch (the gathered form has no DoRA rescale and routes no residual
    weights), or None."""
    if adapter.spec.use_dora:
        return "it uses DoRA, whose per-channel rescale the per-row form does not have yet (PEFT refuses " \
               "adapter_names with DoRA too)"
    if any(w.residual is not None for w in adapter.sites.values()):
        return f"it runs on its own residual base weights (init {adapter.spec.init!r}), which the per-row form " \
               "does not route"
    return None


def lora_fits_graph(gm: GraphModule, adapter: Adapter) -> bool:
    """Whether the plain-form graph `gm`'s LoRA subgraph already serves `adapter` as data: no lora_bias or residual
    inputs of its own, and DoRA only where the graph has DoRA's rescale."""
    if any(w.B_bias is not None or w.residual is not None for w in adapter.sites.values()):
        return False
    dora = {p for p in adapter.targets if adapter.sites[site_key(p)].dora}
    rescaled = {p for g in gm.modules() if isinstance(g, LoraGroup) for p, on in zip(g.paths, g.dora) if on}
    return dora <= rescaled


def lora_room(adapter: Adapter, capacity: Capacity) -> str | None:
    """Why a LoRA adapter does not fit `capacity`: a capacity without a rank, or a rank above it."""
    rank = max((w.r for w in adapter.sites.values()), default=0)
    if capacity.rank is None:
        return f"LoRA adapters need a capacity rank; declare one with pm.reserve(adapters=..., rank={rank})"
    if rank > capacity.rank:
        return f"it has rank r={rank}, above the declared capacity's rank {capacity.rank}; pm.reserve(rank={rank}) " \
               "first (one recompile)"
    return None


register_method(Method(LoRA, "LORA", lora_from_config, lora_to_config, build=build_lora, rewrite=insert_lora,
                       peft_keys=lora_keys, route_values={"lora": _lora_value, "residual": _residual_value},
                       site_kinds=("linear", "conv1d", "embedding", "conv"), check=check_lora,
                       fold=lora_delta, fold_bias=lora_bias_delta, mixed_refusal=lora_mixed_refusal,
                       pad=lambda w, cap: w.padded(cap.rank), empty=lambda w, cap: w.zeros(cap.rank),
                       room=lora_room, fits_graph=lora_fits_graph, param_count=lora_param_count))
