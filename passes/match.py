"""Matching pass: find adapter sites (the ops of KINDS: linear, GPT-2 Conv1D, embedding, convolution) and their
attention roles from the graph itself.

A site is one module: `y = linear(x, W, b)` (W: [out, in]), for Conv1D `y = addmm(b, x, W)` (W: [in, out]),
`y = embedding(W, ids)` or `y = conv{1,2,3}d(x, W, b, stride, padding, dilation, groups)`. An
nn.MultiheadAttention whose query, key and value are not one tensor (unbatched input, cross-attention) projects
them with row blocks of its packed in_proj weight; each call is a call of the one site, reading W's rows [a, b):

    w_q, w_k, w_v = chunk(W, 3)  (or split(W, [E, 2E]))      q = linear(x_q, w_q, b_q)   # Site.rows: q -> (0, E)

Roles come from the scaled-dot-product-attention pattern, not from names:

    q = site_q(x) -> view/transpose/rotary ... ─┐
    k = site_k(x) -> ...                        ├─ sdpa(q, k, v) -> transpose/reshape -> site_o
    v = site_v(x) -> ...                        ─┘
"""
from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.quant import OPS_4BIT, OPS_8BIT, dense_from_args

aten = torch.ops.aten
SDPA = (aten.scaled_dot_product_attention.default,)
ROLES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class SiteKind:
    """How one op reads a module's weight: which arguments are the weight, the input and the bias, and whether the
    op is a matmul on the input's last dim (linear-like: LoRA's grouped GEMMs serve it)."""

    name: str
    ops: tuple
    weight_arg: int
    input_arg: int
    bias_arg: int | None         # None: the op takes no bias
    matmul: bool
    module_type: str = ""        # required module type name ("" for any)
    param: bool = False          # a parameter read, not a module's layer op: matched by passes.param_sites
    shape_args: tuple | None = None   # (out, in) argument indices where the weight input is not W itself (quantized)
    def args_of(self, node: Node) -> dict:
        """The op's arguments past input, weight and bias, by name, defaults filled in (conv: stride, padding,
        dilation, groups; embedding: padding_idx)."""
        schema = node.target._schema.arguments
        out = {}
        for i, a in enumerate(schema):
            if i in (self.weight_arg, self.input_arg, self.bias_arg):
                continue
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name, a.default_value)
            if isinstance(v, Node):      # a tensor the op reads (a quantized weight's scales): not a setting
                continue
            out[a.name] = list(v) if isinstance(v, (list, tuple)) else v
        return out


# op -> kind; a new layer kind is one row here (and its LoRA form in passes.lora)
KINDS: dict[str, SiteKind] = {k.name: k for k in (
    SiteKind("linear", (aten.linear.default,), 1, 0, 2, True),
    SiteKind("conv1d", (aten.addmm.default,), 2, 1, 0, True, "Conv1D"),         # GPT-2's Conv1D: addmm(b, x, W)
    SiteKind("embedding", (aten.embedding.default,), 0, 1, None, False),
    SiteKind("conv", (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default), 1, 0, 2, False),
    # stacked expert weights W [E, out, in] (or [E, in, out]) of transformers 5 MoE layers (passes.param_sites):
    # grouped_mm(x, W^T, offs) over tokens sorted by expert; bmm(W[ids], x[..., None]) per token
    SiteKind("grouped_mm", ("transformers::grouped_mm_fallback", "aten::_grouped_mm"), 1, 0, None, False,
             param=True),
    SiteKind("batched_mm", ("aten::bmm",), 0, 1, None, False, param=True),
    # bitsandbytes' layers as peftc's ops (peftc.quant): the weight input is the packed codes
    SiteKind("linear4bit", OPS_4BIT, 1, 0, 6, True, shape_args=(7, 8)),
    SiteKind("linear8bit", OPS_8BIT, 1, 0, 3, True),
)}
QUANTIZED = ("linear4bit", "linear8bit")
_BY_OP = {op: k for k in KINDS.values() if not k.param for op in k.ops}


