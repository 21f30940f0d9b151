"""modules_to_save pass: give named non-adapter modules (a classifier head, say) trainable copies of their weights.

    Before:  w = get_attr classifier.weight                       (frozen, shared with the user's model)
    After:   w = get_attr peftc_store.adapters.<name>.saved.classifier.weight   (a trainable copy)
"""
from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.store import STORE, Adapter, site_key


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


def insert_saved_copies(gm: GraphModule, adapter: Adapter, name: str) -> int:
    """Point every weight read of adapter.saved_modules at a trainable copy in the store; returns the rewrite count."""
    count = 0
    for path in adapter.saved_modules:
        holder = nn.Module()
        adapter.saved[site_key(path)] = holder
        for node in gm.graph.nodes:
            if node.op != "get_attr" or not node.target.startswith(path + "."):
                continue
            leaf = node.target[len(path) + 1:].replace(".", "-")
            if leaf not in holder._parameters:
                src = gm.get_parameter(node.target)
                holder.register_parameter(leaf, nn.Parameter(src.detach().clone(), requires_grad=True))
            node.meta["peftc"] = {"adapter": name, "saved_from": node.target, "method": "modules_to_save"}
            node.target = f"{STORE}.adapters.{name}.saved.{site_key(path)}.{leaf}"
            count += 1
    return count
