"""Per-layer structure: the model's repeated blocks (decoder / encoder layers) called as modules at their own paths.

A traced graph is flat: `model.layers.0` only holds parameters, so a hook, `fully_shard` or an activation-checkpoint
wrapper put on it never runs. `structure(gm, root, blocks, form)` splits one form's flat graph into generated code:

    Before (flat):  h1 = add(h0, linear(norm(h0), model.layers.0.self_attn.q_proj.weight) ...)   # 64 nodes per layer
    After (top):    h1 = self.model.layers[0](h0, cos, sin, mask, peftc_form="single")
    After (block):  def forward(self, h0, cos, sin, mask):   # self: the Block at model.layers.0
                        q = linear(norm(h0), self.self_attn.q_proj.weight) ...

Every form (base, single, mixed) runs against one module tree (`root`, the GraphModel's `graph_module`), and a
Block keeps one generated function per form, so a hook or wrapper a user puts at `model.layers.0` serves every form
and survives adding adapters. A block reads its own parameters through itself (so a sharding wrapper's swapped
parameters are the ones used) and anything else (the adapter store, mode-aware dropout) through the root. Nodes
are assigned to a block by their `nn_module_stack`; nodes a pass inserted without one belong to a block when both
neighbours do. A block whose nodes are not contiguous stays flat (logged).
"""
from __future__ import annotations

import itertools
import linecache
import logging
import operator
from typing import Callable, Iterable

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen

log = logging.getLogger(__name__)
ROOT = "_peftc_root"        # a Block's (unregistered) reference to the module tree its code reads foreign values from
FORM = "peftc_form"         # the keyword argument naming which form's code a Block runs
_UNKNOWN = object()         # a node without nn_module_stack


class Block(nn.Module):
    """One of the model's repeated blocks (e.g. `model.layers.0`, a LlamaDecoderLayer), holding that block's own
    parameters at the model's paths below it. Its forward runs the generated code of the calling form; hooks,
    `torch.distributed.fsdp.fully_shard` and activation-checkpoint wrappers apply to it as to the model's layer.
    Select blocks with `isinstance(m, peftc.Block)` (`m.kind` is the model's class name, `m.path` its path)."""

    def __init__(self, path: str, kind: str, holder: nn.Module):
        super().__init__()
        for name, p in holder._parameters.items():
            self.register_parameter(name, p)
        for name, b in holder._buffers.items():
            self.register_buffer(name, b, persistent=name not in holder._non_persistent_buffers_set)
        for name, m in holder._modules.items():
            self.add_module(name, m)
        self.path = path
        self.kind = kind
        self._codes: dict[str, Callable] = {}

    def forward(self, *args, peftc_form: str = "graph"):
        return self._codes[peftc_form](self, *args)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, kind={self.kind}"


def block_paths(model: nn.Module) -> dict[str, str]:
    """{path: class name} of the model's repeated blocks: the items of its nn.ModuleLists that hold parameters,
    outermost only (a layer's own ModuleList of experts stays inside it)."""
    found: dict[str, str] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and not any(name.startswith(p + ".") for p in found):
            for k, child in mod._modules.items():
                if child is not None and next(child.parameters(), None) is not None:
                    found[f"{name}.{k}" if name else k] = type(child).__name__
    return found


def install_blocks(root: GraphModule, paths: dict[str, str]) -> dict[str, Block]:
    """Put a Block at each of `paths` in `root`'s tree (adopting the holder module's parameters, buffers and
    children, so the tensors stay the same objects). Paths `root` does not hold are left out."""
    blocks = {}
    for path, kind in paths.items():
        parent_path, _, leaf = path.rpartition(".")
        try:
            parent = root.get_submodule(parent_path) if parent_path else root
        except AttributeError:
            continue
        holder = parent._modules.get(leaf)
        if holder is None:
            continue
        block = holder if isinstance(holder, Block) else Block(path, kind, holder)
        object.__setattr__(block, ROOT, root)
        parent._modules[leaf] = block
        blocks[path] = block
    return blocks


def _block_of(node: Node, paths: Iterable[str]):
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return _UNKNOWN
    for path, _ in stack.values():
        if path in paths:
            return path
    return None


def assign(graph: Graph, paths: Iterable[str]) -> dict[str, list[Node]]:
    """{block path: its compute nodes, in order}: only blocks whose nodes are contiguous among the graph's
    compute nodes (placeholders, get_attr and output excluded)."""
    paths = set(paths)
    compute = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    keys = [_block_of(n, paths) for n in compute]
    known = [(i, k) for i, k in enumerate(keys) if k is not _UNKNOWN]
    for j, (i, k) in enumerate(known):       # fill unknown runs: a block's when both neighbours are that block's
        nxt_i = known[j + 1][0] if j + 1 < len(known) else len(keys)
        nxt_k = known[j + 1][1] if j + 1 < len(known) else None
        for u in range(i + 1, nxt_i):
            keys[u] = k if k == nxt_k else None
    for u in range(known[0][0] if known else len(keys)):
        keys[u] = None
    regions: dict[str, list[Node]] = {}
    last: dict[str, int] = {}
    broken = set()
    for i, (n, k) in enumerate(zip(compute, keys)):
        if k is None:
            continue
        if k in last and last[k] != i - 1:
            broken.add(k)
        last[k] = i
        regions.setdefault(k, []).append(n)
    for k in sorted(broken):
        log.debug("block %s is not contiguous in the graph; it stays flat", k)
        regions.pop(k)
    return regions


