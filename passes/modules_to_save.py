"""modules_to_save pass: named non-adapter modules (a classifier head, say) read the active adapter's trainable copy.

    Before:  w = get_attr classifier.weight                          (frozen, shared with the user's model)
    After:   w = stack([classifier.weight, copy_1, copy_2, ...])[store.active]
             (slot 0, the base model, and adapters that do not save the module read the original)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.store import STORE, AdapterStore, site_key

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
    from peftc.targets import name_matches

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
    from .match import module_path

    fqn = module_path(node)[0]
    return fqn == path or fqn.startswith(path + ".")


def insert_saved_copies(gm: GraphModule, store: AdapterStore) -> int:
    """Route every weight read of a saved module through the active adapter's copy; returns the rewrite count."""
    slots = store.slots()
    names = [a for a in slots[1:] if a is not None]
    saved = {p: [a for a in names if p in store[a].saved_modules] for a in names for p in store[a].saved_modules}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target.startswith(STORE):
            continue
        path = next((p for p in saved if node.target.startswith(p + ".")), None)
        if path is None:
            continue
        leaf = node.target[len(path) + 1:].replace(".", "-")
        meta = {"method": "modules_to_save", "adapter": "*", "saved_from": node.target}
        g = gm.graph
        with g.inserting_after(node):
            active = g.get_attr(f"{STORE}.active")
        choices = [node] + [node for _ in slots[1:]]
        made = [active]
        last = active
        for i, a in enumerate(slots[1:], start=1):
            if a in saved[path]:
                with g.inserting_after(last):
                    choices[i] = g.get_attr(f"{STORE}.adapters.{a}.saved.{site_key(path)}.{leaf}")
                last = choices[i]
                made.append(last)
        with g.inserting_after(last):
            stacked = g.call_function(aten.stack.default, (choices,))
        with g.inserting_after(stacked):
            idx = g.call_function(aten.view.default, (active, [1]))
        with g.inserting_after(idx):
            picked = g.call_function(aten.index.Tensor, (stacked, [idx]))                # (1, *weight.shape)
        with g.inserting_after(picked):
            out = g.call_function(aten.squeeze.dim, (picked, 0))
        made += [stacked, idx, picked, out]
        # only the saved module's own reads: a tied weight read elsewhere (GPT-2's embedding) keeps the original
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not stacked and _inside(u, path))
        for n in made:
            n.meta["peftc"] = dict(meta, role="out" if n is out else "part")
        count += 1
    return count
