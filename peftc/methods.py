"""The method registry: one typed table from a method's spec class to what peftc needs to know of it.

    METHODS: dict[type[AdapterSpec], Method]

A method is a frozen spec dataclass, a pass file (or package) under passes/ and one `register_method(Method(...))`
there (built-in methods: passes/lora/, passes/ia3.py); a user's own method registers the same way from outside the
package. Everything that reads or writes adapter_config.json, merges or counts parameters looks the method up here,
so adding one changes no other file. A failed look-up lists what is registered; registering a spec class or a
peft_type twice is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from .errors import SpecError
from .passes.route import add_route_value, remove_route_value, route_kinds
from .spec import AdapterSpec


def form_module(gm: Any, form: str, module: Any, prefix: str = "m") -> str:
    """Make `module` (a module a method's subgraph calls) part of the form's graph `gm`, under gm.peftc_<form>, and
    return its target for call_module / get_attr. A form's modules belong to its graph, never to the store."""
    holder = f"peftc_{form}"
    if not hasattr(gm, holder):
        gm.add_module(holder, torch.nn.Module())
    owner = getattr(gm, holder)
    name = f"{prefix}{len(owner._modules)}"
    owner.add_module(name, module)
    return f"{holder}.{name}"


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype fold rules, merges and weight combinations compute in: float32 for fp16 / bf16 / float32 tensors,
    float64 for float64 ones (never narrower than their inputs)."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


@dataclass(frozen=True)
class Method:
    """One method's contract: a core every method has, and capabilities it may declare.

    Core (what a method is):
    spec:        its frozen spec dataclass (a subclass of AdapterSpec)
    peft_type:   the name in adapter_config.json's "peft_type" (PEFT's, for methods PEFT has)
    from_config: (adapter_config dict, source for errors) -> spec; refuses keys it does not honour
    to_config:   (spec, target_modules=..., base_model_name_or_path=..., task_type=..., modules_to_save=...) -> dict
    build:       (spec, site, the site's weight) -> nn.Module, the adapter's weights at one site (its trainable
                 Parameters; stored as adapter.sites[site_key(path)])
    rewrite:     (gm, *, sites, store, form, paths) -> rewrite count: the method's pass. `paths`: the module paths
                 its adapters adapt in this graph (their targets, and a capacity's reserved sites), in graph order.
                 It inserts its subgraph in routing form "single" (the call's adapter's tensors come in as route
                 inputs, passes.route) or "mixed" (one adapter per row); the modules it calls belong to `gm`
                 (gm.add_submodule); emit tags its new nodes with meta["peftc"] = {"method": tag}
    peft_keys:   (module path, site weights) -> iterable of (key after "base_model.model.<path>.", tensor): PEFT's
                 checkpoint names
    route_values: {route key kind: fn(site weights or None, key, like, gm) -> tensor}, the value of a route input
                 (passes.route; key = (kind, module path, ...)) for one adapter: its weights at the site, or None
                 where the adapter is of another method or does not adapt the site (the value must then change
                 nothing); dims whose size differs between adapters are made dynamic by the router
    site_kinds:  the site kinds (passes.match) it adapts, e.g. ("linear", "conv1d")

    Capabilities (None: the method does not have it; what needs it is refused with an error naming the method and
    the capability, `require`):
    check:       (spec, sites, chosen paths, loading) -> None; the method's own refusals before weights are made
    resolve:     (spec, sites, model) -> the spec with its graph-dependent defaults made explicit (IA3's default
                 targets and feedforward modules, found from the sites' roles), before its targets are resolved (LoRA's
                 target syntax on spec.targets; peftc.targets); the adapter keeps the returned spec, so its checkpoint
                 names what was chosen. None: used as given
    fold:        "merge". (adapter, site, weight) -> the delta merge() adds to the site's weight, in the weight's
                 layout
    fold_bias:   (adapter, site, the layer's bias or None) -> the delta merge() adds to the site's bias (made
                 where the layer has none), or None where the adapter leaves the bias alone
    forms:       "mixed" in it: the per-row form (a mixed batch with an adapter of a method without it is refused)
    mixed_refusal: (adapter) -> why this adapter cannot join a mixed batch, or None
    pad, empty:  "capacity". pad(site weights, capacity) -> the same weights allocated at the capacity's size (new
                 Parameters, same values, same requires_grad); empty(site weights, capacity) -> frozen weights of
                 that size that change nothing (a slot the adapter left). A capacity's lanes hold them, so the
                 method's adapters come and go as data; a method without them still joins a module with a capacity
                 (it takes a slot), but adding or deleting one rebuilds the graph.
    room:        (adapter, capacity) -> why the adapter does not fit the capacity (e.g. its rank), or None
    fits_graph:  (gm, adapter) -> whether the plain-form graph `gm` already serves the adapter as data (a
                 capacity then adds it without a rebuild)
    param_count: "count". (spec, site) -> the trainable parameters the method adds at a site (inspection, the
                 README's tables); without it inspection builds the weights and counts them
    """

    spec: type
    peft_type: str
    from_config: Callable[[dict, str], AdapterSpec]
    to_config: Callable[..., dict]
    build: Optional[Callable[[Any, Any, torch.Tensor], Any]] = None
    rewrite: Optional[Callable[..., int]] = None
    peft_keys: Optional[Callable[[str, Any], Iterable[tuple[str, torch.Tensor]]]] = None
    route_values: dict = field(default_factory=dict, hash=False, compare=False)
    site_kinds: tuple[str, ...] = ("linear", "conv1d")
    check: Optional[Callable[[Any, dict, list, bool], None]] = None
    resolve: Optional[Callable[[Any, dict, Any], AdapterSpec]] = None
    fold: Optional[Callable[[Any, Any, torch.Tensor], torch.Tensor]] = None
    fold_bias: Optional[Callable[[Any, Any, Optional[torch.Tensor]], Optional[torch.Tensor]]] = None
    forms: tuple[str, ...] = ("single", "mixed")
    mixed_refusal: Optional[Callable[[Any], Optional[str]]] = None
    pad: Optional[Callable[[Any, Any], Any]] = None
    empty: Optional[Callable[[Any, Any], Any]] = None
    room: Optional[Callable[[Any, Any], Optional[str]]] = None
    fits_graph: Optional[Callable[[Any, Any], bool]] = None
    param_count: Optional[Callable[[Any, Any], int]] = None

    def __post_init__(self):
        if not (isinstance(self.spec, type) and issubclass(self.spec, AdapterSpec)):
            raise SpecError(f"Method.spec must be a subclass of peftc.AdapterSpec, got {self.spec!r}")
        if not isinstance(self.peft_type, str) or not self.peft_type:
            raise SpecError(f"Method.peft_type must be a non-empty string, got {self.peft_type!r}")

    @property
    def name(self) -> str:
        return self.spec.__name__

    @property
    def tag(self) -> str:
        """The name its rewrite's nodes carry in meta["peftc"]["method"] (and its pass's name)."""
        return self.name.lower()

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What the method declares beyond its core: "compile" (build and rewrite), "merge", "mixed", "capacity",
        "count"."""
        have = {"compile": self.build is not None and self.rewrite is not None, "merge": self.fold is not None,
                "mixed": "mixed" in self.forms, "capacity": self.pad is not None and self.empty is not None,
                "count": self.param_count is not None}
        return tuple(k for k, on in have.items() if on)

    def require(self, capability: str, doing: str, error: type = SpecError) -> None:
        """Raise `error` naming the method and the capability it lacks for `doing`."""
        if capability not in self.capabilities:
            fields = CAPABILITY_FIELDS[capability]
            able = [m.name for m in METHODS.values() if capability in m.capabilities]
            raise error(f"{doing}: method {self.name} does not declare the {capability!r} capability (Method "
                        f"{fields}); methods that do: {able}")


CAPABILITY_FIELDS = {"compile": "build= and rewrite=", "merge": "fold=", "mixed": "forms=(..., 'mixed')",
                     "capacity": "pad= and empty=", "count": "param_count="}


METHODS: dict[type, Method] = {}


def register_method(method: Method) -> Method:
    """Add `method` to the table (returns it). A spec class or peft_type registered already is refused."""
    if not isinstance(method, Method):
        raise SpecError(f"register_method takes a peftc.Method, got {type(method).__name__}")
    if method.spec in METHODS:
        raise SpecError(f"method {method.name} is registered already (peft_type {METHODS[method.spec].peft_type!r}); "
                        "register each spec class once")
    clash = [m for m in METHODS.values() if m.peft_type.upper() == method.peft_type.upper()]
    if clash:
        raise SpecError(f"peft_type {method.peft_type!r} is registered already by {clash[0].name}; "
                        "give the new method its own peft_type")
    taken = sorted(set(method.route_values) & set(route_kinds()))
    if taken:
        raise SpecError(f"route kind(s) {taken} of {method.name} are registered already; name its route keys "
                        "after the method")
    for kind, fn in method.route_values.items():
        add_route_value(kind, fn, owner=method.spec)
    METHODS[method.spec] = method
    return method


def unregister_method(spec: type) -> None:
    """Remove a registered method and its route values (for tests and notebooks that redefine one)."""
    method = METHODS.pop(spec, None)
    for kind in method.route_values if method is not None else ():
        remove_route_value(kind)


def registered() -> list[str]:
    return [f"{m.name} ({m.peft_type})" for m in METHODS.values()]


def method_of(spec: Any) -> Method:
    """The Method of a spec (or spec class); an unregistered one is an error listing the registered methods."""
    cls = spec if isinstance(spec, type) else type(spec)
    m = METHODS.get(cls)
    if m is None:
        raise SpecError(f"{cls.__name__} is not a registered method; registered: {registered()}; "
                        "register it with peftc.register_method(peftc.Method(...))")
    return m


def method_tagged(tag: str) -> Method | None:
    """The registered method whose rewrite tags its nodes `tag` (Method.tag), or None."""
    return next((m for m in METHODS.values() if m.tag == tag), None)


def method_for_peft_type(ptype: Any, source: str) -> Method:
    name = str(getattr(ptype, "value", ptype)).upper()     # PEFT's to_dict() gives a PeftType enum
    for m in METHODS.values():
        if m.peft_type.upper() == name:
            return m
    shown = name if hasattr(ptype, "value") else ptype      # the enum's name, as adapter_config.json writes it
    raise SpecError(f"{source}: peft_type={shown!r} is not supported yet; supported: "
                    f"{[m.peft_type for m in METHODS.values()]}")


def spec_from_config(cfg: Any, *, source: str = "adapter_config.json") -> AdapterSpec:
    """Read a spec from a dict in adapter_config.json form (as PEFT writes it), through its method's from_config."""
    if isinstance(cfg, AdapterSpec):
        return cfg
    if not isinstance(cfg, dict):
        raise SpecError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    ptype = cfg.get("peft_type")
    if ptype is None:
        raise SpecError(f"{source}: missing 'peft_type'; expected one of {[m.peft_type for m in METHODS.values()]}")
    return method_for_peft_type(ptype, source).from_config(cfg, source)


def spec_to_config(spec: AdapterSpec, **context) -> dict:
    """adapter_config.json for `spec` (see Method.to_config for the context keys)."""
    return method_of(spec).to_config(spec, **context)
