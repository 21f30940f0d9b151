"""IA3 pass: learned vectors that rescale activations (arXiv:2205.10625), PEFT's IA3Config semantics.

At a target the vector l scales the layer's output; at a feedforward target it scales the layer's input:

    Before:  y = linear(x, W, b)                (GPT-2 Conv1D: y = addmm(b, x, W); conv: y = conv2d(x, W, b, ...))
    After:   y' = linear(x, W, b) * l           target           l: (out, 1) as PEFT saves it (conv: (1, out, 1, 1))
             y' = linear(x * l, W, b)           feedforward      l: (1, in)                  (conv: (1, in, 1, 1))
             (each product then .to(the model's dtype): a no-op, or with float32 l on a bfloat16 model, PEFT's
             autocast_adapter_dtype, the product in float32 rounded back once, as PEFT computes it)

Plain form ("single"): l comes in as a route input, the call's adapter's own Parameter (a vector of ones for an
adapter that does not scale that side of the site), so switching adapters never changes the graph. Gathered form
("mixed", one adapter per row):

    L = stack([ones, l_1, l_2, ...])[rows]                      # (batch, n): slot 0, the base model, is identity
    y' = (y.reshape(batch, -1, n) * L[:, None, :]).reshape(y.shape)        (conv: y * L.view(batch, n, 1, 1))

Merging folds l into the weight (passes.merge, through ia3_delta): W' = diag(l) W and b' = l b on the output side,
W' = W diag(l) on the input side (the bias stays), as PEFT's merge.

Defaults (targets=None) come from the graph, not from names: the projections the attention pattern marks as key and
value (passes.match roles) and the MLP's down projection (a site fed only by role-less sites that read the width it
writes: hidden -> intermediate -> hidden) as feedforward. They equal PEFT's per-architecture defaults; where PEFT's
table differs (query and value for Qwen2 and others; BERT's "output.dense" also naming the attention output), the
model's config.model_type picks that choice of roles.
"""
from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Sequence, Union

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.errors import SpecError, TargetNotFound
from peftc.methods import Method, form_module, register_method, work_dtype
from peftc.spec import TASK_TYPES, AdapterSpec, Targets, _names, _normalize_targets, modules_to_save_of
from peftc.store import STORE, Adapter, AdapterStore, lane_target, site_key
from peftc.targets import name_matches, output_head_paths, resolve_targets, select_layers

from .lora.gathered import batch_dim, batch_source
from .match import Site, tensor_at, weight_like
from .route import route_input

log = logging.getLogger(__name__)
aten = torch.ops.aten
FORMS = ("single", "mixed")
SIDES = ("in", "out")


