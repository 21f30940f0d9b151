"""The pipeline, in one place: trace -> match -> rewrite -> emit.

    lower(model, example_inputs)          trace (torch.export) -> match (passes.match: the sites) -> the base passes
                                          (mode-aware dropout and batch norm, one float attention mask, gated
                                          activations): the base graph, which every form is built from
    emit(base_gm, sites, store, form)     a copy of the base graph -> each method's rewrite pass, for the adapters
                                          of that method in the store (Method.rewrite, in the order the methods
                                          first appear) -> modules_to_save, trainable tokens (plain form) -> lint,
                                          recompile

Data flows one way: the compiler lowers the model once, builds adapters from (graph, sites, spec) (peftc.build),
and a PeftModule calls `emit` for each form it serves; no stage reads anything back from a later one.
Each pass is (name, fn(gm) -> rewrite count); run_passes lints and recompiles after each and names the failing pass
and the ones before it.
"""
from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Callable, Sequence

from torch import nn
from torch.fx import GraphModule

from .errors import PassError, PeftcError
from .methods import method_of
from .passes import lora as _lora   # noqa: F401 (the built-in methods: each pass file registers its Method)
from .passes.batchnorm import make_batchnorm_mode_aware
from .passes.dropout import make_dropout_mode_aware
from .passes.gated import fuse_gated_activations
from .passes.match import Site, find_sites
from .passes.modules_to_save import insert_saved_copies
from .passes.sdpa_mask import float_attention_masks
from .passes.trainable_tokens import insert_token_rows
from .store import STORE, AdapterStore
from .trace import Traced, trace

log = logging.getLogger(__name__)

Pass = tuple[str, Callable[[GraphModule], int]]

# what every graph gets before any adapter, in order
BASE_PASSES: tuple[Pass, ...] = (("dropout", make_dropout_mode_aware), ("batchnorm", make_batchnorm_mode_aware),
                                 ("sdpa_mask", float_attention_masks), ("gated", fuse_gated_activations))
FORMS = ("single", "mixed")


def run_passes(gm: GraphModule, passes: Sequence[Pass], before: Sequence[str] = ()) -> dict[str, int]:
    """Apply each (name, fn) to `gm`; fn returns its rewrite count. Returns {name: count}. `before` names passes
    that already ran on this graph (for error messages)."""
    done: dict[str, int] = {}
    for name, fn in passes:
        try:
            count = fn(gm)
            gm.graph.lint()
            gm.recompile()
        except PeftcError:
            raise
        except Exception as e:
            ran = ", ".join([*before, *done]) or "none"
            raise PassError(f"pass '{name}' failed (passes that ran before it: {ran}): {type(e).__name__}: {e}") from e
        done[name] = count
        log.debug("pass %s: %d rewrites", name, done[name])
    return done


def lower(model: nn.Module, example_inputs: Any = None) -> tuple[Traced, dict[str, Site], list[str]]:
    """(traced, sites, the base passes that ran): trace and match `model` (not changed) and run the base passes."""
    traced = trace(model, example_inputs)
    sites = find_sites(traced.gm)
    return traced, sites, list(run_passes(traced.gm, BASE_PASSES))


def emit(base_gm: GraphModule, sites: dict[str, Site], store: AdapterStore, form: str,
         before: Sequence[str] = ()) -> GraphModule:
    """A new GraphModule for `form` ("single": one adapter per call; "mixed": one per row): a copy of the base
    graph with every adapter in `store` inserted by its method's rewrite. The store becomes its submodule (shared
    by every form's graph); the form's call modules (store.groups, single; store.banks, mixed) are made anew."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    gm = GraphModule(base_gm, copy.deepcopy(base_gm.graph))
    gm.add_submodule(STORE, store)
    if form == "single":
        store.groups = nn.ModuleDict()
    else:
        store.banks = nn.ModuleDict()
    methods = list({type(store[a].spec): method_of(store[a].spec) for a in store.names()}.values())
    passes: list[Pass] = [(m.tag, functools.partial(m.rewrite, sites=sites, store=store, form=form))
                          for m in methods if form in m.forms]
    if form == "single":      # a mixed batch holds no adapter with copies or token rows (PeftModule.check_mixed)
        passes.append(("modules_to_save", functools.partial(insert_saved_copies, store=store)))
        passes.append(("trainable_tokens", functools.partial(insert_token_rows, store=store)))
    run_passes(gm, passes, before=before)
    return gm
