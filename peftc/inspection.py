"""`peftc inspect`: which sites (linear, Conv1D, embedding, convolution layers) a spec of any registered method would
adapt, found in the traced graph, with the parameters its method adds there, without compiling anything."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .build import choose_sites, count_parameters, resolved
from .errors import SpecError, TargetNotFound
from .quant import logical_numel
from .methods import method_of
from .passes.match import Site, find_sites
from .spec import AdapterSpec
from .targets import name_matches
from .trace import trace

log = logging.getLogger(__name__)


@dataclass
class SitePlan:
    """What compile(model, spec) would adapt: the chosen sites, the parameters the spec's method adds at each, and
    the targets that matched nothing (each with the TargetNotFound message compile would raise)."""

    model_class: str
    spec: AdapterSpec
    sites: dict[str, Site]                               # every adapter site in the graph, in graph order
    chosen: list[str] = field(default_factory=list)      # module paths that would be adapted
    unmatched: list[str] = field(default_factory=list)   # one message per target that matched nothing
    problems: list[str] = field(default_factory=list)    # other reasons compile would refuse (rank too large)
    saved: dict[str, int] = field(default_factory=dict)  # modules_to_save path -> parameters (trained in full)
    counts: dict[str, int] = field(default_factory=dict)  # adapted path -> the parameters the method adds there
    all_params: int = 0

    def params(self, fqn: str) -> int:
        """The adapter's trainable parameters at site `fqn`, as its method counts them."""
        return self.counts[fqn]

    @property
    def trainable(self) -> int:
        return sum(self.params(f) for f in self.chosen) + sum(self.saved.values())

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.problems and bool(self.chosen)


def plan_sites(model: nn.Module, spec: AdapterSpec, *, example_inputs: Any = None) -> SitePlan:
    """Trace `model` (not changed) and resolve `spec` (any registered method's) against the sites found in the graph.

    Unlike compile, a list of names in LoRA's target syntax is resolved name by name, so one name that matches
    nothing does not hide what the others match."""
    method = method_of(spec)
    gm = trace(model, example_inputs).gm
    sites = find_sites(gm)
    log.debug("%s: %d sites, %d with an attention role", type(model).__name__, len(sites),
              sum(bool(s.roles) for s in sites.values()))
    spec = resolved(spec, sites, model)
    plan = SitePlan(type(model).__name__, spec, sites,
                    all_params=sum(logical_numel(p) for p in {id(p): p for p in model.parameters()}.values()))
    targets = getattr(spec, "targets", None)
    if isinstance(targets, tuple):
        found = [t for t in targets if any(name_matches(f, t) for f in sites)]
        for t in targets:
            if t not in found:
                plan.unmatched.append(_message(lambda: choose_sites(gm, sites, model, replace(spec, targets=(t,)))))
        if not found:
            return plan
        spec = replace(spec, targets=tuple(found))
    try:
        plan.chosen, saved, plan.sites, _ = choose_sites(gm, sites, model, spec)
    except TargetNotFound as e:
        plan.unmatched.append(str(e))
        return plan
    except SpecError as e:
        plan.problems.append(str(e))
        return plan
    plan.saved = {p: sum(t.numel() for t in model.get_submodule(p).parameters()) for p in saved}
    try:
        if method.check is not None:
            method.check(spec, sites, plan.chosen, False)
    except SpecError as e:
        plan.problems.append(str(e))
    try:
        plan.counts = count_parameters(gm, plan.sites, spec, plan.chosen)
    except SpecError as e:
        plan.problems.append(str(e))
        plan.chosen = []
    return plan


def _message(fn) -> str:
    try:
        fn()
    except TargetNotFound as e:
        return str(e)
    except SpecError:
        pass
    return ""


def format_plan(plan: SitePlan) -> str:
    """The plan as a text table, then totals, then what matched nothing."""
    spec = plan.spec
    name = "DoRA" if getattr(spec, "use_dora", False) else method_of(spec).name
    head = ("module", "role", "type", "in", "out", f"{name} params" + (f" (r={spec.r})" if hasattr(spec, "r") else ""))
    rows = []
    for f in plan.chosen:
        s = plan.sites[f]
        rows.append((f, ",".join(r for r in "qkvo" if r in s.roles) or "-", s.module_type or s.kind,
                     str(s.in_features), str(s.out_features), f"{plan.params(f):,}"))
    lines = [f"{plan.model_class}: {len(plan.sites)} sites in the graph; {method_of(spec).name} "
             f"targets={_targets_str(getattr(spec, 'targets', None), plan)}"]
    if rows:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        right = {3, 4, 5}
        fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        lines += [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)]
        pct = 100 * plan.trainable / plan.all_params if plan.all_params else 0.0
        lines.append(f"total: {len(plan.chosen)} site(s) adapted, {plan.trainable:,} trainable parameters "
                     f"({pct:.2f}% of the model's {plan.all_params:,})")
        rest = [f for f in plan.sites if f not in plan.chosen]
        if rest:
            names = ", ".join(dict.fromkeys(plan.sites[f].name for f in rest))
            lines.append(f"not adapted: {len(rest)} site(s) ({names})")
    else:
        lines.append("no site would be adapted")
    if plan.saved:
        lines.append("trained in full (modules_to_save): "
                     + ", ".join(f"{p} ({n:,} parameters)" for p, n in plan.saved.items()))
    lines += [f"matched nothing: {m}" for m in plan.unmatched]
    lines += [f"refused: {m}" for m in plan.problems]
    return "\n".join(lines)


def _targets_str(targets, plan: SitePlan) -> str:
    if targets is None:
        return "None (query and value projections from the attention pattern)"
    if isinstance(targets, str):
        return repr(targets)
    return ",".join(targets)