def _local(target: str, path: str) -> str | None:
    return target[len(path) + 1:] if target.startswith(path + ".") else None


def split(graph: Graph, regions: dict[str, list[Node]], form: str) -> tuple[Graph, dict[str, Graph]]:
    """(top graph, {path: block graph}): each region becomes one call_module of its block in the top graph; the
    block graph takes the values the region reads from outside (in order of first use) and returns the ones read
    after it (one value, or a tuple)."""
    region_of = {n: p for p, nodes in regions.items() for n in nodes}
    bodies: dict[str, Graph] = {}
    calls: dict[str, tuple[list[Node], list[Node]]] = {}
    for path, nodes in regions.items():
        inside = set(nodes)
        inputs: list[Node] = []
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        g = Graph()
        env: dict[Node, Node] = {}

        def value(a: Node) -> Node:
            if a in env:
                return env[a]
            if a.op == "get_attr":       # own parameters through the block, the rest through the root
                local = _local(a.target, path)
                env[a] = g.get_attr(local if local is not None else f"{ROOT}.{a.target}")
            else:
                inputs.append(a)
                env[a] = g.placeholder(f"in_{len(inputs) - 1}")
                env[a].meta = dict(a.meta)
            return env[a]

        for n in nodes:
            for a in n.all_input_nodes:
                value(a)
            if n.op == "call_module":
                local = _local(n.target, path)
                new = g.call_module(local if local is not None else f"{ROOT}.{n.target}",
                                    *torch.fx.map_arg((n.args, n.kwargs), lambda a: env[a]))
                new.meta = dict(n.meta)
                new.name = n.name
                env[n] = new
            else:
                env[n] = g.node_copy(n, lambda a: env[a])
        g.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
        bodies[path], calls[path] = g, (inputs, outputs)

    top = Graph()
    top._codegen = graph._codegen
    env: dict[Node, Node] = {}
    for n in graph.nodes:
        path = region_of.get(n)
        if path is not None:
            inputs, outputs = calls[path]
            if n is regions[path][0]:
                call = top.call_module(path, tuple(env[a] for a in inputs), {FORM: form})
                call.name = path.replace(".", "_")
                if len(outputs) == 1:
                    env[outputs[0]] = call
                else:
                    for i, o in enumerate(outputs):
                        env[o] = top.call_function(operator.getitem, (call, i))
                        env[o].meta = dict(o.meta)
            continue
        if n.op == "get_attr" and n.users and all(u in region_of for u in n.users):
            continue        # read inside blocks only
        env[n] = top.node_copy(n, lambda a: env[a])
    return top, bodies


def generate(graph: Graph, name: str) -> Callable:
    """A Python function `forward(self, *inputs)` for `graph` (FX's generated code; `self` is the module whose
    attributes its get_attr and call_module nodes name). A pytree graph's in/out specs are bound into the code."""
    code = graph.python_code(root_module="self")
    src, glb = code.src, dict(code.globals)
    if isinstance(graph._codegen, _PyTreeCodeGen):
        info = graph._codegen.pytree_info
        glb["_peftc_in_spec"], glb["_peftc_out_spec"] = info.in_spec, info.out_spec
        src = src.replace("self._in_spec", "_peftc_in_spec").replace("self._out_spec", "_peftc_out_spec")
    key = f"<peftc generated: {name} #{next(_NUMBER)}>"
    linecache.cache[key] = (len(src), None, src.splitlines(keepends=True), key)   # tracebacks show the code
    exec(compile(src, key, "exec"), glb)  # noqa: S102 - FX's generated code for our own graph
    return glb["forward"]


_NUMBER = itertools.count()     # a distinct file name per generated function


def structure(flat: GraphModule, root: GraphModule, blocks: dict[str, Block], form: str) -> Callable:
    """The top-level function `forward(root, *inputs)` of one form (`flat`: its flat graph, whose attributes
    `root` holds or is given), with each block's code for `form` installed in its Block."""
    _adopt(root, flat)
    regions = assign(flat.graph, blocks) if blocks else {}
    top, bodies = split(flat.graph, regions, form)
    for path, body in bodies.items():
        blocks[path]._codes[form] = generate(body, f"{path} ({form})")
    top.lint()
    return generate(top, f"graph ({form})")


def _adopt(root: GraphModule, gm: GraphModule) -> None:
    """Give `root` every attribute `gm`'s graph reads that it does not hold yet: the outermost missing module or
    tensor itself (the same object: the adapter store, a pass's module), never a copy."""
    for n in gm.graph.nodes:
        if n.op not in ("get_attr", "call_module"):
            continue
        src, dst = gm, root
        for part in n.target.split("."):
            src = getattr(src, part)
            have = dst._modules.get(part, dst._parameters.get(part, dst._buffers.get(part)))
            if have is None and not hasattr(dst, part):
                if isinstance(src, nn.Module | nn.Parameter) or not isinstance(src, torch.Tensor):
                    setattr(dst, part, src)
                else:
                    dst.register_buffer(part, src)
                break
            dst = getattr(dst, part)
