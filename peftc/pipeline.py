"""The pipeline, in one place: trace -> match -> rewrite -> emit.

    lower(model, example_inputs)          trace (torch.export) -> match (passes.match: the sites) -> the base passes
                                          (mode-aware dropout and batch norm, one float attention mask, gated
                                          activations): the base graph, which every form is built from
    emit(base_gm, sites, store, form)     a copy of the base graph -> each method's rewrite pass, for the adapters
                                          of that method in the store (Method.rewrite, in the order the methods
                                          first appear) -> modules_to_save, trainable tokens (plain form)
                                          -> on a model with quantized sites, the plain form's quantized base
                                          calls and the adapter calls after them fused (passes.fuse_quant;
                                          FORM_PASSES, turned off with fuse_quant=False) -> lint, recompile
    emit_forms(base_gm, sites, store)     both forms at once (Forms), what a PeftModule receives
    lower_decoder(model)                  for generation (peftc.decoder): the prefill and decode graphs over a
                                          static KV cache, traced once, each matched and given the base passes;
                                          Compiler.decoder_forms emits their forms over the same store

Data flows one way: the compiler lowers the model once, builds adapters from (graph, sites, spec) (peftc.build),
emits the forms, and hands them to a PeftModule, which runs them; no stage reads anything back from a later one,
and running a form never builds one.
Each pass is (name, fn(gm) -> rewrite count); run_passes lints and recompiles after each and names the failing pass
and the ones before it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import logging
import pkgutil
import threading
from typing import Any, Callable, Sequence

from torch import nn
from torch.fx import GraphModule

from .build import build_adapter, resolve_paths
from .decoder import CacheLayout, DecoderGraphs, check_against_model, flat_graph, share_tensors, trace_decoder
from .errors import GenerationError, InputError, PassError, PeftcError
from .methods import method_of
from . import passes as _passes
from .passes.batchnorm import make_batchnorm_mode_aware
from .passes.dropout import make_dropout_mode_aware
from .passes.fuse_quant import fuse_quantized
from .passes.gated import fuse_gated_activations
from .passes.match import QUANTIZED, Site, find_sites
from .passes.merge import merge_graph_module
from .passes.modules_to_save import insert_saved_copies
from .passes.runtime_checks import drop_input_guards, drop_runtime_checks
from .passes.sdpa_mask import float_attention_masks
from .passes.trainable_tokens import insert_token_rows
from .store import STORE, AdapterStore
from .trace import Traced, trace

log = logging.getLogger(__name__)

# The built-in methods: every pass file is imported, and a method's file registers its Method (adding one touches
# nothing else).
for _info in pkgutil.iter_modules(_passes.__path__):
    importlib.import_module(f"{_passes.__name__}.{_info.name}")

Pass = tuple[str, Callable[[GraphModule], int]]

# what every graph gets before any adapter, in order
BASE_PASSES: tuple[Pass, ...] = (("runtime_checks", drop_runtime_checks), ("dropout", make_dropout_mode_aware),
                                 ("batchnorm", make_batchnorm_mode_aware), ("sdpa_mask", float_attention_masks),
                                 ("gated", fuse_gated_activations))
# what the generation graphs get besides: their inputs are built by peftc.generation, never by a user
DECODER_PASSES: tuple[Pass, ...] = (("input_guards", drop_input_guards),)
FORMS = ("single", "mixed")
# what a form's graph gets after its adapters, in order: (name, fn, the forms it runs on, whether it runs for these
# sites, why it does not run on the other forms: logged); each can be turned off by name (emit's `skip`;
# peftc.compile(fuse_quant=False) skips "fuse_quant")
FORM_PASSES: tuple[tuple[str, Callable[[GraphModule], int], tuple[str, ...], Callable[[dict], bool], str], ...] = (
    ("fuse_quant", fuse_quantized, ("single",), lambda sites: any(s.kind in QUANTIZED for s in sites.values()),
     "a mixed batch gathers each row's A and B (LoRA's gathered form); the fused op takes one adapter per call, so "
     "the gathered form keeps its quantized base calls and adapter calls apart"),
)


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


def _tagged(method, rewrite: Callable[[GraphModule], int]) -> Callable[[GraphModule], int]:
    """`rewrite` that tags the nodes it adds with meta["peftc"] = {"method": method.tag} (what inspection, tests and
    the merged graph's check read): a method's pass never tags by hand."""
    def run(gm: GraphModule) -> int:
        before = set(gm.graph.nodes)
        count = rewrite(gm)
        for n in gm.graph.nodes:
            if n not in before and n.op != "placeholder":
                n.meta.setdefault("peftc", {"method": method.tag})
        return count
    return run


def emit(base_gm: GraphModule, sites: dict[str, Site], store: AdapterStore, form: str,
         before: Sequence[str] = (), skip: Sequence[str] = ()) -> GraphModule:
    """A new GraphModule for `form` ("single": one adapter per call; "mixed": one per row): a copy of the base
    graph with every adapter in `store` inserted by its method's rewrite, each given the paths its adapters adapt,
    then the FORM_PASSES that apply, but those named in `skip`. The store becomes a submodule (shared by every
    form's graph, data only); the modules a rewrite calls are the new graph's own."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    gm = GraphModule(base_gm, copy.deepcopy(base_gm.graph))
    gm.add_submodule(STORE, store)
    methods = list({type(store[a].spec): method_of(store[a].spec) for a in store.names()}.values())
    passes: list[Pass] = []
    for m in methods:
        if form not in m.forms:
            continue
        routed = store.routed_paths(m)
        paths = [p for p in sites if p in routed]
        passes.append((m.tag, _tagged(m, functools.partial(m.rewrite, sites=sites, store=store, form=form,
                                                            paths=paths))))
    if form == "single":      # a mixed batch holds no adapter with copies or token rows (PeftModule.check_mixed)
        passes.append(("modules_to_save", functools.partial(insert_saved_copies, store=store)))
        passes.append(("trainable_tokens", functools.partial(insert_token_rows, store=store)))
    unknown = set(skip) - {name for name, *_ in FORM_PASSES}
    if unknown:
        raise ValueError(f"skip names no form pass: {sorted(unknown)}; form passes: {[p[0] for p in FORM_PASSES]}")
    for name, fn, forms, applies, elsewhere in FORM_PASSES:
        if name in skip or not applies(sites):
            continue
        if form in forms:
            passes.append((name, fn))
        else:
            log.info("%s: not run on the %s form: %s", name, form, elsewhere)
    run_passes(gm, passes, before=before)
    return gm


@dataclasses.dataclass
class Forms:
    """What the compiler hands a PeftModule for its adapters: the plain-form graph, and the gathered form's graph
    or why it cannot be made for these adapters (then a mixed batch is refused with that reason)."""

    single: GraphModule
    mixed: GraphModule | None
    mixed_refusal: str | None = None


def emit_forms(base_gm: GraphModule, sites: dict[str, Site], store: AdapterStore,
               before: Sequence[str] = (), skip: Sequence[str] = ()) -> Forms:
    """Both forms for the adapters in `store`, built now: a call never builds a graph. `skip`: form passes left
    out (emit)."""
    single = emit(base_gm, sites, store, "single", before, skip)
    try:
        return Forms(single, emit(base_gm, sites, store, "mixed", before, skip))
    except InputError as e:        # a site whose rows cannot be routed apart: the plain form still serves
        return Forms(single, None, str(e))


@dataclasses.dataclass
class Compiler:
    """What the compiler made of one model, and how it makes more from it: the base graph (mode passes applied), its
    sites and the user's model. A PeftModule is given one: adding or deleting adapters asks it for adapters
    (`adapter`) and for new forms (`forms`) and installs what it returns; a call never comes back here. `skip`:
    the FORM_PASSES its forms leave out (e.g. ("fuse_quant",), to compare fused and unfused quantized sites)."""

    base_gm: GraphModule
    sites: dict[str, Site]
    model: nn.Module | None
    base_passes: list[str]
    skip: tuple[str, ...] = ()
    decoder_graphs: DecoderGraphs | None = dataclasses.field(default=None, repr=False)   # lowered on first use
    modules: tuple = dataclasses.field(default=(), repr=False)   # the model's (path, class) at compile time

    def __post_init__(self):
        if self.model is not None and not self.modules:
            self.modules = module_layout(self.model)

    def adapter(self, spec, *, loading: bool = False, autocast_adapter_dtype: bool = True):
        """`spec`'s adapter, built from the base graph's data (peftc.build)."""
        return build_adapter(self.base_gm, self.sites, self.model, spec, loading=loading,
                             autocast_adapter_dtype=autocast_adapter_dtype)

    def forms(self, store: AdapterStore) -> Forms:
        """Both forms of the base graph with every adapter in `store` inserted."""
        return emit_forms(self.base_gm, self.sites, store, before=self.base_passes, skip=self.skip)

    def decoder_forms(self, store: AdapterStore) -> DecoderForms:
        """The generation graphs (prefill, decode) of every form, with every adapter in `store` inserted: the model is
        lowered for generation once (lower_decoder), the forms are emitted from that as the forward's are."""
        graphs = _decoder(self)
        out = {}
        refusal = None
        for kind in ("prefill", "decode"):
            base, sites = getattr(graphs, kind), getattr(graphs, f"{kind}_sites")
            _check_sites(store, sites, kind)
            forms = emit_forms(base, sites, store, before=self.base_passes, skip=self.skip)
            out[kind] = {"base": flat_graph(base, STORE).eval(), "single": flat_graph(forms.single, STORE).eval()}
            if forms.mixed is not None:
                out[kind]["mixed"] = flat_graph(forms.mixed, STORE).eval()
            refusal = refusal or forms.mixed_refusal
        return DecoderForms(_layout(graphs, self.base_gm), out["prefill"], out["decode"], refusal)

    def merged_decoder_forms(self, merged: GraphModule, adapter, name: str, *, requantize: bool = False):
        """The generation graphs of `merged` (PeftModule.merge's graph): the same fold on the decoder graphs,
        reading the merged graph's folded weights."""
        graphs = _decoder(self)
        out = {}
        for kind in ("prefill", "decode"):
            gm = merge_graph_module(getattr(graphs, kind), getattr(graphs, f"{kind}_sites"), adapter, name,
                                    requantize=requantize)
            share_tensors(gm, merged)      # the merged forward graph's folded weights: made once
            out[kind] = {"graph": flat_graph(gm, STORE).eval()}
        return DecoderForms(_layout(graphs, merged), out["prefill"], out["decode"])

    def paths(self, targets: Any) -> list[str]:
        """Module paths that `targets` (LoRA's target syntax) selects among the sites."""
        return resolve_paths(self.base_gm, self.sites, self.model, targets)


def lower_decoder(model: nn.Module) -> DecoderGraphs:
    """The model's prefill and decode graphs (peftc.decoder), each with its sites and the base passes, checked
    against the model's own forward."""
    graphs = trace_decoder(model)
    for name in ("prefill", "decode"):
        gm = getattr(graphs, name)
        setattr(graphs, f"{name}_sites", find_sites(gm))
        run_passes(gm, BASE_PASSES + DECODER_PASSES)
    check_against_model(model, graphs)
    return graphs


@dataclasses.dataclass
class DecoderForms:
    """What generate runs: for each form it serves ("base", "single", "mixed"; a merged model's "graph"), the prefill
    and decode graphs (decoder.flat_graph: positional inputs, the route's tensors after the cache's); the cache they
    take; why rows cannot take different adapters, where they cannot."""

    layout: CacheLayout
    prefill: dict[str, GraphModule]
    decode: dict[str, GraphModule]
    mixed_refusal: str | None = None


_DECODER_LOCK = threading.Lock()     # lowering for generation happens once per model, on first use


def module_layout(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """(path, class name) of every module of `model`: what tracing it again must find."""
    return tuple((n, type(m).__name__) for n, m in model.named_modules())


def _decoder(compiler: "Compiler") -> DecoderGraphs:
    with _DECODER_LOCK:
        if compiler.decoder_graphs is None:
            if compiler.model is None:
                raise GenerationError("cannot generate: this module was compiled without its model")
            now = module_layout(compiler.model)
            if now != compiler.modules:
                was = dict(compiler.modules)
                changed = next((f"{n!r} is now {t} (was {was.get(n, 'absent')})" for n, t in now if was.get(n) != t),
                               f"{len(compiler.modules) - len(now)} module(s) were removed")
                raise GenerationError(
                    f"cannot generate: the model was changed after peftc.compile ({changed}); generation traces the "
                    "model as it was compiled, on first use. Compile again, or give other libraries (PEFT's "
                    "get_peft_model wraps modules in place) a copy of the model")
            compiler.decoder_graphs = lower_decoder(compiler.model)
        graphs = compiler.decoder_graphs
    for gm in (graphs.prefill, graphs.decode):
        share_tensors(gm, compiler.base_gm)
    return graphs


def _layout(graphs: DecoderGraphs, source: nn.Module) -> CacheLayout:
    return graphs.layout.following(next((p for p in source.parameters() if p.is_floating_point()), None))


def _check_sites(store: AdapterStore, sites: dict[str, Site], kind: str) -> None:
    missing = sorted({p for a in store.names() for p in store[a].targets} - set(sites))
    if missing:
        raise GenerationError(f"the {kind} graph has no layer at {missing[:5]}, which adapters adapt; this model's "
                              "generation path does not call them, so peftc cannot generate from it unmerged")
