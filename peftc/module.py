"""PeftModule: the rewritten graph, its adapter store and the model's config, called like the model itself."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from .build import as_spec, check_adapter_name, check_autocast
from .checkpoint import ModelData, load_spec, load_weights_, read_adapter_weights, save_adapters
from .errors import GenerationError, InputError, SpecError, UnknownAdapter
from .export import export_program
from .generation import Steps
from .graph_model import GraphModel
from .methods import method_of
from .passes.match import QUANTIZED
from .passes.merge import merge_graph_module
from .passes.route import plain_route
from .peft_surface import PeftSurface
from .pipeline import Compiler, Forms
from .store import BASE, STORE, Adapter, AdapterStore, Capacity
from .trace import Traced
from .weighted import weighted_adapter

log = logging.getLogger(__name__)


class PeftModule(PeftSurface, GraphModel):
    """An adapted model. Takes the model's own arguments (plus `labels`, and `adapter_names`: one adapter name per
    row, "__base__" for none) and returns the model's own output type.

    Base weights are shared with the user's model, frozen; every adapter lives in `self.store`. Each call picks
    one of three graphs (forms) and passes what it needs as its own inputs, so concurrent calls never see each
    other: "base" (adapters disabled, or every row "__base__": the model's own graph), "single" (every row uses
    one adapter: the plain low-rank form on that adapter's weights, `graph_module`) and "mixed" (rows use different
    adapters: the gathered form). set_adapter, disable_adapters and per-row choice never change a graph; adding or
    deleting an adapter asks the compiler it was given (pipeline.Compiler) for new forms (one recompile each under
    torch.compile) unless a declared capacity has room. A call only runs the forms it holds: it never builds one.

    generate() runs the same three forms of the model's generation graphs (peftc.decoder: prefill and decode over
    a KV cache each call owns). They are asked of the compiler on the first generate (the model is traced for them
    once, ~1-3 s for a small model) and again after an adapter is added or deleted, and kept between calls.
    """

    extra_call_kwargs = ("adapter_names", "adapter_index")
    eager_calls = ("_plan",)
    forms = ("base", "single", "mixed")

    def __init__(self, traced: Traced, compiler: Compiler, *, loss_type: str | None = None,
                 base_name: str | None = None):
        # graph_module: the module tree every form's code runs against (its graph: the plain form's, flat). It
        # stays the same object for the module's life, so hooks and wrappers put on its blocks survive rebuilds.
        root = GraphModule(traced.gm, copy.deepcopy(traced.gm.graph))
        base_model = compiler.model
        super().__init__(dataclasses.replace(traced, gm=root), config=getattr(base_model, "config", None),
                         loss_type=loss_type, model_class=type(base_model).__name__, base_name=base_name,
                         generation_config=getattr(base_model, "generation_config", None))
        self.sites = compiler.sites
        self.base_passes = list(compiler.base_passes)      # passes already applied to the base graph
        object.__setattr__(self, "_compiler", compiler)
        self.active_adapter: str | None = None
        # The graph before any adapter (mode passes applied): every rebuild starts from a copy of it. Not a
        # submodule: its tensors are the root's.
        object.__setattr__(self, "base_graph_module", traced.gm)
        self._structure("base", traced.gm)
        object.__setattr__(self, "_store", AdapterStore().to(_device_of(traced.gm)))
        object.__setattr__(self, "_single_gm", None)   # the plain form's flat graph (its modules are the root's)
        object.__setattr__(self, "_mixed_gm", None)    # the gathered form; not a submodule (shared weights)
        object.__setattr__(self, "_mixed_refusal", "no adapter yet")
        self._routes_changed()
        # The user's model, not registered as a submodule: export_merged reads its state dict (key names, tied
        # weights, tensors the graph never reads). Its weights are the ones the graph shares anyway.
        object.__setattr__(self, "base_model", base_model)

    @property
    def store(self) -> AdapterStore:
        return self._store

    @property
    def adapters(self) -> list[str]:
        return self.store.names()

    # --- adapters ----------------------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """New forms from the compiler for the adapters in the store, installed."""
        self._install(self._compiler.forms(self.store))

    def _install(self, forms: Forms) -> None:
        """Run `forms` from now on: the plain form's graph becomes the root's (its modules replace the old form's),
        the gathered form's graph (or why there is none) is kept beside it."""
        root = self.graph_module
        for form in ("single", "mixed"):        # the old forms' modules go; the new graphs' are adopted
            if hasattr(root, f"peftc_{form}"):
                delattr(root, f"peftc_{form}")
        forms.single.train(self.training)
        self._structure("single", forms.single)        # gives the root what the new graph reads, first
        root.graph = forms.single.graph
        root.train(self.training)
        object.__setattr__(self, "_single_gm", forms.single)
        self._codes.pop("mixed", None)
        if forms.mixed is not None:
            forms.mixed.train(self.training)
            self._structure("mixed", forms.mixed)
        object.__setattr__(self, "_mixed_gm", forms.mixed)
        object.__setattr__(self, "_mixed_refusal", forms.mixed_refusal)
        self._routes_changed()
        self._forget_decoder()       # generation graphs are emitted again, with these adapters, on next use
        self.fresh_compile_cache()   # the old graph's compiled entries are not reused

    @property
    def mixed_graph_module(self) -> GraphModule:
        """The gathered-form graph (one adapter per row); an InputError saying why where the compiler could not
        make one for these adapters."""
        if self._mixed_gm is None:
            raise InputError(f"rows of this batch cannot take different adapters: {self._mixed_refusal}")
        return self._mixed_gm

    def train(self, mode: bool = True):
        super().train(mode)
        for gm in (getattr(self, "base_graph_module", None), getattr(self, "_mixed_gm", None)):
            if gm is not None:
                gm.train(mode)
        return self

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for gm in (getattr(self, "base_graph_module", None), getattr(self, "_mixed_gm", None)):
            if gm is not None:        # graphs that are not submodules (their buffers are copies of the root's)
                gm._apply(fn, *args, **kwargs)
        self._routes_changed()      # buffers (scales, zeros) may be new tensors now
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_route_cache"] = {}     # views of this module's tensors: a copy makes its own
        return state

    def _routes_changed(self) -> None:
        """Forget the per-adapter route values (new ones are made on the next call)."""
        object.__setattr__(self, "_route_cache", {})

    def _add(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise SpecError(f"an adapter named {name!r} exists already; adapters: {self.adapters}")
        if self._sharded() and any(p.requires_grad for p in adapter.parameters()):
            raise SpecError(f"cannot add trainable adapter {name!r}: this module is sharded (fully_shard), and FSDP "
                            "shards and synchronizes only the parameters it had then, so this adapter's gradients "
                            "would differ between ranks; add or load trainable adapters before fully_shard (a frozen "
                            "one, load_adapter(..., is_trainable=False), can be loaded now)")
        self._check_room(name, adapter)
        graph_changes = self._changes_graph(adapter)
        self.store.add(name, adapter.to(_device_of(self.base_graph_module)))
        self._routes_changed()
        try:
            if graph_changes:
                self._rebuild()
        except BaseException:
            self.store.remove(name)
            self._routes_changed()
            if self.adapters:
                self._rebuild()
            raise
        if self.active_adapter is None:
            self.set_adapter(name)
        else:
            self.set_adapter(self.active_adapter)   # slots may have moved

    def _build_adapter(self, spec, *, loading: bool = False, autocast_adapter_dtype: bool = True) -> Adapter:
        """`spec`'s adapter, built by the compiler from the base graph's data: its sites and the model."""
        return self._compiler.adapter(spec, loading=loading,
                                      autocast_adapter_dtype=check_autocast(autocast_adapter_dtype))

    def _check_room(self, name: str, adapter: Adapter) -> None:
        cap = self.store.capacity
        if cap is None:
            return
        if not self.store.free_slots():
            raise InputError(f"no room for adapter {name!r}: the declared capacity of {cap.adapters} adapter(s) is "
                             f"full ({self.adapters}); delete_adapter() one, or pm.reserve(adapters=...) for more "
                             "(one recompile)")
        method = adapter.method
        why = method.room(adapter, cap) if method.room is not None else None
        if why:
            raise InputError(f"adapter {name!r} does not fit the declared capacity: {why}")

    def _changes_graph(self, adapter: Adapter) -> bool:
        """Whether adding or deleting `adapter` needs a new graph: always without a capacity; with one, only for
        modules_to_save, trainable tokens or for targets outside the routed sites."""
        if self.store.capacity is None or adapter.saved_modules or adapter.tokens:
            return True
        if "capacity" not in adapter.method.capabilities:   # no lane of its size: it comes with a rebuild
            return True
        fits = adapter.method.fits_graph
        if fits is not None and not fits(self._single_gm, adapter):
            return True
        return not set(adapter.targets) <= self.store.routed_sites()

    def reserve(self, adapters: int, rank: int | None = None, targets: Any = None) -> None:
        """Declare room for up to `adapters` adapters on the routed sites (the present adapters' targets plus
        `targets`, in LoRA's target syntax), each method's in its own terms (`rank`: LoRA's largest rank; IA3 needs
        none). Rebuilds the graph once (one recompile); from then on, adding, loading and deleting adapters within
        it never changes the graph, and going past it is an error. Adapters are allocated at the capacity's size
        (LoRA: zero-padded to `rank`), as new Parameter objects: reserve before making an optimizer. Adapters with
        modules_to_save, or targets outside the routed sites, still rebuild the graph."""
        cap = Capacity(adapters, rank, targets)
        if adapters < len(self.adapters):
            raise InputError(f"capacity adapters={adapters} is below the {len(self.adapters)} adapters present "
                             f"({self.adapters}); delete some first")
        for a in self.adapters:
            method = self.store[a].method
            why = method.room(self.store[a], cap) if method.room is not None else None
            if why:
                raise InputError(f"capacity {cap} does not fit adapter {a!r}: {why}")
        reserved = self._compiler.paths(targets) if targets is not None else []
        store = self.store
        old = (store.capacity, store.reserved_sites, store.slots(), store.lanes,
               {a: dict(store[a].sites) for a in self.adapters})
        store.set_capacity(cap, reserved)
        try:
            self._rebuild()
        except BaseException:
            store.capacity, store.reserved_sites, store._slots, store.lanes = old[:4]
            for a, sites in old[4].items():
                store[a].sites.update(sites)
            self._rebuild()
            raise

    @property
    def capacity(self):
        """The declared Capacity (pm.reserve), or None: then every added or deleted adapter rebuilds the graph."""
        return self.store.capacity

    def _check_name(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownAdapter(name, self.adapters)

    def add_adapter(self, adapter_name: str, spec: Any, *, autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (fresh weights) beside the others; the active adapter does not change.
        autocast_adapter_dtype: as in peftc.compile (PEFT's: float32 weights on a float16 / bfloat16 model)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise SpecError(f"an adapter named {adapter_name!r} exists already; adapters: {self.adapters}")
        self._add(adapter_name, self._build_adapter(as_spec(spec), autocast_adapter_dtype=autocast_adapter_dtype))

    def load_adapter(self, directory, adapter_name: str, *, is_trainable: bool = False,
                     autocast_adapter_dtype: bool = True) -> None:
        """Add the adapter saved in `directory` (by PEFT or peftc) under `adapter_name` (autocast_adapter_dtype: as
        in peftc.compile)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise SpecError(f"an adapter named {adapter_name!r} exists already; adapters: {self.adapters}")
        spec = load_spec(directory)
        tensors = read_adapter_weights(directory)
        adapter = self._build_adapter(spec, loading=True, autocast_adapter_dtype=autocast_adapter_dtype)
        adapter.requires_grad_(is_trainable)   # before it takes a slot: a capacity's frozen slots stay alike
        self._add(adapter_name, adapter)
        try:
            load_weights_(self.checkpoint_data, adapter_name, tensors, source=str(directory))
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter every row of a plain call uses (model state, as in PEFT; the graph is
        unchanged). Inside `disable_adapters()` the choice takes effect when the block ends."""
        self._check_name(adapter_name)
        self.active_adapter = adapter_name

    def _whole_batch_slot(self) -> int:
        """The slot a call without adapter_names uses: 0 while disabled, else the active adapter's."""
        if getattr(self, "_disabled", 0) or self.active_adapter is None:
            return 0
        return self.store.slot(self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        if adapter_name == self.active_adapter:
            others = [a for a in self.adapters if a != adapter_name]
            raise InputError(f"cannot delete the active adapter {adapter_name!r}; "
                             + (f"set_adapter() to one of {others} first" if others else "it is the only adapter"))
        graph_changes = self._changes_graph(self.store[adapter_name])
        self.store.remove(adapter_name)
        if graph_changes:
            self._rebuild()
        else:
            self._routes_changed()
        self.set_adapter(self.active_adapter)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add `adapter_name`, a weighted combination of LoRA `adapters` ("linear", "cat" or "svd"), as PEFT's
        add_weighted_adapter does (frozen, lora_alpha = r); the active adapter does not change. See peftc.weighted."""
        self._add(adapter_name, weighted_adapter(self.store, self.sites, adapters, weights, adapter_name,
                                                 combination_type, svd_rank, svd_clamp, svd_full_matrices,
                                                 svd_driver, density, majority_sign_method))

    def replace_lora_weights_loftq(self, model_path=None, adapter_name: str = "default", callback=None) -> list[str]:
        """LoftQ on a 4-bit base (PEFT's replace_lora_weights_loftq): LoRA adapter `adapter_name`'s A and B on each
        bitsandbytes 4-bit layer from the SVD of W - Q, W read from the full-precision safetensors at `model_path`
        (default: the model's name_or_path), Q the layer's weight; `callback(self, module_path)` -> keep? after
        each layer. Written in place (every form sees them, no rebuild); returns the paths kept. See peftc.loftq."""
        from .loftq import replace_lora_weights_loftq
        return replace_lora_weights_loftq(self, model_path, adapter_name, callback)

    @contextlib.contextmanager
    def disable_adapters(self):
        """Within the block every call without adapter_names runs the base model exactly."""
        self._disabled = getattr(self, "_disabled", 0) + 1
        try:
            yield self
        finally:
            self._disabled -= 1

    def adapter_index(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The per-row slot tensor for `adapter_names` ("__base__" = no adapter); pass it as adapter_index=... to
        route a batch without Python strings."""
        slots = self.store.slots()
        unknown = sorted({n for n in adapter_names if n is None or n not in slots}, key=str)
        if unknown:
            raise UnknownAdapter(unknown, [*self.adapters, BASE], "adapter_names")
        return torch.tensor([slots.index(n) for n in adapter_names], device=_device_of(self.base_graph_module))

    # --- calling -----------------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str] | None = None, adapter_index: torch.Tensor | None = None,
                **kwargs):
        """The model's own call; `adapter_names` (one per row, "__base__" for none) or `adapter_index` (their slot
        tensor, from pm.adapter_index) route each row to its adapter.

        This frame runs eagerly under torch.compile (see GraphModel): the names become this call's own route (the
        graph to run and its inputs) here, and the compiled graphs read only that data, so no list of names and no
        adapter switch ever recompiles. Nothing of the call is written anywhere another call could read it."""
        form, _, route = self._plan(args, kwargs, adapter_names, adapter_index)
        return self._runs[form](self._codes[form], route, *args, **kwargs)

    def _plan(self, args, kwargs, adapter_names, adapter_index) -> tuple[str, GraphModule, list | None]:
        """(form, graph, route) for one call, checked: a bad adapter_names/adapter_index raises here, before any
        graph runs, and leaves nothing behind."""
        form, name, rows = self._choose(adapter_names, adapter_index, lambda: self._batch_size(args, kwargs))
        if form == "mixed":
            return "mixed", self.mixed_graph_module, [rows]
        return self._whole_batch(0 if name is None else self.store.slot(name))

    def _choose(self, adapter_names, adapter_index, batch) -> tuple[str, str | None, torch.Tensor | None]:
        """(form, the adapter every row uses or None for the base model, the rows' slots for a mixed batch) of one
        call; `batch()` gives its row count. Checked: a bad adapter_names/adapter_index raises here."""
        if adapter_names is None and adapter_index is None:
            slot = self._whole_batch_slot()
            return ("base", None, None) if slot == 0 else ("single", self.store.slots()[slot], None)
        if adapter_index is None:
            if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
                raise InputError(f"adapter_names must be a list with one adapter name per row, got "
                                 f"{type(adapter_names).__name__}")
            rows = self.adapter_index(adapter_names)
            names = list(adapter_names)
        else:
            if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype.is_floating_point:
                raise InputError("adapter_index must be an integer tensor of slots, one per row (from "
                                 "pm.adapter_index(names))")
            rows, names = adapter_index, None
        batch = batch()
        if rows.dim() != 1 or rows.shape[0] != batch:
            raise InputError(f"adapter_names/adapter_index must give one adapter per row: {batch} rows, "
                             f"got {tuple(rows.shape)}")
        names = self.names_of(rows) if names is None else names
        self.check_mixed(names)
        distinct = set(names)
        if len(distinct) == 1:
            name = names[0]
            return ("base", None, None) if name == BASE else ("single", name, None)
        return "mixed", None, rows.to(device=_device_of(self.base_graph_module), dtype=torch.long)

    def _whole_batch(self, slot: int) -> tuple[str, GraphModule, list | None]:
        if slot == 0:
            return "base", self.base_graph_module, None
        gm = self.graph_module
        return "single", gm, self._route_of(gm, self.store.slots()[slot])

    def _route_of(self, gm: GraphModule, name: str, graph: str = "forward") -> list[torch.Tensor]:
        """The plain-form route of adapter `name` in `graph` (the forward, or generation's "prefill" / "decode";
        passes.route.plain_route), made once and kept until the adapters or their tensors change. Without autograd
        its tensors go in detached, so frozen and trainable adapters look alike to torch.compile and switching
        between them never recompiles."""
        grad = torch.is_grad_enabled()
        if self._sharded():      # FSDP swaps the adapter's tensors (shards / gathered) at every call: look them up
            return plain_route(gm, self.store, name, detach=not grad)
        route = self._route_cache.get((name, grad, graph))
        if route is None:
            route = plain_route(gm, self.store, name, detach=not grad)
            self._route_cache[(name, grad, graph)] = route
        return route

    def _sharded(self) -> bool:
        """Whether FSDP2 (`fully_shard`) manages the store's parameters: put on this module, its tree's root or
        the store."""
        fsdp = sys.modules.get("torch.distributed.fsdp")     # not imported: nothing is sharded
        return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in (self, self.graph_module, self.store))

    def names_of(self, rows: torch.Tensor) -> list[str]:
        """The adapter name of each slot index in `rows` (checked to be in range)."""
        slots = self.store.slots()
        values = rows.tolist()
        bad = sorted({v for v in values if not 0 <= v < len(slots) or slots[v] is None})
        if bad:
            filled = {i: n for i, n in enumerate(slots) if n is not None}
            raise InputError(f"adapter_index has slot(s) {bad}; valid slots are {filled}; build it with "
                             "pm.adapter_index(names)")
        return [slots[v] for v in values]

    def check_mixed(self, adapter_names: Sequence[str]) -> None:
        if len(set(adapter_names)) > 1:
            for a in sorted(set(adapter_names) - {BASE}):
                method = method_of(self.store[a].spec)
                why = f"{method.name} has no per-row form" if "mixed" not in method.forms else \
                    method.mixed_refusal(self.store[a]) if method.mixed_refusal is not None else None
                if why:
                    raise InputError(f"adapter {a!r} cannot share a batch with other adapters: {why}; run its rows "
                                     "in a batch of their own, or merge() it")
        saving = {a for a in set(adapter_names) - {BASE} if self.store[a].saved_modules}
        if saving and len(set(adapter_names)) > 1:
            raise InputError(f"adapters {sorted(saving)} have modules_to_save or trained biases (bias != 'none'); "
                             "a mixed batch cannot route those copies per row; run their rows in a batch of their own")
        tokens = {a for a in set(adapter_names) - {BASE} if self.store[a].tokens}
        if tokens and len(set(adapter_names)) > 1:
            raise InputError(f"adapters {sorted(tokens)} train embedding rows (trainable_token_indices); a mixed "
                             "batch cannot route those rows per row; run their rows in a batch of their own, or "
                             "merge() the adapter")

    def _batch_size(self, args, kwargs) -> int:
        first = args[0] if args else kwargs.get(self.main_input_name)
        if first is None:
            first = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        return first.shape[0]

    # --- generation ----------------------------------------------------------------------------------------------
    def _source_model(self):
        return self.base_model

    def _emit_decoder(self):
        return self._compiler.decoder_forms(self.store)

    def _decoder_steps(self, forms, adapter_names, batch: int, wrap) -> Steps:
        """Prefill and decode of one generate call: the form adapter_names (or the active adapter) pick, each graph
        given this call's own route."""
        if self._sharded():        # the generation graphs run outside FSDP's hooks: they would meet the shards
            raise GenerationError("generate on a module sharded with fully_shard is not served: FSDP gathers the "
                                  "parameters around forward calls only; save the adapter (every rank calls "
                                  "save_adapter) and generate with it loaded into an unsharded model")
        form, name, rows = self._choose(adapter_names, None, lambda: batch)
        if form == "mixed" and "mixed" not in forms.prefill:
            raise InputError(f"rows of this batch cannot take different adapters: {forms.mixed_refusal}")
        calls = []
        for kind, gm in (("prefill", forms.prefill[form]), ("decode", forms.decode[form])):
            route = [rows] if form == "mixed" else self._route_of(gm, name, kind) if form == "single" else []
            calls.append(Steps.call(wrap(gm), route))
        return Steps(*calls)

    # --- parameters ----------------------------------------------------------------------------------------------
    def trainable_parameters(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """The parameters a fine-tune of the adapter (default: the active one) updates: its LoRA weights and its
        modules_to_save copies."""
        name = adapter_name or self.active_adapter
        self._check_name(name)
        return [p for p in self.store[name].parameters() if p.requires_grad]

    def named_trainable_parameters(self, adapter_name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        name = adapter_name or self.active_adapter
        self._check_name(name)
        return ((f"graph_module.{STORE}.adapters.{name}.{n}", p) for n, p in self.store[name].named_parameters()
                if p.requires_grad)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted as PEFT counts them (shared tensors once)."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        # trained-bias copies (bias="all"/"lora_only") stand in for the model's own biases, which PEFT trains in
        # place: counted once, as the model's
        copies = {id(p): p.numel() for a in self.adapters for h in self.store[a].saved.values()
                  if not getattr(h, "whole", True) for p in h.parameters()}
        # a quantized layer's weight is a buffer of packed codes here: counted as its out x in parameters
        quantized = sum(s.in_features * s.out_features for s in self.sites.values() if s.kind in QUANTIZED)
        return trainable, total - sum(copies.values()) + quantized

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- checkpoints -----------------------------------------------------------------------------------------------
    def save_adapter(self, directory, adapter_name: str | None = None, *,
                     is_main_process: bool | None = None) -> list[Path]:
        """Write adapter_config.json + adapter_model.safetensors in PEFT's format and layout (atomically): the
        adapter "default" in `directory`, any other in `directory/<name>`; all adapters unless `adapter_name`.
        Sharded by FSDP2 (`fully_shard`), every rank calls it (the shards are all-gathered) and only the main
        process writes: `is_main_process` (transformers' convention), by default rank 0."""
        if is_main_process is None and self._sharded():     # its adapters loaded after fully_shard too: one writer
            is_main_process = torch.distributed.get_rank() == 0
        return save_adapters(self.checkpoint_data, directory, adapter_name, is_main_process)

    @property
    def checkpoint_data(self) -> ModelData:
        """What checkpoints read and write: the store, the sites, the base graph and the model's names."""
        return ModelData(self.store, self.sites, self.base_graph_module, self.base_name, self.loss_type)

    # --- merging and export ----------------------------------------------------------------------------------------
    def merge(self, adapter_name: str | None = None, *, requantize: bool = False) -> "MergedModule":
        """A new module with the adapter (the active one, or `adapter_name`) folded into the weights: its graph has
        the base model's ops only. This PeftModule is not changed, so the unmerged model stays exact.

        On a quantized base (bitsandbytes 4-bit / 8-bit) each adapted layer is dequantized and the update added in
        full precision, so the merged model computes what the adapted one does (lossless; its adapted layers are
        full precision, the others stay quantized). `requantize=True` quantizes the merged layers again in their
        own format instead, and `merged.requantize_report` says what error that introduced (it is also logged)."""
        name = adapter_name or self.active_adapter
        if name not in self.adapters:
            raise UnknownAdapter(name, self.adapters)
        gm = merge_graph_module(self.base_graph_module, self.sites, self.store[name], name, requantize=requantize)
        merged = MergedModule(dataclasses.replace(self._traced, gm=gm), config=self.config, loss_type=self.loss_type,
                              model_class=self.model_class, base_name=self.base_name,
                              generation_config=self.generation_config)
        compiler, adapter = self._compiler, self.store[name]
        object.__setattr__(merged, "_decoder_source", lambda: compiler.merged_decoder_forms(
            gm, adapter, name, requantize=requantize))
        object.__setattr__(merged, "_model", compiler.model)
        report = gm.meta.get("peftc_requantize")
        if report is not None:
            log.warning("merge(requantize=True): %s", report)
        object.__setattr__(merged, "requantize_report", report)
        return merged.train(self.training)

    def export(self, path, *, merged: bool = True, adapter_name: str | None = None) -> Path:
        """Write a torch.export program (.pt2) with dynamic batch and sequence: the merged graph, or with
        merged=False the adapted graph (the active adapter). Load it with torch.export.load(path).module()."""
        module = self.merge(adapter_name) if merged else self
        return export_program(module, path)

    def extra_repr(self) -> str:
        return f"model={self.model_class}, adapters={self.adapters}, active={self.active_adapter!r}"


def _device_of(gm: nn.Module) -> torch.device:
    p = next(gm.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class MergedModule(GraphModel):
    """A model with an adapter folded into its weights (from PeftModule.merge): same inputs and output types as the
    PeftModule it came from, the base model's ops and cost."""

    def _emit_decoder(self):
        source = getattr(self, "_decoder_source", None)
        return source() if source is not None else None

    def _source_model(self):
        return getattr(self, "_model", None)

    def export(self, path) -> Path:
        """Write a torch.export program (.pt2) with dynamic batch and sequence."""
        return export_program(self, path)

    def extra_repr(self) -> str:
        return f"model={self.model_class}, merged"
