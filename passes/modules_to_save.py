"""modules_to_save pass: named non-adapter modules (a classifier head, say) read the call's adapter's trainable copy.

    Before:  w = get_attr classifier.weight                          (frozen, shared with the user's model)
    After:   w = route input ("saved", "classifier", "weight", "classifier.weight")
             (the call passes its adapter's copy, or the original where the adapter does not save the module)

Only the plain form (one adapter for the whole call) has this pass: the gathered form serves mixed batches, which
may not hold an adapter with modules_to_save (PeftModule.check_mixed), so it reads the originals.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.store import STORE, AdapterStore, site_key
from peftc.targets import name_matches

from .match import module_path, tensor_at
from .route import route_input, route_value

aten = torch.ops.aten


def module_paths(gm: GraphModule) -> set[str]:
    """Every module path that owns a weight read by the graph."""
    paths = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not n.target.startswith(STORE):
            parts = n.target.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return paths


def resolve_modules_to_save(gm: GraphModule, names, optional: tuple[str, ...] = ()) -> list[str]:
    """Module paths matched by `names` (PEFT's rule: exact path or trailing components). Names in `optional` (PEFT's
    automatic SEQ_CLS heads) may match nothing."""
    paths = module_paths(gm)
    chosen: list[str] = []
    for name in names:
        hits = sorted(p for p in paths if name_matches(p, name))
        if not hits and name not in optional:
            top = sorted({p.split(".")[0] for p in paths})
            raise SpecError(f"modules_to_save: {name!r} matched no module with weights; top-level modules: {top}")
        chosen += [h for h in hits if h not in chosen and not any(h.startswith(c + ".") for c in chosen)]
    return chosen


def saved_copies(gm: GraphModule, path: str) -> nn.Module:
    """Trainable copies of every weight the graph reads under module `path` (leaf names with '-' for '.')."""
    holder = nn.Module()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith(path + "."):
            leaf = node.target[len(path) + 1:].replace(".", "-")
            if leaf not in holder._parameters:
                owner, _, name = node.target.rpartition(".")
                src = getattr(gm.get_submodule(owner), name)
                holder.register_parameter(leaf, nn.Parameter(src.detach().clone(), requires_grad=True))
    return holder


def _inside(node, path: str) -> bool:
    fqn = module_path(node)[0]
    return fqn == path or fqn.startswith(path + ".")


@route_value("saved")
def _saved_value(store: AdapterStore, name: str, key: tuple, like, gm: GraphModule):
    """Adapter `name`'s trainable copy of a saved module's weight, or the original where it does not save it."""
    _, path, leaf, target = key
    adapter = store[name]
    if path in adapter.saved_modules:
        return adapter.saved[site_key(path)].get_parameter(leaf), ()
    return tensor_at(gm, target), ()


def insert_saved_copies(gm: GraphModule, store: AdapterStore) -> int:
    """Make every weight read of a saved module a route input; returns the rewrite count."""
    saved = {p for a in store.names() for p in store[a].saved_modules}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target.startswith(STORE):
            continue
        path = next((p for p in saved if node.target.startswith(p + ".")), None)
        if path is None:
            continue
        leaf = node.target[len(path) + 1:].replace(".", "-")
        value = tensor_at(gm, node.target)
        inp = route_input(gm, ("saved", path, leaf, node.target), value)
        # only the saved module's own reads: a tied weight read elsewhere (GPT-2's embedding) keeps the original
        node.replace_all_uses_with(inp, delete_user_cb=lambda u: _inside(u, path))
        inp.meta["peftc"] = {"method": "modules_to_save", "adapter": "*", "role": "out", "saved_from": node.target}
        count += 1
    return count