# --- the spec and its adapter_config.json ------------------------------------------------------------------------
@dataclass(frozen=True)
class IA3(AdapterSpec):
    """(IA)^3: y' = l * (W x + b) at each target, y' = W (l * x) + b at a feedforward target   (arXiv:2205.10625).

    targets, exclude_modules: PEFT's forms (None: from the graph, see the module docstring; a list of names matched
    against the end of a module path; a regex that must match the whole path; "all-linear"). feedforward: the
    targets whose input is scaled, in PEFT's form (a list of names, each matching the end of a path; a regex); None:
    the MLP down projections among the targets. They must be targets (as in PEFT). l starts at 1 (identity);
    init_ia3_weights=False draws it from N(0, 1), as PEFT does. fan_in_fan_out is PEFT's flag: PEFT sets it from the
    layer type (True for GPT-2's Conv1D), and so does peftc: the layout is read off the layer, the flag is kept for
    the config only."""

    peft_type: ClassVar[str] = "IA3"
    targets: Targets = None
    feedforward: Union[None, str, tuple[str, ...]] = None
    exclude_modules: Union[None, str, tuple[str, ...]] = None
    modules_to_save: tuple[str, ...] = ()
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False
    task_type: Union[str, None] = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # PEFT config keys kept verbatim

    def __post_init__(self):
        for flag in ("init_ia3_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"IA3 {flag} must be True or False, got {flag}={getattr(self, flag)!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise SpecError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        object.__setattr__(self, "targets", _normalize_targets(self.targets))
        object.__setattr__(self, "exclude_modules", _names("exclude_modules", self.exclude_modules, regex=True))
        ff = self.feedforward
        if isinstance(ff, (list, tuple, set, frozenset)) and not ff:
            ff = ()                                     # no feedforward module (None: the graph's default)
        elif ff is not None:
            ff = _names("feedforward", ff, regex=True)
        object.__setattr__(self, "feedforward", ff)
        if isinstance(ff, tuple) and isinstance(self.targets, tuple):     # PEFT's own check, on the names
            missing = [f for f in ff if f not in self.targets]
            if missing:
                raise SpecError(f"IA3 feedforward modules {missing} are not among targets {list(self.targets)}: a "
                                "feedforward module is a target whose input is scaled, so it must be a target too "
                                "(PEFT requires feedforward_modules to be a subset of target_modules); add them to "
                                "targets or drop them from feedforward")
        object.__setattr__(self, "modules_to_save", modules_to_save_of(self.modules_to_save, self.task_type))

    def is_feedforward(self, path: str) -> bool:
        """PEFT's rule: a regex must match the whole path; a name matches the end of the path (plain endswith)."""
        ff = self.feedforward
        if ff is None:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, path) is not None
        return any(path.endswith(f) for f in ff)


_IA3_KEYS = {"target_modules": "targets", "feedforward_modules": "feedforward", "exclude_modules": "exclude_modules",
             "modules_to_save": "modules_to_save", "init_ia3_weights": "init_ia3_weights",
             "fan_in_fan_out": "fan_in_fan_out", "task_type": "task_type"}
_METADATA = {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version"}


def ia3_from_config(cfg: dict, source: str = "adapter_config.json") -> IA3:
    """IA3 from a dict in adapter_config.json form; a key peftc does not know is refused unless it is neutral."""
    for key, value in cfg.items():
        if key not in set(_IA3_KEYS) | _METADATA and value not in (None, False, {}, [], ""):
            raise SpecError(f"{source}: {key}={value!r} is an IA3 option peftc does not know; it would change what "
                            "the adapter computes, so the adapter is refused. Remove the key if it is neutral")
    kwargs: dict[str, Any] = {name: cfg[key] for key, name in _IA3_KEYS.items() if cfg.get(key) is not None}
    if isinstance(cfg.get("feedforward_modules"), list) and not cfg["feedforward_modules"]:
        kwargs["feedforward"] = ()
    for name in ("targets", "modules_to_save"):
        if isinstance(kwargs.get(name), list):
            kwargs[name] = tuple(kwargs[name])
    kwargs["extra"] = {k: v for k, v in cfg.items() if k not in set(_IA3_KEYS) | _METADATA}
    try:
        return IA3(**kwargs)
    except (SpecError, TypeError) as e:
        raise SpecError(f"{source}: {e}") from None


def ia3_to_config(spec: IA3, *, target_modules: Any, base_model_name_or_path: str | None, task_type: str | None,
                  modules_to_save: Sequence[str] | None) -> dict:
    """adapter_config.json for `spec` as PEFT writes it (its feedforward made explicit by ia3_resolve)."""
    listed = lambda v: list(v) if isinstance(v, tuple) else v       # noqa: E731
    cfg = dict(spec.extra)
    cfg.update({
        "peft_type": "IA3", "target_modules": target_modules, "feedforward_modules": listed(spec.feedforward),
        "exclude_modules": listed(spec.exclude_modules), "init_ia3_weights": spec.init_ia3_weights,
        "fan_in_fan_out": spec.fan_in_fan_out, "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "task_type": task_type, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "revision": None, "auto_mapping": None,
    })
    return dict(sorted(cfg.items()))


# --- default targets from the graph ---------------------------------------------------------------------------
# PEFT 0.21.2's IA3 defaults (its per-model_type table) read as roles, where they are not "k, v + MLP down":
_QUERY_VALUE = {"qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "llama4", "phi", "gptj", "gpt_neo", "bart"}
_QUERY_KEY = {"opt"}
_ATTN_OUT_FF = {"bert", "roberta", "deberta", "deberta-v2"}   # "output.dense" names the attention output too


def _upstream_sites(site: Site, by_node: dict[Node, Site]) -> set[str]:
    """Sites whose outputs reach the site's input with no other site in between."""
    start = site.nodes[0].args[site.spec.input_arg]
    found: set[str] = set()
    seen, queue = {start}, deque([start])
    while queue:
        n = queue.popleft()
        if n in by_node:
            found.add(by_node[n].fqn)
            continue
        if n.op in ("placeholder", "get_attr"):
            continue
        for m in n.all_input_nodes:
            if m not in seen:
                seen.add(m)
                queue.append(m)
    return found


def down_projections(sites: dict[str, Site]) -> list[str]:
    """MLP down projections: role-less linear sites fed only by role-less linear sites (the up / gate projections)
    that read the width the down projection writes (hidden -> intermediate -> hidden)."""
    by_node = {n: s for s in sites.values() for n in s.nodes}
    out = []
    for path, s in sites.items():
        if s.roles or not s.linear_like or not s.nodes:
            continue
        ups = [sites[u] for u in _upstream_sites(s, by_node)]
        if ups and all(u.linear_like and not u.roles and u.in_features == s.out_features for u in ups):
            out.append(path)
    return out


def feedforward_sites(sites: dict[str, Site], model: nn.Module | None) -> set[str]:
    """The sites IA3 scales on the input side by default: the MLP down projections (and, for the model types whose
    PEFT default names it too, the attention output projection)."""
    ff = set(down_projections(sites))
    if getattr(getattr(model, "config", None), "model_type", None) in _ATTN_OUT_FF:
        ff |= {p for p, s in sites.items() if "o" in s.roles}
    return ff


def default_sites(sites: dict[str, Site], model: nn.Module | None) -> tuple[list[str], list[str]]:
    """(targets, feedforward targets) for targets=None, in graph order."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    roles = {"q", "v"} if mtype in _QUERY_VALUE else {"q", "k"} if mtype in _QUERY_KEY else {"k", "v"}
    attn = [p for p, s in sites.items() if s.roles & roles]
    if not attn:
        raise TargetNotFound("IA3 targets=None selects the key and value projections found from the attention "
                             "pattern and the MLP's down projections, but the graph has no "
                             "scaled_dot_product_attention fed by linear layers; pass targets (and feedforward) "
                             "explicitly, e.g. peftc.IA3(targets=['fc1', 'fc2'], feedforward=['fc2'])")
    ff = feedforward_sites(sites, model)
    if not ff:
        log.warning("IA3 targets=None: no MLP down projection found in the graph; only the attention projections "
                    "%s are adapted", sorted({sites[p].name for p in attn}))
    chosen = set(attn) | ff
    return [p for p in sites if p in chosen], [p for p in sites if p in ff]


def _tails(paths: Sequence[str], k: int) -> list[str]:
    return sorted({".".join(p.split(".")[-k:]) for p in paths})


def _selects(names, universe, exact: bool) -> set[str]:
    """What PEFT selects with a list of names: targets by trailing components (exact), feedforward by endswith."""
    if exact:
        return {u for u in universe if any(name_matches(u, n) for n in names)}
    return {u for u in universe if any(u.endswith(n) for n in names)}


def _ff_names(ff: list[str], chosen: list[str], targets) -> Union[str, tuple[str, ...]]:
    """feedforward in PEFT's form that selects exactly `ff` among `chosen`: names taken from `targets` when it is a
    list (PEFT requires a subset of it), else the shortest trailing names; a regex of the paths otherwise."""
    if not ff:
        return ()
    if isinstance(targets, tuple):
        names = [t for t in targets if _selects([t], chosen, False) <= set(ff) and _selects([t], chosen, False)]
        if _selects(names, chosen, False) == set(ff):
            return tuple(sorted(names))
    else:
        for k in range(1, max(p.count(".") for p in ff) + 2):
            if _selects(_tails(ff, k), chosen, False) == set(ff):
                return tuple(_tails(ff, k))
    return "|".join(re.escape(p) for p in ff)


def ia3_resolve(spec: IA3, sites: dict[str, Site], model: nn.Module | None) -> IA3:
    """`spec` with targets (when None) and feedforward (when None) made explicit in PEFT's syntax, so that its
    adapter_config.json selects the same layers in PEFT."""
    if spec.targets is not None and spec.feedforward is not None:
        return spec
    if spec.targets is None:
        chosen, ff = default_sites(sites, model)
        extra = set(spec.feedforward) if isinstance(spec.feedforward, tuple) else set()   # PEFT: ff within targets
        for k in range(1, max(p.count(".") for p in chosen) + 2):
            names = sorted(set(_tails(chosen, k)) | extra)
            if _selects(names, sites, True) == set(chosen):
                targets = tuple(names)
                break
        else:
            raise SpecError(f"IA3 feedforward={spec.feedforward!r} names modules outside the default targets "
                            f"({chosen[:3]}, ...); give targets explicitly too")
        kept = select_layers(spec, list(chosen), sites)       # exclude_modules
        feedforward = spec.feedforward if spec.feedforward is not None else \
            _ff_names([p for p in ff if p in kept], kept, targets)
        return replace(spec, targets=targets, feedforward=feedforward)
    heads = output_head_paths(model, spec.task_type)
    chosen = select_layers(spec, resolve_targets(spec.targets, sites, heads), sites)
    ff = feedforward_sites(sites, model)
    return replace(spec, feedforward=_ff_names([p for p in chosen if p in ff], chosen, spec.targets))


# --- weights -------------------------------------------------------------------------------------------------
class IA3Weights(nn.Module):
    """One IA3 site of one adapter: the vector l in PEFT's shape, (out, 1) or (1, in) for linear layers and Conv1D,
    (1, n, 1, ...) for convolutions, and which side of the layer it scales. It has no rank: under a declared capacity
    it takes a slot's IA3 lane as it is (pad), and a slot it leaves gets frozen ones (empty), so IA3 adapters come
    and go as data too."""

    def __init__(self, n: int, feedforward: bool, kind: str, dims: int, init: bool, dtype, device):
        super().__init__()
        self.feedforward, self.kind, self.dims = feedforward, kind, dims
        if kind == "conv":
            shape = (1, n, *(1,) * (dims - 2))
        else:
            shape = (1, n) if feedforward else (n, 1)
        self.l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
        if not init:            # PEFT: torch.randn, kept when init_ia3_weights=False
            with torch.no_grad():
                self.l.copy_(torch.randn(shape))

    @property
    def side(self) -> str:
        return "in" if self.feedforward else "out"

    def ones(self) -> "IA3Weights":
        """Frozen ones of the same shape and side: the identity."""
        w = IA3Weights(self.n, self.feedforward, self.kind, self.dims, True, self.l.dtype, self.l.device)
        return w.requires_grad_(False)

    @property
    def n(self) -> int:
        return self.l.numel()


def ia3_check(spec: IA3, sites: dict[str, Site], chosen: list[str], loading: bool) -> None:
    """IA3's refusals before any weight is made: layers PEFT's IA3 does not serve, and feedforward modules that
    are not among the targets."""
    for path in chosen:
        s = sites[path]
        if s.kind == "conv" and len(s.weight_shape) not in (4, 5):
            raise SpecError(f"IA3 cannot serve {path} ({s.module_type or 'a convolution'} with a "
                            f"{len(s.weight_shape)}-dim weight): it serves nn.Linear, GPT-2's Conv1D, nn.Conv2d "
                            "and nn.Conv3d (as PEFT); leave that layer out of the targets")
        if s.module_type == "MultiheadAttention" or s.parent:
            raise SpecError(f"IA3 cannot serve {path} (nn.MultiheadAttention or its out_proj): PEFT's IA3 does not "
                            "adapt it (the attention reads its weights itself); leave it out of the targets")
    ff = spec.feedforward
    if isinstance(ff, tuple):
        stray = [f for f in ff if not _selects([f], chosen, False)]
        if stray:
            hits = sorted(p for p in sites if any(p.endswith(f) for f in stray))
            raise SpecError(f"IA3 feedforward modules {stray} are not among its targets (they select "
                            f"{hits[:3] or 'no adapted layer'}); add them to targets or drop them from feedforward")
    elif isinstance(ff, str) and not any(re.fullmatch(ff, p) for p in chosen):
        hits = sorted(p for p in sites if re.fullmatch(ff, p))
        raise SpecError(f"IA3 feedforward regex {ff!r} matches none of its targets (it matches "
                        f"{hits[:3] or 'no layer'}); add those layers to targets or fix the regex")


def ia3_build(spec: IA3, site: Site, weight: torch.Tensor) -> IA3Weights:
    ff = spec.is_feedforward(site.fqn)
    return IA3Weights(site.in_features if ff else site.out_features, ff, site.kind, len(site.weight_shape),
                      spec.init_ia3_weights, weight.dtype, weight.device)


def ia3_keys(path: str, w: IA3Weights):
    """PEFT's checkpoint name of the vector at a site (after base_model.model.<path>.)."""
    yield "ia3_l", w.l


def ia3_param_count(spec: IA3, site: Site) -> int:
    return site.in_features if spec.is_feedforward(site.fqn) else site.out_features


# --- the rewrite ---------------------------------------------------------------------------------------------
def _ia3(store: AdapterStore, name: str | None) -> Adapter | None:
    ad = store.adapters[name] if name is not None and name in store.adapters else None
    return ad if ad is not None and isinstance(ad.spec, IA3) else None


def _weights(store: AdapterStore, name: str | None, path: str, side: str) -> IA3Weights | None:
    """IA3 adapter `name`'s vector at `path` if it scales that side there, else None."""
    ad = _ia3(store, name)
    w = ad.sites[site_key(path)] if ad is not None and path in ad.targets else None
    return w if w is not None and w.side == side else None


def _sides(store: AdapterStore, path: str) -> list[str]:
    """The sides of site `path` some IA3 adapter scales (the graph multiplies only there)."""
    return [side for side in SIDES if any(_weights(store, a, path, side) is not None for a in store.names())]


def _shape(site: Site, side: str) -> tuple:
    n = site.in_features if side == "in" else site.out_features
    if site.kind == "conv":
        return (1, n, *(1,) * (len(site.weight_shape) - 2))
    return (1, n) if side == "in" else (n, 1)


def _ia3_value(w: IA3Weights | None, key: tuple, like: torch.Tensor, gm: GraphModule) -> torch.Tensor:
    """An adapter's vector at a site and side (`w`: its weights there); ones where it does not scale that side
    there (the identity)."""
    if w is not None and w.side == key[2]:
        return w.l
    device = next(gm.parameters()).device
    return torch.ones(like.shape, dtype=like.dtype, device=device)


class IA3Bank(nn.Module):
    """The gathered form's identity vectors at one site (slot 0, and slots whose adapter does not scale it)."""

    def __init__(self, n_in: int, n_out: int, dtype, device):
        super().__init__()
        self.register_buffer("ones_in", torch.ones(n_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("ones_out", torch.ones(n_out, dtype=dtype, device=device), persistent=False)


def insert_ia3(gm: GraphModule, sites: dict[str, Site], store: AdapterStore, form: str = "single",
               paths: list[str] | None = None) -> int:
    """Scale each site `paths` names (those the IA3 adapters adapt) on its input and/or output by the adapters'
    vectors in `form`; returns the rewritten calls."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if paths is None:
        routed = set().union(*(store[a].targets for a in store.names() if _ia3(store, a)))
        paths = [p for p in sites if p in routed]
    if not paths:
        return 0
    g = gm.graph
    by_name = {n.name: n for n in g.nodes}
    rows = batch = first = None
    if form == "mixed":
        rows = route_input(gm, ("rows",), torch.zeros(2, dtype=torch.long))            # (batch,) slot per row
        first = batch_source(gm)
        with g.inserting_after(rows):
            batch = g.call_function(aten.sym_size.int, (first, 0))
    count = 0
    for path in paths:
        site = sites[path]
        for node in (by_name[n.name] for n in site.nodes):
            for side in _sides(store, path):
                if form == "single":
                    _scale_plain(gm, site, node, side)
                else:
                    _scale_rows(gm, site, node, side, store, rows, batch, first)
            count += 1
    return count


def _target(site: Site, node: Node, side: str) -> Node:
    return node.args[site.spec.input_arg] if side == "in" else node


def _rewire(site: Site, node: Node, side: str, old: Node, new: Node, mine: set[Node]) -> None:
    """The site call reads `new` as its input (side "in"), or every user of its output reads `new` (side "out")."""
    if side == "in":
        node.update_arg(site.spec.input_arg, new)
    else:
        old.replace_all_uses_with(new, delete_user_cb=lambda u: u not in mine)


def _tag(nodes: list[Node], out: Node, site_node: Node) -> None:
    for n in nodes:
        n.meta["nn_module_stack"] = site_node.meta.get("nn_module_stack", {})


def _cast_back(g, made: list[Node], t: Node) -> Node:
    """t * l computes in the wider of the two dtypes (float32 l on a bfloat16 model: autocast_adapter_dtype); the
    product goes back to t's dtype, as PEFT's (result * ia3_scaling).to(result_dtype). A no-op where they agree."""
    val = t.meta.get("val")
    if isinstance(val, torch.Tensor):
        made.append(g.call_function(aten.to.dtype, (made[-1], val.dtype)))
    return made[-1]


def _scale_plain(gm: GraphModule, site: Site, node: Node, side: str) -> None:
    """x' = x * l (before the call) or y' = y * l (after it), l: the call's adapter's vector (a route input)."""
    g = gm.graph
    l = route_input(gm, ("ia3", site.fqn, side), torch.empty(_shape(site, side)))
    t = _target(site, node, side)
    made = []
    with g.inserting_before(node if side == "in" else node.next):
        v = l if site.kind == "conv" else g.call_function(aten.view.default, (l, [-1]))
        if v is not l:
            made.append(v)
        made.append(g.call_function(aten.mul.Tensor, (t, v)))
        _cast_back(g, made, t)
    made[-1].meta["val"] = t.meta.get("val")
    _rewire(site, node, side, t, made[-1], set(made))
    _tag(made, made[-1], node)


def _scale_rows(gm, site: Site, node: Node, side: str, store: AdapterStore, rows: Node, batch: Node,
                first: Node) -> None:
    """t' = t * L[rows] per row, L = stack([ones, l_1, ...]) (ones for slot 0 and slots that do not scale here)."""
    g = gm.graph
    key = site_key(site.fqn)
    w0 = weight_like(gm, site)
    bank = form_module(gm, "mixed", IA3Bank(site.in_features, site.out_features, w0.dtype, w0.device), "ia3_")
    t = _target(site, node, side)
    n = site.in_features if side == "in" else site.out_features
    made: list[Node] = []

    def call(fn, *args):
        made.append(g.call_function(fn, args))
        return made[-1]

    def attr(target):
        made.append(g.get_attr(target))
        return made[-1]

    with g.inserting_before(node if side == "in" else node.next):
        ones = attr(f"{bank}.ones_{side}")
        vecs = []
        for i, a in enumerate(store.slots()[1:], start=1):
            if store.capacity is not None:      # the slot's IA3 lane, whoever fills it (ones where none scales here)
                feedforward = side == "in"
                n_side = site.in_features if feedforward else site.out_features
                store.lane_weights(i, "ia3", key, lambda: IA3Weights(
                    n_side, feedforward, site.kind, len(site.weight_shape), True, w0.dtype,
                    w0.device).requires_grad_(False))
                vecs.append(call(aten.view.default, attr(f"{lane_target(i, 'ia3', key)}.l"), [-1]))
                continue
            w = _weights(store, a, site.fqn, side)
            vecs.append(call(aten.view.default, attr(f"{STORE}.adapters.{a}.sites.{key}.l"), [-1])
                        if w is not None else ones)
        L = call(aten.index.Tensor, call(aten.stack.default, [ones, *vecs]), [rows])            # (batch, n)
        if site.kind == "conv":
            dims = len(site.weight_shape) - 2
            out = call(aten.mul.Tensor, t, call(aten.view.default, L, [batch, n, *[1] * dims]))
        else:
            bdim = batch_dim(site, node.args[site.spec.input_arg], first)
            src = call(aten.movedim.int, t, bdim, 0) if bdim else t
            sizes = [call(aten.sym_size.int, src, i) for i in range(len(t.meta["val"].shape))]
            t3 = call(aten.reshape.default, src, [batch, -1, n])                                 # (batch, T, n)
            out = call(aten.reshape.default, call(aten.mul.Tensor, t3, call(aten.unsqueeze.default, L, 1)), sizes)
            if bdim:
                out = call(aten.movedim.int, out, 0, bdim)
        out = _cast_back(g, made, t)
    out.meta["val"] = t.meta.get("val")
    _rewire(site, node, side, t, out, set(made))
    _tag(made, out, node)


# --- merging -------------------------------------------------------------------------------------------------
def _scaling(w: IA3Weights, site: Site, weight: torch.Tensor, dt) -> torch.Tensor:
    """l laid out against the site's weight: linear [out, in], Conv1D [in, out], conv [out, in / groups, *k]."""
    l = w.l.detach().to(dt).flatten()
    if site.kind == "conv":
        rest = (1,) * (weight.dim() - 2)
        if not w.feedforward:
            return l.view(-1, 1, *rest)
        groups = site.params.get("groups", 1)
        per = site.in_features // groups                     # input channels per group; out channel o reads group
        out_per = site.out_features // groups                # o // out_per
        return l.view(groups, 1, per).expand(groups, out_per, per).reshape(site.out_features, per, *rest)
    channel_axis = {("linear", False): 0, ("linear", True): 1, ("conv1d", False): 1, ("conv1d", True): 0}
    shape = [1, 1]
    shape[channel_axis[(site.kind, w.feedforward)]] = -1
    return l.view(shape)


def ia3_delta(adapter: Adapter, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """IA3's fold rule: diag(l) W - W (output side) or W diag(l) - W (input side), in the weight's layout."""
    w = adapter.sites[site_key(site.fqn)]
    dt = work_dtype(weight.dtype, w.l.dtype)
    W = weight.detach().to(dt)
    return W * _scaling(w, site, weight, dt) - W


def ia3_bias_delta(adapter: Adapter, site: Site, bias: torch.Tensor | None) -> torch.Tensor | None:
    """l b - b on the output side (PEFT scales the bias there); the input side leaves the bias alone."""
    w = adapter.sites[site_key(site.fqn)]
    if w.feedforward or bias is None:
        return None
    dt = work_dtype(bias.dtype, w.l.dtype)
    b = bias.detach().to(dt)
    return b * w.l.detach().to(dt).flatten() - b


def ia3_fits_graph(gm: GraphModule, adapter: Adapter) -> bool:
    """Whether the plain-form graph already scales every side `adapter` scales (a capacity then adds it as data)."""
    have = {n.meta["peftc_route"][1:] for n in gm.graph.nodes
            if n.op == "placeholder" and (n.meta.get("peftc_route") or ("",))[0] == "ia3"}
    return all((p, adapter.sites[site_key(p)].side) in have for p in adapter.targets)


register_method(Method(IA3, "IA3", ia3_from_config, ia3_to_config, build=ia3_build, rewrite=insert_ia3,
                       peft_keys=ia3_keys, route_values={"ia3": _ia3_value}, site_kinds=("linear", "conv1d", "conv", "linear4bit",
                                                                        "linear8bit"),
                       check=ia3_check, resolve=ia3_resolve, fold=ia3_delta, fold_bias=ia3_bias_delta, forms=FORMS,
                       pad=lambda w, cap: w, empty=lambda w, cap: w.ones(), fits_graph=ia3_fits_graph,
                       param_count=ia3_param_count))
