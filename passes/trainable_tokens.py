"""Trainable tokens (PEFT's trainable_token_indices, a LoRA option): an adapter trains chosen rows of an embedding
matrix in full (the rows of tokens a chat template adds, say); the matrix itself never changes. Reads of it inside
a listed module, and inside the output head tied to the input embedding, see it with those rows replaced, as PEFT's
TrainableTokensLayer computes it: W.index_copy(0, rows, delta).

    Before:  w = get_attr lm_head.weight                     (GPT-2: wte and lm_head read one tied matrix)
             e = aten.embedding(w, input_ids)                 (in transformer.wte)
             y = aten.linear(h, w)                            (in lm_head)
    After:   i = route input ("tokens", "lm_head.weight", "transformer.wte", "index")     # (n,) rows
             d = route input ("tokens", "lm_head.weight", "transformer.wte", "delta")     # (n, dim), trained
             e = aten.embedding(aten.index_copy(w, 0, i, d), input_ids)
             y = aten.linear(h, aten.index_copy(w, 0, i', d'))    (lm_head's own route inputs)

Each read (its module path: its "reader") gets its own route inputs, so one adapter can tie the head to the
embedding's rows (PEFT does when config.tie_word_embeddings is set and no tied module is listed with other rows)
while another lists the head with rows of its own. An adapter with no rows at a reader passes an empty index (the
read sees W). Only the plain form has this pass: a mixed batch may not hold an adapter with trainable tokens
(PeftModule.check_mixed). merge() folds the rows into a constant (fold_token_rows).

PEFT's standalone method (peft_type TRAINABLE_TOKENS) is the same rows without LoRA: `TrainableTokens` below, a
method that adapts no sites, whose adapter is its token rows (saved as <module>.trainable_tokens_delta, a tied
head's key too, as PEFT saves it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Iterable, Union

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.errors import MergeError, SpecError
from peftc.methods import Method, register_method
from peftc.spec import TASK_TYPES, AdapterSpec, _token_indices
from peftc.store import Adapter, AdapterStore, site_key
from peftc.targets import name_matches

from . import lora as _lora   # noqa: F401 (LoRA, the main built-in method, registers first)
from .match import Site, module_path, tensor_at
from .route import route_input, route_value

aten = torch.ops.aten
TAG = "trainable_tokens"            # meta["peftc"]["method"] of the index_copy nodes
LORA_KEY = "token_adapter.trainable_tokens_delta"   # PEFT's key under a module, LoRA's option (TrainableTokensWrapper)
KEY = "trainable_tokens_delta"                       # PEFT's key under a module, TRAINABLE_TOKENS


class TokenRows(nn.Module):
    """An adapter's trained rows of one module's 2-D weight (get_attr `target`): `delta` [n, dim] replaces rows
    `index` wherever module `path` reads the weight, and wherever the modules in `tied` (an output head tied to
    the input embedding) read it. Starts as a copy of those rows, so a fresh one changes nothing."""

    def __init__(self, path: str, target: str, index: tuple[int, ...], weight: torch.Tensor,
                 tied: tuple[str, ...] = (), key: str = LORA_KEY, random: bool = False, save_tied: bool = False):
        super().__init__()
        self.path, self.target, self.tied, self.key, self.save_tied = path, target, tuple(tied), key, save_tied
        self.register_buffer("index", torch.tensor(index, dtype=torch.long, device=weight.device), persistent=False)
        rows = torch.randn(len(index), *weight.shape[1:], dtype=weight.dtype, device=weight.device) if random \
            else weight.detach()[self.index].clone()                     # PEFT's init_weights=False: random rows
        self.delta = nn.Parameter(rows, requires_grad=True)              # (n, dim)

    def peft_keys(self) -> Iterable[tuple[str, nn.Parameter]]:
        """(PEFT's key after base_model.model., tensor): its module's, and its tied heads' where PEFT saves those."""
        for path in (self.path, *(self.tied if self.save_tied else ())):
            yield f"{path}.{self.key}", self.delta

    @property
    def readers(self) -> tuple[str, ...]:
        return (self.path, *self.tied)

    def value(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as its readers see it: W with the trained rows in place."""
        return weight.index_copy(0, self.index.to(weight.device), self.delta.to(weight))

    def extra_repr(self) -> str:
        tied = f", tied to {list(self.tied)}" if self.tied else ""
        return f"{self.path}: {self.index.numel()} rows of {self.target}{tied}"


def rows_for(adapter: Adapter, target: str, reader: str) -> TokenRows | None:
    """The adapter's rows that module `reader`'s read of get_attr `target` sees, or None."""
    return next((t for t in adapter.tokens.values() if t.target == target and reader in t.readers), None)


# --- resolving a spec ------------------------------------------------------------------------------------------
def _module_path(model: nn.Module | None, getter: str) -> str | None:
    """The path of model.get_input_embeddings() / get_output_embeddings(), or None."""
    fn = getattr(model, getter, None)
    try:
        mod = fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        mod = None
    return None if mod is None else next((n for n, m in model.named_modules() if m is mod), None)


def _input_embedding(sites: dict[str, Site], model: nn.Module | None) -> str:
    """The input embedding a list of indices trains: model.get_input_embeddings(), else PEFT's default name
    embed_tokens."""
    path = _module_path(model, "get_input_embeddings")
    if path in sites:
        return path
    hits = [p for p, s in sites.items() if name_matches(p, "embed_tokens") and s.kind == "embedding"]
    if len(hits) == 1:
        return hits[0]
    embeddings = [p for p, s in sites.items() if s.kind == "embedding"]
    raise SpecError(f"trainable_token_indices as a list trains rows of the model's input embedding, but "
                    f"{type(model).__name__} has no get_input_embeddings() and no single module named embed_tokens; "
                    f"give a dict of module name -> indices instead (embeddings here: {embeddings})")


def _servable(sites: dict[str, Site], model: nn.Module | None, name: str) -> list[str]:
    """Site paths `name` names (PEFT's name matching), each an embedding or the model's output head."""
    hits = [p for p in sites if (name.fullmatch(p) if isinstance(name, re.Pattern) else name_matches(p, name))]
    name = getattr(name, "pattern", name)
    embeddings = [p for p, s in sites.items() if s.kind == "embedding"]
    head = _module_path(model, "get_output_embeddings")
    if not hits:
        other = [p for p, _ in (model.named_modules() if model is not None else ()) if p and name_matches(p, name)]
        what = f"names {other[0]}, which reads no embedding matrix" if other else "matches no module"
        raise SpecError(f"trainable_token_indices: {name!r} {what}; name an embedding (embeddings here: "
                        f"{embeddings})")
    for p in hits:
        s = sites[p]
        if s.kind == "embedding":
            continue
        if p == head and s.kind == "linear" and all(len(n.args) < 3 or n.args[2] is None for n in s.nodes):
            continue      # the output head: its rows are tokens too (PEFT serves it without a bias, as F.linear)
        raise SpecError(f"trainable_token_indices: {name!r} names {p} ({s.module_type or s.kind}), which is not an "
                        f"embedding; trainable tokens are rows of an embedding matrix (or of the output head "
                        f"{head!r}); embeddings here: {embeddings}")
    return hits


def _tie_word_embeddings(model: nn.Module | None) -> bool:
    """PEFT ties an output head to the embedding's token rows only when the model's config says it is tied."""
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def resolve_token_rows(gm: GraphModule, sites: dict[str, Site], model: nn.Module | None, indices: Any,
                       chosen: Iterable[str] = (), saved: Iterable[str] = (), **options) -> list[TokenRows]:
    """The TokenRows a spec's trainable_token_indices asks for (a tuple of rows: the model's input embedding; pairs
    of (module name, rows): the modules named), as PEFT picks them: with tied word embeddings the output head that
    reads the embedding's matrix sees the embedding's rows, unless it is listed with rows of its own. Refuses
    indices outside the vocabulary, modules that are not embeddings, and modules that are also LoRA targets
    (`chosen`) or inside modules_to_save (`saved`). Nothing is changed. `options` go to TokenRows (the standalone
    method's key, random init and tied keys)."""
    if indices is None:
        return []
    if isinstance(indices[0], int):
        wanted = {_input_embedding(sites, model): tuple(indices)}
    else:
        wanted = {}
        for name, rows in indices:
            for p in _servable(sites, model, name):
                wanted.setdefault(p, tuple(rows))
    tied: dict[str, tuple[str, ...]] = {}
    embed = _module_path(model, "get_input_embeddings")
    if embed in wanted and _tie_word_embeddings(model):
        readers = [p for p, s in sites.items() if s.weight == sites[embed].weight and p != embed]
        if all(wanted.get(p, wanted[embed]) == wanted[embed] for p in readers):   # PEFT: same rows or unlisted
            tied[embed] = tuple(readers)
            for p in readers:
                wanted.pop(p, None)
    out = []
    chosen, saved = set(chosen), tuple(saved)
    for path, rows in wanted.items():
        site = sites[path]
        weight = tensor_at(gm, site.weight)
        vocab = weight.shape[0]
        bad = [i for i in rows if i >= vocab]
        if bad:
            raise SpecError(f"trainable_token_indices: index {bad[0]} is outside the vocabulary of {path} "
                            f"({vocab} rows, indices 0..{vocab - 1}); resize the embedding first "
                            "(model.resize_token_embeddings) or drop the index")
        readers = (path, *tied.get(path, ()))
        both = [p for p in readers if p in chosen]
        if both:
            raise SpecError(f"trainable_token_indices: {both[0]} would be both a LoRA target and a reader of "
                            f"trained token rows of {path}; leave it out of the targets or out of "
                            "trainable_token_indices")
        inside = [(p, s) for p in readers for s in saved if p == s or p.startswith(s + ".")]
        if inside:
            raise SpecError(f"trainable_token_indices: {inside[0][0]} is in modules_to_save ({inside[0][1]}) too; "
                            "as in PEFT, train a module in full or some of its rows, not both; remove it from one")
        out.append(TokenRows(path, site.weight, rows, weight, tied.get(path, ()), **options))
    return out


# --- the pass --------------------------------------------------------------------------------------------------
@route_value("tokens")
def _tokens_value(store: AdapterStore, name: str, key: tuple, like: torch.Tensor, gm: GraphModule):
    """Adapter `name`'s row index or rows at one reader; empty ones (no rows: the read sees W) where it has none.
    The router makes the row count dynamic where the adapters' counts differ."""
    _, target, reader, part = key
    rows = rows_for(store[name], target, reader)
    if rows is None:
        return torch.empty((0, *like.shape[1:]), dtype=like.dtype, device=store.device)
    return rows.index if part == "index" else rows.delta


_tokens_value.unbacked = True   # adapters with 0 or 1 rows (or none here) share the compiled graph of the others


def insert_token_rows(gm: GraphModule, store: AdapterStore) -> int:
    """Make every read of a weight whose rows some adapter trains at that reader read W.index_copy(0, index, delta)
    from the call's route; returns the number of rewritten reads."""
    readers: dict[str, set[str]] = {}     # get_attr target -> module paths whose reads see some adapter's rows
    for a in store.names():
        for t in store[a].tokens.values():
            readers.setdefault(t.target, set()).update(t.readers)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or node.target not in readers:
            continue
        w = tensor_at(gm, node.target)
        made: dict[str, torch.fx.Node] = {}
        for user in list(node.users):
            reader = module_path(user)[0]
            if reader not in readers[node.target]:
                continue
            if reader not in made:
                idx = route_input(gm, ("tokens", node.target, reader, "index"), w.new_empty(3, dtype=torch.long))
                delta = route_input(gm, ("tokens", node.target, reader, "delta"), w.new_empty(3, *w.shape[1:]))
                with gm.graph.inserting_before(user):    # rows kept in float32 (autocast_adapter_dtype): W's dtype
                    delta = gm.graph.call_function(aten.to.dtype, (delta, w.dtype))
                    made[reader] = gm.graph.call_function(aten.index_copy.default, (node, 0, idx, delta))
                made[reader].meta["peftc"] = {"method": TAG, "adapter": "*", "role": "rows",
                                              "target": node.target, "reader": reader}
                made[reader].meta["val"] = torch.empty_like(w, device="meta")
            user.replace_input_with(node, made[reader])
            count += 1
    return count


def fold_token_rows(gm: GraphModule, adapter: Adapter, name: str, set_constant) -> int:
    """merge()'s part: in a copy of the base graph, each read of a weight whose rows `adapter` trains at that
    reader reads the weight with the rows in place as a constant (`set_constant(gm, target, tensor)`): at the
    weight's own name where every read of it sees the same rows (a tied matrix stays one tensor), else under a
    name of its own. Returns the count of rewritten reads."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not any(t.target == node.target for t in adapter.tokens.values()):
            continue
        weight = tensor_at(gm, node.target)
        seen = {u: rows_for(adapter, node.target, module_path(u)[0]) for u in node.users}
        groups: dict[int, tuple[TokenRows, list]] = {}
        for u, rows in seen.items():
            if rows is not None:
                groups.setdefault(id(rows), (rows, []))[1].append(u)
        for rows, users in groups.values():
            merged = rows.value(weight).detach()
            if not torch.isfinite(merged).all():
                raise MergeError(f"merging adapter {name!r}: its trained token rows of {rows.path} are not finite "
                                 "(inf or NaN); check training for divergence; nothing was merged")
            if len(users) == len(seen):           # every read sees these rows: the weight's own name
                set_constant(gm, node.target, merged)
            else:
                target = f"{node.target}_tokens_{site_key(rows.path)}"
                set_constant(gm, target, merged)
                with gm.graph.inserting_after(node):
                    const = gm.graph.get_attr(target)
                for u in users:
                    u.replace_input_with(node, const)
            count += len(users)
    return count


def token_state(adapter: Adapter, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{model state-dict key: the weight with the adapter's rows} for the weights of modules that read trained rows
    (tied readers of one TokenRows share one tensor, so a tied matrix stays tied)."""
    out = {}
    for rows in adapter.tokens.values():
        value = None
        for reader in rows.readers:
            k = f"{reader}.weight"
            if k in state:
                value = rows.value(state[k]).detach() if value is None else value
                out[k] = value
    return out


# --- PEFT's standalone method ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainableTokens(AdapterSpec):
    """PEFT's TrainableTokensConfig (peft_type TRAINABLE_TOKENS): rows `token_indices` of the embeddings
    `target_modules` (None: the input embedding; names, or a regex string that must match a whole path) trained in
    full, W -> W.index_copy(0, rows, delta); a tied output head sees the same rows. `init=False`: random rows
    (PEFT's init_weights=False) instead of the rows' own values. It adapts no sites (`targets` is empty): its
    adapter is its token rows."""

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"
    token_indices: tuple[int, ...] = ()
    target_modules: Union[None, str, tuple[str, ...]] = None
    init: bool = True
    task_type: Union[str, None] = None

    def __post_init__(self):
        rows = _token_indices(list(self.token_indices) if isinstance(self.token_indices, tuple) else
                              self.token_indices)
        if rows is None or not isinstance(rows[0], int):
            raise SpecError(f"TrainableTokens token_indices must be a non-empty list of token indices, got "
                            f"{self.token_indices!r}")
        object.__setattr__(self, "token_indices", rows)
        t = self.target_modules
        if isinstance(t, (list, tuple)) and t and all(isinstance(n, str) and n for n in t):
            object.__setattr__(self, "target_modules", tuple(t))
        elif isinstance(t, str):
            try:
                re.compile(t)
            except re.error as e:
                raise SpecError(f"TrainableTokens target_modules={t!r} is not a valid regular expression ({e})") \
                    from None
        elif t is not None:
            raise SpecError(f"TrainableTokens target_modules must be None, a regex string or a list of module names, "
                            f"got {t!r}")
        if not isinstance(self.init, bool):
            raise SpecError(f"TrainableTokens init must be True or False (PEFT's init_weights), got {self.init!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise SpecError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")

    @property
    def targets(self) -> tuple:
        """The sites it adapts: none (the adapter build's target resolution gives [])."""
        return ()

    @property
    def trainable_token_indices(self):
        """The rows in LoRA's trainable_token_indices form, which the adapter build resolves."""
        t = self.target_modules
        if t is None:
            return self.token_indices
        names = (re.compile(t),) if isinstance(t, str) else t
        return tuple((n, self.token_indices) for n in names)

    @property
    def token_options(self) -> dict:
        return {"key": KEY, "random": not self.init, "save_tied": True}


_TT_KEYS = {"token_indices": "token_indices", "target_modules": "target_modules", "init_weights": "init",
            "task_type": "task_type"}
_TT_METADATA = {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version"}


def tokens_from_config(cfg: dict, source: str = "adapter_config.json") -> TrainableTokens:
    unknown = [k for k, v in cfg.items() if k not in set(_TT_KEYS) | _TT_METADATA and v not in (None, False, {}, [])]
    if unknown:
        raise SpecError(f"{source}: {unknown[0]}={cfg[unknown[0]]!r} is a TRAINABLE_TOKENS option peftc does not "
                        "know; remove it if it is neutral for this adapter")
    kwargs = {name: cfg[key] for key, name in _TT_KEYS.items() if cfg.get(key) is not None}
    try:
        return TrainableTokens(**kwargs)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None


def tokens_to_config(spec: TrainableTokens, *, base_model_name_or_path: str | None, task_type: str | None,
                     **_) -> dict:
    t = spec.target_modules
    return dict(sorted({
        "peft_type": "TRAINABLE_TOKENS", "token_indices": list(spec.token_indices), "init_weights": spec.init,
        "target_modules": list(t) if isinstance(t, tuple) else t, "task_type": spec.task_type or task_type,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "revision": None,
    }.items()))


def _no_site(*args):
    raise AssertionError("TrainableTokens adapts no sites")     # its targets are none


# A method without sites: its adapter is its token rows, which the generic build makes and the trainable tokens pass
# wires (and merge() folds); its own rewrite and fold rule have nothing to do.
register_method(Method(TrainableTokens, "TRAINABLE_TOKENS", tokens_from_config, tokens_to_config, build=_no_site,
                       rewrite=lambda gm, **_: 0, peft_keys=lambda path, weights: (), site_kinds=(), fold=_no_site,
                       forms=("single",),
                       param_count=lambda spec, site: 0))
