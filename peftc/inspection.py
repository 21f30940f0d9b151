"""`peftc inspect`: which sites (linear, Conv1D, embedding, convolution layers) a spec would adapt, found in the traced
graph, without compiling anything."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import SpecError, TargetNotFound
from .passes.match import Site, find_sites
from .passes.modules_to_save import resolve_modules_to_save
from .methods import method_of
from .spec import SEQ_CLS_HEADS, LoRA
from .targets import check_rank, name_matches, output_head_paths, resolve_targets, select_layers, site_for
from .trace import trace

log = logging.getLogger(__name__)


@dataclass
class SitePlan:
    """What compile(model, spec) would adapt: the chosen sites, their LoRA sizes, and the targets that matched
    nothing (each with the TargetNotFound message compile would raise)."""

    model_class: str
    spec: LoRA
    sites: dict[str, Site]                               # every adapter site in the graph, in graph order
    chosen: list[str] = field(default_factory=list)      # module paths that would be adapted
    unmatched: list[str] = field(default_factory=list)   # one message per target that matched nothing
    problems: list[str] = field(default_factory=list)    # other reasons compile would refuse (rank too large)
    saved: dict[str, int] = field(default_factory=dict)  # modules_to_save path -> parameters (trained in full)
    all_params: int = 0

    def lora_params(self, fqn: str) -> int:
        """The adapter's trainable parameters at site `fqn`, as its method counts them."""
        return method_of(self.spec).param_count(self.spec, site_for(self.sites, fqn, self.chosen))

    @property
    def trainable(self) -> int:
        return sum(self.lora_params(f) for f in self.chosen) + sum(self.saved.values())

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.problems and bool(self.chosen)


def plan_sites(model: nn.Module, spec: LoRA, *, example_inputs: Any = None) -> SitePlan:
    """Trace `model` (not changed) and resolve `spec.targets` against the sites found in the graph.

    Unlike compile, a list of names is resolved name by name, so one name that matches nothing does not hide what
    the others match."""
    gm = trace(model, example_inputs).gm
    sites = find_sites(gm)
    log.debug("%s: %d sites, %d with an attention role", type(model).__name__, len(sites),
              sum(bool(s.roles) for s in sites.values()))
    heads = output_head_paths(model, spec.task_type)
    plan = SitePlan(type(model).__name__, spec, sites,
                    all_params=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
    optional = SEQ_CLS_HEADS if spec.task_type == "SEQ_CLS" else ()
    try:
        saved = resolve_modules_to_save(gm, spec.modules_to_save, optional)
    except SpecError as e:
        plan.problems.append(str(e))
        saved = []
    plan.saved = {p: sum(t.numel() for t in model.get_submodule(p).parameters()) for p in saved}
    targets = spec.targets
    if isinstance(targets, tuple):
        found = [t for t in targets if any(name_matches(f, t) for f in sites)]
        for t in targets:
            if t not in found:
                plan.unmatched.append(_message(lambda: resolve_targets((t,), sites, heads)))
        targets = tuple(found) or None
        if not found:
            return plan
    try:
        plan.chosen = resolve_targets(targets, sites, heads, saved)
        plan.chosen = select_layers(spec, plan.chosen, sites)
    except (TargetNotFound, SpecError) as e:
        plan.unmatched.append(str(e))
        return plan
    try:
        check_rank(spec, sites, plan.chosen)
    except SpecError as e:
        plan.problems.append(str(e))
    return plan


def _message(fn) -> str:
    try:
        fn()
    except TargetNotFound as e:
        return str(e)
    return ""


def format_plan(plan: SitePlan) -> str:
    """The plan as a text table, then totals, then what matched nothing."""
    spec = plan.spec
    name = "DoRA" if getattr(spec, "use_dora", False) else method_of(spec).name
    head = ("module", "role", "type", "in", "out", f"{name} params (r={spec.r})")
    rows = []
    for f in plan.chosen:
        s = plan.sites[f]
        rows.append((f, ",".join(r for r in "qkvo" if r in s.roles) or "-", s.module_type or s.kind,
                     str(s.in_features), str(s.out_features), f"{plan.lora_params(f):,}"))
    lines = [f"{plan.model_class}: {len(plan.sites)} sites in the graph; targets={_targets_str(spec.targets)}"]
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


def _targets_str(targets) -> str:
    if targets is None:
        return "None (query and value projections from the attention pattern)"
    if isinstance(targets, str):
        return repr(targets)
    return ",".join(targets)