@dataclass
class Site:
    """A module whose weight an op of a SiteKind reads; one module may be called at several nodes (weight sharing).

    in_features / out_features: linear [out, in]; Conv1D [in, out]; embedding [num_embeddings (in), dim (out)];
    conv [out, in / groups, *kernel] (in: all input channels)."""

    fqn: str                     # module path, e.g. model.layers.0.self_attn.q_proj
    kind: str                    # a KINDS name
    in_features: int
    out_features: int
    nodes: list[Node] = field(default_factory=list)
    weight: str = ""             # get_attr target of the weight
    roles: set[str] = field(default_factory=set)  # subset of ROLES found from the attention pattern
    module_type: str = ""
    weight_shape: tuple = ()
    params: dict = field(default_factory=dict)    # the op's other arguments (SiteKind.args_of)
    parent: str = ""             # the nn.MultiheadAttention whose forward reads this weight (its out_proj), else ""
    rows: dict = field(default_factory=dict)      # call node name -> (a, b): it reads W[a:b] only (a row block)
    key: str = ""                # the parameter name a target_parameters entry chose it by, else ""

    @property
    def pattern_path(self) -> str:
        """The path its rank_pattern / alpha_pattern keys are matched against: an nn.MultiheadAttention's out_proj
        takes its attention module's r and alpha (PEFT builds it inside that module's layer, with its config); a
        layer chosen through target_parameters, its parameter's name (PEFT's key for it)."""
        return self.key or self.parent or self.fqn

    @property
    def param(self) -> bool:
        """A parameter site (passes.param_sites): its fqn is the parameter's name, not a module's."""
        return KINDS[self.kind].param

    @property
    def state_key(self) -> str:
        """The model's state-dict key of the weight: <module>.weight, or a parameter site's own name."""
        return self.fqn if self.param else f"{self.fqn}.weight"

    @property
    def name(self) -> str:
        return self.fqn.rsplit(".", 1)[-1]

    @property
    def spec(self) -> SiteKind:
        return KINDS[self.kind]

    @property
    def linear_like(self) -> bool:
        """y = x W^T (+ b) on x's last dim: linear layers and GPT-2's Conv1D."""
        return KINDS[self.kind].matmul

    def __deepcopy__(self, memo) -> "Site":
        """Nodes are handles into the graph the site was matched on, read by name afterwards; a copy (e.g. of a
        PeftModule) shares them rather than copying their traced metadata (fake tensors cannot be copied)."""
        return replace(self, nodes=list(self.nodes), roles=set(self.roles), params=dict(self.params),
                       rows=dict(self.rows))


def module_path(node: Node) -> tuple[str, str]:
    """(fqn, type name) of the innermost module a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
    return path, typ.rsplit(".", 1)[-1]


def _site_of(gm: GraphModule, node: Node) -> Site | None:
    if node.op != "call_function":
        return None
    kind = _BY_OP.get(node.target)
    if kind is None or (kind.module_type and module_path(node)[1] != kind.module_type):
        return None
    w = node.args[kind.weight_arg] if kind.weight_arg < len(node.args) else None
    block = _row_block(w) if kind.name == "linear" and module_path(node)[1] == "MultiheadAttention" else None
    if block is not None:        # q / k / v of an attention module's packed in_proj: one block of W's rows
        w, block = block
    if not isinstance(w, Node) or w.op != "get_attr":
        return None  # weight computed in the graph: not an adapter site
    try:
        shape = tuple(tensor_at(gm, w.target).shape)
    except AttributeError:   # a plain tensor attribute: the traced value's shape
        shape = tuple(w.meta["val"].shape)
    if kind.shape_args is not None:
        shape = tuple(int(node.args[i]) for i in kind.shape_args)
    params = kind.args_of(node)
    if kind.name == "conv":
        if len(shape) < 3:
            return None
        out_f, in_f = shape[0], shape[1] * params.get("groups", 1)
    elif len(shape) != 2:
        return None
    elif kind.name in ("linear", *QUANTIZED):     # [out, in]
        out_f, in_f = shape
    else:                        # Conv1D [in, out]; embedding [num, dim]
        in_f, out_f = shape
    fqn, typ = module_path(node)
    owner = w.target.rsplit(".", 1)[0]
    parent = ""
    if not fqn or owner.startswith(fqn + "."):   # a submodule whose forward its parent bypasses: MHA's out_proj
        parent = fqn if typ == "MultiheadAttention" and owner == f"{fqn}.out_proj" else ""
        fqn, typ = owner, ""
    return Site(fqn, kind.name, in_f, out_f, weight=w.target, module_type=typ, weight_shape=shape, params=params,
                parent=parent, rows={node.name: block} if block else {})


_SPLITS = (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)


def _row_block(w) -> tuple[Node, tuple[int, int]] | None:
    """(W's get_attr, (a, b)) where w = getitem(chunk / split(W, ..., dim=0), i) is W[a:b]; else None."""
    if not (isinstance(w, Node) and w.op == "call_function" and w.target is operator.getitem):
        return None
    split, i = w.args
    if not (isinstance(split, Node) and split.target in _SPLITS and isinstance(split.args[0], Node)
            and split.args[0].op == "get_attr"):
        return None
    if (split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)) != 0:
        return None
    sizes = [int(t.shape[0]) for t in split.meta["val"]]
    return split.args[0], (sum(sizes[:i]), sum(sizes[:i + 1]))


def weight_reader(site: Site, node: Node) -> tuple[Node, int]:
    """(the node, its argument index) that reads the site's weight W at call `node`: the call itself, or for a row
    block the chunk / split of W."""
    if node.name in site.rows:
        return node.args[site.spec.weight_arg].args[0], 0
    return node, site.spec.weight_arg


def site_node(gm: GraphModule, site: Site) -> Node:
    """The site's first call in `gm` (the graph it was matched on, or a copy of it), by name."""
    name = site.nodes[0].name
    return next(n for n in gm.graph.nodes if n.name == name)


