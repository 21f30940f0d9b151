"""The method registry: one typed table from a method's spec class to what peftc needs to know of it.

    METHODS: dict[type[AdapterSpec], Method]

A method is a frozen spec dataclass, one pass file under passes/ and one `register_method(Method(...))` there
(built-in methods: passes/lora.py); a user's own method registers the same way from outside the package. Everything
that reads or writes adapter_config.json, merges or counts parameters looks the method up here, so adding one
changes no other file. A failed look-up lists what is registered; registering a spec class or a peft_type twice is
an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from .errors import SpecError
from .passes.route import add_route_value, remove_route_value, route_kinds
from .spec import AdapterSpec


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype fold rules, merges and weight combinations compute in: float32 for fp16 / bf16 / float32 tensors,
    float64 for float64 ones (never narrower than their inputs)."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


@dataclass(frozen=True)
class Method:
    """One method's contract.

    spec:        its frozen spec dataclass (a subclass of AdapterSpec)
    peft_type:   the name in adapter_config.json's "peft_type" (PEFT's, for methods PEFT has)
    from_config: (adapter_config dict, source for errors) -> spec; refuses keys it does not honour
    to_config:   (spec, target_modules=..., base_model_name_or_path=..., task_type=..., modules_to_save=...) -> dict
    site_kinds:  the site kinds (passes.match) it adapts, e.g. ("linear", "conv1d")
    fold:        (adapter, site, weight) -> the delta merge() adds to the site's weight, in the weight's layout; None
                 when the method is not a weight update (merge() then refuses it, naming the method)
    fold_bias:   (adapter, site, the layer's bias or None) -> the delta merge() adds to the site's bias (made
                 where the layer has none), or None where the adapter leaves the bias alone
    param_count: (spec, site) -> the trainable parameters the method adds at a site (inspection, the README's
                 tables); None: counted from the built adapter only
    resolve:     (spec, sites, model) -> the spec with its graph-dependent defaults made explicit (IA3's default
                 targets and feedforward modules, found from the sites' roles), before its targets are resolved;
                 the adapter keeps the returned spec, so its checkpoint names what was chosen. None: used as given

    What compiling needs (a method without build and rewrite registers its config mapping and fold rule only):
    check:       (spec, sites, chosen paths, loading) -> None; the method's own refusals before weights are made
    build:       (spec, site, the site's weight) -> nn.Module, the adapter's weights at one site (its trainable
                 Parameters; stored as adapter.sites[site_key(path)])
    rewrite:     (gm, sites=, store=, form=) -> rewrite count: the method's pass, inserting every adapter of this
                 method in the store in routing form "single" (the call's adapter's tensors come in as route
                 inputs, passes.route) or "mixed" (one adapter per row)
    forms:       the routing forms its rewrite serves (a mixed batch with an adapter of a method without "mixed"
                 is refused, naming it)
    peft_keys:   (module path, site weights) -> iterable of (key after "base_model.model.<path>.", tensor): PEFT's
                 checkpoint names
    base_output: (a node its rewrite made with meta["peftc"]["role"] == "out") -> the site's own output node, what
                 merge() reads instead once the weights are folded
    mixed_refusal: (adapter) -> why this adapter cannot join a mixed batch, or None
    fits_graph:  (store, adapter) -> whether the current graph already serves the adapter (a declared capacity
                 then adds it as data, without a rebuild)
    route_values: {route key kind: fn(store, adapter name, key, like, gm) -> (tensor, dynamic dims)}, how its
                 rewrite's route inputs are found for one adapter (passes.route); registered with the method
    """

    spec: type
    peft_type: str
    from_config: Callable[[dict, str], AdapterSpec]
    to_config: Callable[..., dict]
    site_kinds: tuple[str, ...] = ("linear", "conv1d")
    fold: Optional[Callable[[Any, Any, torch.Tensor], torch.Tensor]] = None
    fold_bias: Optional[Callable[[Any, Any, Optional[torch.Tensor]], Optional[torch.Tensor]]] = None
    param_count: Optional[Callable[[Any, Any], int]] = None
    resolve: Optional[Callable[[Any, dict, Any], AdapterSpec]] = None
    check: Optional[Callable[[Any, dict, list, bool], None]] = None
    build: Optional[Callable[[Any, Any, torch.Tensor], Any]] = None
    rewrite: Optional[Callable[..., int]] = None
    forms: tuple[str, ...] = ("single", "mixed")
    peft_keys: Optional[Callable[[str, Any], Iterable[tuple[str, torch.Tensor]]]] = None
    base_output: Optional[Callable[[Any], Any]] = None
    mixed_refusal: Optional[Callable[[Any], Optional[str]]] = None
    fits_graph: Optional[Callable[[Any, Any], bool]] = None
    route_values: dict = field(default_factory=dict, hash=False, compare=False)

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
        add_route_value(kind, fn)
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
    raise SpecError(f"{source}: peft_type={ptype!r} is not supported yet; supported: "
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
