"""modules_to_save and trained biases: model tensors that an adapter trains read the call's adapter's copy.

    Before:  w = get_attr classifier.weight                          (frozen, shared with the user's model)
    After:   w = route input ("saved", "classifier", "weight", "classifier.weight")
             (the call passes its adapter's copy, or the original where the adapter has no copy of it)

Two kinds of copies, one mechanism: `modules_to_save` copies every tensor the graph reads under a module (a
classifier head; only that module's own reads take the copy, so a tied weight read elsewhere keeps the original, as
PEFT's wrapped module does), and LoRA's `bias` ("all": every `*.bias` parameter; "lora_only": the adapted layers'
biases) copies just the bias of a module (every read of it takes the copy: PEFT trains that one parameter in place).
Either lives in `adapter.saved[site_key(path)]`, with its module path in `adapter.saved_modules`.

Only the plain form (one adapter for the whole call) has this pass: the gathered form serves mixed batches, which
may not hold an adapter with copies (PeftModule.check_mixed), so it reads the originals.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.spec import BIAS_MODES
from peftc.store import STORE, Adapter, AdapterStore, site_key
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


def _read_parameters(gm: GraphModule) -> list[str]:
    """get_attr targets of the graph that are parameters (not buffers), in graph order, each once."""
    out: dict[str, None] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not n.target.startswith(STORE):
            owner, _, leaf = n.target.rpartition(".")
            if leaf in gm.get_submodule(owner)._parameters:
                out[n.target] = None
    return list(out)


def resolve_biases(gm: GraphModule, bias: str, targets: list[str], saved: list[str]) -> list[str]:
    """Module paths whose `bias` parameter an adapter with LoRA's `bias` trains, as PEFT chooses them: "all", every
    parameter named `bias` the graph reads; "lora_only", the adapted layers' own; "none", none. Biases inside a
    module of `saved` (modules_to_save) are left out: that module's copy has them already."""
    if bias not in BIAS_MODES:
        raise SpecError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    if bias == "none":
        return []
    read = _read_parameters(gm)
    if bias == "all":
        paths = [t.rpartition(".")[0] for t in read if t.rpartition(".")[2] == "bias"]
    else:
        have = set(read)
        paths = [p for p in targets if f"{p}.bias" in have]
    return [p for p in paths if not any(p == s or p.startswith(s + ".") for s in saved)]


def saved_copies(gm: GraphModule, path: str, leaves: tuple[str, ...] | None = None) -> nn.Module:
    """Trainable copies of every weight the graph reads under module `path` (leaf names with '-' for '.'), or of its
    own tensors named in `leaves` only (("bias",): a trained bias). `holder.whole` says which."""
    holder = nn.Module()
    holder.whole = leaves is None
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith(path + "."):
            leaf = node.target[len(path) + 1:].replace(".", "-")
            if leaf not in holder._parameters and (leaves is None or leaf in leaves):
                owner, _, name = node.target.rpartition(".")
                src = getattr(gm.get_submodule(owner), name)
                holder.register_parameter(leaf, nn.Parameter(src.detach().clone(), requires_grad=True))
    return holder


def copy_of(adapter: Adapter, target: str) -> tuple[nn.Parameter, bool] | None:
    """(adapter's trainable copy of the tensor at get_attr `target`, whether it is a whole module's), or None."""
    for path in adapter.saved_modules:
        if target.startswith(path + "."):
            holder = adapter.saved[site_key(path)]
            leaf = target[len(path) + 1:].replace(".", "-")
            if leaf in holder._parameters:
                return holder._parameters[leaf], getattr(holder, "whole", True)
    return None


def _inside(node, path: str) -> bool:
    fqn = module_path(node)[0]
    return fqn == path or fqn.startswith(path + ".")


@route_value("saved")
def _saved_value(store: AdapterStore, name: str, key: tuple, like, gm: GraphModule):
    """Adapter `name`'s trainable copy of a model tensor, or the original where it has no copy of it."""
    found = copy_of(store[name], key[3])
    return found[0] if found is not None else tensor_at(gm, key[3])


def insert_saved_copies(gm: GraphModule, store: AdapterStore) -> int:
    """Make every read of a tensor that some adapter copies a route input; returns the rewrite count."""
    copied: dict[str, tuple[str, bool]] = {}   # get_attr target -> (module path, whether some copy is whole-module)
    for a in store.names():
        ad = store[a]
        for path in ad.saved_modules:
            holder = ad.saved[site_key(path)]
            for leaf in holder._parameters:
                target = f"{path}.{leaf.replace('-', '.')}"
                whole = getattr(holder, "whole", True)
                old = copied.get(target)
                copied[target] = (path if old is None or whole and not old[1] else old[0],
                                  whole or (old is not None and old[1]))
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in copied:
            continue
        path, whole = copied[node.target]
        leaf = node.target[len(path) + 1:].replace(".", "-")
        value = tensor_at(gm, node.target)
        inp = route_input(gm, ("saved", path, leaf, node.target), value)
        # a whole module's copy: only that module's own reads (a tied weight read elsewhere, GPT-2's embedding,
        # keeps the original); a trained bias: every read, the LoRA and DoRA subgraphs' too
        node.replace_all_uses_with(inp, delete_user_cb=(lambda u: _inside(u, path)) if whole else (lambda u: True))
        count += 1
    return count


def fold_saved_copies(gm: GraphModule, adapter: Adapter, set_constant) -> int:
    """merge()'s part: in a copy of the base graph, the reads of every tensor `adapter` copies read its copy as a
    constant (`set_constant(gm, target, tensor)`), by the rule insert_saved_copies routes them with; returns the
    count. A tied weight read outside a whole module's copy (GPT-2's embedding) keeps the original."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        found = copy_of(adapter, node.target)
        if found is None:
            continue
        copy, whole = found
        path = next(p for p in adapter.saved_modules if node.target.startswith(p + "."))
        inside = [u for u in node.users if not whole or _inside(u, path)]
        if not inside:
            continue
        target = node.target
        if len(inside) < len(node.users):       # read elsewhere too: the copy gets a name of its own
            target = f"{node.target}_saved"
        set_constant(gm, target, copy.detach())
        if target == node.target:
            count += 1
            continue
        with gm.graph.inserting_after(node):
            const = gm.graph.get_attr(target)
        for u in inside:
            u.replace_input_with(node, const)
        count += 1
    return count