def dense_weight(gm: GraphModule, site: Site, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The site's weight as a dense tensor: the parameter itself, or a quantized site's weight dequantized (a new
    tensor, [out, in], in `dtype` or the dtype the layer computes its output in)."""
    if site.kind not in QUANTIZED:
        return tensor_at(gm, site.weight)
    node = site_node(gm, site)
    args = [tensor_at(gm, a.target) if isinstance(a, Node) and a.op == "get_attr" else a for a in node.args]
    return dense_from_args(node.target, args, dtype or node.meta["val"].dtype)


def weight_like(gm: GraphModule, site: Site) -> torch.Tensor:
    """A tensor with the shape, floating dtype and device of the site's (dense) weight, for new_empty and the like:
    the weight itself, or for a quantized site a zero-stride view that holds no memory."""
    if site.kind not in QUANTIZED:
        return tensor_at(gm, site.weight)
    codes = tensor_at(gm, site.weight)
    return torch.empty(1, dtype=site_dtype(gm, site), device=codes.device).as_strided(site.weight_shape, (0, 0))


def weight_node(gm: GraphModule, site: Site, node: Node) -> Node:
    """The graph value of the site's dense weight at call `node`: the weight input itself, or for a quantized site a
    dequantization of it inserted before the call (a temporary, as the layer's own op makes)."""
    if site.kind not in QUANTIZED:
        return node.args[site.spec.weight_arg]
    with gm.graph.inserting_before(node):
        w = gm.graph.call_function(dense_from_args, (node.target, list(node.args), node.meta["val"].dtype))
    w.meta.update(nn_module_stack=node.meta.get("nn_module_stack", {}),
                  val=node.meta["val"].new_empty(site.weight_shape))
    return w


def site_dtype(gm: GraphModule, site: Site) -> torch.dtype:
    """The floating dtype of the site's weight (a quantized site's: its output's, which adapters take)."""
    if site.kind in QUANTIZED:
        return site_node(gm, site).meta["val"].dtype
    return tensor_at(gm, site.weight).dtype


def tensor_at(gm: GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr target names."""
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return gm.get_buffer(target)


def set_tensor(gm: GraphModule, target: str, value: torch.Tensor, buffer: bool = False) -> None:
    """`target` becomes `value` in gm: a frozen Parameter (or with `buffer`, a buffer), replacing a tensor of that
    name of either kind; modules on its path that gm lacks are added."""
    owner, _, leaf = target.rpartition(".")
    mod = gm
    for part in owner.split(".") if owner else ():
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    mod._parameters.pop(leaf, None)
    mod._buffers.pop(leaf, None)
    if buffer:
        mod.register_buffer(leaf, value)
    else:
        mod.register_parameter(leaf, nn.Parameter(value, requires_grad=False))


def find_sites(gm: GraphModule) -> dict[str, Site]:
    """All linear-like sites, keyed by module path, in graph order, with attention roles filled in."""
    sites: dict[str, Site] = {}
    for node in gm.graph.nodes:
        found = _site_of(gm, node)
        if found is None:
            continue
        site = sites.setdefault(found.fqn, found)
        if site.kind != found.kind or site.weight != found.weight:   # one module, two ops or weights: not a site
            continue
        site.nodes.append(node)
        site.rows.update(found.rows)
    _assign_roles(gm, sites)
    from .param_sites import find_param_sites    # parameter sites (stacked expert weights), after the modules'
    sites.update(find_param_sites(gm))
    return sites


def _as_digraph(gm: GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n)
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def _nearest(g: nx.DiGraph, start: Node, stop: dict[Node, Site], upstream: bool) -> set[str]:
    """Sites reached from `start` walking the data flow (up or down) and stopping at the first site on every path."""
    found: set[str] = set()
    seen = {start}
    queue = deque([start])
    while queue:
        n = queue.popleft()
        for nxt in (g.predecessors(n) if upstream else g.successors(n)):
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in stop:
                found.add(stop[nxt].fqn)
            elif nxt.op not in ("placeholder", "get_attr", "output"):
                queue.append(nxt)
    return found


def _assign_roles(gm: GraphModule, sites: dict[str, Site]) -> None:
    by_node = {n: s for s in sites.values() for n in s.nodes}
    attn = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]
    if not attn:
        return
    g = _as_digraph(gm)
    for n in attn:
        for role, arg in zip("qkv", n.args[:3]):
            if isinstance(arg, Node):
                start = arg if arg not in by_node else None
                hits = {by_node[arg].fqn} if start is None else _nearest(g, arg, by_node, upstream=True)
                for fqn in hits:
                    sites[fqn].roles.add(role)
        for fqn in _nearest(g, n, by_node, upstream=False):
            sites[fqn].roles.add("o")


def output_heads(gm: GraphModule, sites: dict[str, Site]) -> set[str]:
    """Sites whose output reaches the graph output with no other site in between (lm_head, classifier)."""
    by_node = {n: s for s in sites.values() for n in s.nodes}
    g = _as_digraph(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    heads: set[str] = set()
    seen = {out}
    queue = deque([out])
    while queue:
        n = queue.popleft()
        for prev in g.predecessors(n):
            if prev in seen:
                continue
            seen.add(prev)
            if prev in by_node:
                heads.add(by_node[prev].fqn)
            elif prev.op not in ("placeholder", "get_attr"):
                queue.append(prev)
    return heads
