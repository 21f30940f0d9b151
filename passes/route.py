"""Per-call inputs of a rewritten graph: what one call needs (its adapter's weights, its rows' slots) enters the graph
as that call's own arguments, never as state another call could see.

    Before:  def forward(self, input_ids, attention_mask): ...
    After:   def forward(self, input_ids, attention_mask, peftc_route):
                 input_ids, attention_mask, route_0, route_1, ... = tree_flatten_spec(...)
             (peftc_route is a list of tensors; each placeholder's meta["peftc_route"] names what it is)

Passes call `route_input(gm, key, example)` for each thing they need per call; the same key gives the same
placeholder. Each kind of key (its first item: "lora", "saved", ...) registers how to find its value for one
adapter (`@route_value("lora")`), and `plain_route(gm, store, name)` gives a whole-batch call's route in order.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch
from torch.fx import GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

ROUTE = "peftc_route"   # the keyword argument of the rewritten graph


def _route_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder" and "peftc_route" in n.meta]


def route_keys(gm: GraphModule) -> list[Hashable]:
    """What each entry of the graph's `peftc_route` argument is, in order ([] for a graph without one). Read off
    the placeholders, so a copy of the graph keeps it."""
    return [n.meta["peftc_route"] for n in _route_nodes(gm)]


def route_entries(gm: GraphModule) -> list[tuple[Hashable, torch.Tensor]]:
    """(key, a meta tensor of its shape and dtype) for each entry of the route, in order."""
    return [(n.meta["peftc_route"], n.meta["val"]) for n in _route_nodes(gm)]


def route_input(gm: GraphModule, key: Hashable, example: torch.Tensor) -> Node:
    """The placeholder of route entry `key`, appended to the graph's inputs on first use; `example` gives its
    meta["val"] (shape, dtype) for later passes."""
    nodes = _route_nodes(gm)
    for n in nodes:
        if n.meta["peftc_route"] == key:
            return n
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(f"route_{len(nodes)}")
    node.meta["val"] = torch.empty_like(example, device="meta")   # shape and dtype only: copies of the graph stay small
    node.meta["peftc_route"] = key
    _set_spec(gm, len(nodes) + 1)
    return node


# kind -> (owner, fn): a method's kinds (owner: its spec class) take fn(site weights or None, key, like, gm) -> tensor;
# kinds of no method (owner None) take fn(store, adapter name, key, like, gm) -> tensor
_VALUES: dict[str, tuple[type | None, Callable]] = {}


def add_route_value(kind: str, fn: Callable, owner: type | None = None) -> None:
    """Register how route entries of `kind` are looked up for one adapter (a Method's route_values come here, with
    the method's spec class as `owner`)."""
    if kind in _VALUES:
        raise ValueError(f"route entries of kind {kind!r} are registered already ({_VALUES[kind][1].__module__})")
    _VALUES[kind] = (owner, fn)


def remove_route_value(kind: str) -> None:
    _VALUES.pop(kind, None)


def route_kinds() -> list[str]:
    return sorted(_VALUES)


def route_value(kind: str):
    """Decorator form of add_route_value, for route entries that belong to no method (passes.modules_to_save)."""
    def register(fn):
        add_route_value(kind, fn)
        return fn
    return register


def _site_weights(store, name: str, owner: type, path: str):
    """Adapter `name`'s weights at module path `path` if it is of the method `owner` and adapts the site, else None."""
    ad = store.adapters[name]
    if not isinstance(ad.spec, owner) or path not in ad.targets:
        return None
    return ad.sites[path.replace(".", "-")]


def _value(store, name: str, key, like, gm) -> torch.Tensor:
    entry = _VALUES.get(key[0])
    if entry is None:
        raise KeyError(f"no route value registered for {key}; registered kinds: {sorted(_VALUES)}")
    owner, fn = entry
    if owner is None:
        return fn(store, name, key, like, gm)
    return fn(_site_weights(store, name, owner, key[1]), key, like, gm)


def _shape(store, name: str, key, like, gm) -> tuple:
    """The shape of adapter `name`'s value for `key` (`like`'s where a method's adapter has no weights there: the
    value that changes nothing has the graph's shape)."""
    owner = _VALUES[key[0]][0]
    if owner is not None and _site_weights(store, name, owner, key[1]) is None:
        return tuple(like.shape)
    return tuple(_value(store, name, key, like, gm).shape)


def plain_route(gm: GraphModule, store, name: str, *, detach: bool = False) -> list[torch.Tensor]:
    """The route of a call whose every row uses adapter `name`: its own tensors (no copies), in gm's order.
    `detach`: views without autograd history (for calls without autograd: frozen and trainable adapters then look
    alike to torch.compile). Dims whose size differs between the store's adapters (LoRA's ranks) are marked
    dynamic, so one compiled graph serves all (unbacked where the value function says `fn.unbacked = True`: sizes
    0 and 1 are then not specialized)."""
    out = []
    names = store.names() if store is not None else [name]
    for key, like in route_entries(gm):
        t = _value(store, name, key, like, gm)
        t = t.detach() if detach else t
        if t.dim() and len(names) > 1:
            shapes = {tuple(t.shape) if a == name else _shape(store, a, key, like, gm) for a in names}
            mark = torch._dynamo.decorators.mark_unbacked if getattr(_VALUES[key[0]][1], "unbacked", False) \
                else torch._dynamo.maybe_mark_dynamic
            for d in range(t.dim()):
                if len({s[d] for s in shapes if len(s) == t.dim()}) > 1:
                    mark(t, d)
        out.append(t)
    return out


def drop_route_inputs(gm: GraphModule) -> None:
    """Remove the route's placeholders (none may have users left) and the `peftc_route` argument."""
    nodes = _route_nodes(gm)
    if not nodes:
        return
    for n in nodes:
        if n.users:
            raise AssertionError(f"route input {n.meta['peftc_route']} is still used by {list(n.users)}")
        gm.graph.erase_node(n)
    _set_spec(gm, 0)


def _set_spec(gm: GraphModule, n: int) -> None:
    """Make the graph's pytree signature take `peftc_route` (a list of n tensors) after its own inputs."""
    codegen = gm.graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        raise TypeError("route inputs need a graph traced by torch.export (a pytree signature)")
    info = codegen.pytree_info
    args, kwargs = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)
    kwargs = dict(kwargs)
    orig = [a for a in info.orig_args if a != ROUTE]
    kwargs.pop(ROUTE, None)
    if n:
        kwargs[ROUTE] = [0] * n
        orig.append(ROUTE)
    codegen.pytree_info = _PyTreeInfo(orig, pytree.tree_structure((args, kwargs)), info.out_spec)
