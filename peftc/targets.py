"""Resolve a spec's targets (PEFT's forms) to matched sites, with errors that name the closest candidates."""
from __future__ import annotations

import difflib
import re
from typing import Iterable, Sequence

from torch import nn

from .passes.match import Site
from .errors import SpecError, TargetNotFound
from .spec import SEQ_CLS_HEADS


def name_matches(path: str, name: str) -> bool:
    """PEFT's rule: a name matches a module path exactly or as its trailing dotted components."""
    return path == name or path.endswith("." + name)


def _closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    cands = sorted(set(candidates))
    tails = {c.rsplit(".", 1)[-1]: c for c in cands}
    close = difflib.get_close_matches(name, list(tails), n=n, cutoff=0.5)
    out = [f"{t} ({tails[t]}, ...)" for t in close]
    if not out:
        out = difflib.get_close_matches(name, cands, n=n, cutoff=0.4)
    return out


def _linear_names(sites: dict[str, Site]) -> str:
    return ", ".join(dict.fromkeys(s.name for s in sites.values()))


def output_head_paths(model: nn.Module | None, graph_heads: set[str], task_type: str | None) -> set[str]:
    """The output head that "all-linear" leaves out, as PEFT decides it for Hugging Face models: the output
    embeddings (lm_head) if the model has them, else with task_type="SEQ_CLS" the classification head (classifier,
    score). For any other module: the graph's final linear layer(s)."""
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return set(graph_heads)
    head = get_out()
    if head is not None:
        return {n for n, m in model.named_modules() if m is head}
    if task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEADS:
            if isinstance(getattr(model, name, None), nn.Module):
                return {name}
    return set()


def resolve_targets(targets, sites: dict[str, Site], heads: set[str], saved: Sequence[str] = ()) -> list[str]:
    """Module paths of the sites selected by `targets`, in graph order ("all-linear" leaves out `heads` and the
    modules_to_save in `saved`)."""
    if not sites:
        raise TargetNotFound("the traced graph has no linear layer (aten.linear, or GPT-2 Conv1D addmm) to adapt")
    if targets is None:
        chosen = [f for f, s in sites.items() if s.roles & {"q", "v"}]
        if not chosen:
            raise TargetNotFound(
                "targets=None selects the query and value projections found from the attention pattern, but the graph "
                f"has no scaled_dot_product_attention fed by linear layers; pass targets explicitly. "
                f"All linear names: {_linear_names(sites)}"
            )
        return chosen
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return [f for f in sites
                    if f not in heads and not any(f == m or f.startswith(m + ".") for m in saved)]
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise SpecError(f"targets={targets!r} is not a valid regular expression ({e})") from None
        chosen = [f for f in sites if pattern.fullmatch(f)]
        if not chosen:
            raise TargetNotFound(
                f"targets regex {targets!r} fully matched no linear layer path; closest: "
                f"{', '.join(_closest(targets, sites)) or 'none'}; all linear names: {_linear_names(sites)}. "
                "A string target is a regex that must match the whole path, e.g. r'.*\\.(q_proj|v_proj)'"
            )
        return chosen
    missing = [t for t in targets if not any(name_matches(f, t) for f in sites)]
    if missing:
        hints = "; ".join(f"{t!r}: closest {', '.join(_closest(t, sites)) or 'none'}" for t in missing)
        raise TargetNotFound(
            f"targets {missing!r} matched no linear layer ({hints}); all linear names: {_linear_names(sites)}"
        )
    return [f for f in sites if any(name_matches(f, t) for t in targets)]


def check_rank(r: int, sites: dict[str, Site], chosen: Sequence[str]) -> None:
    for f in chosen:
        s = sites[f]
        if r > min(s.in_features, s.out_features):
            raise SpecError(
                f"LoRA rank r={r} is larger than min(in, out)={min(s.in_features, s.out_features)} of layer {f} "
                f"(in={s.in_features}, out={s.out_features}); use r <= {min(s.in_features, s.out_features)} or leave "
                "that layer out of targets"
            )


def peft_target_modules(targets, sites: dict[str, Site], chosen: Sequence[str]):
    """target_modules for adapter_config.json that makes PEFT select exactly `chosen`: the user's own form when it
    is PEFT-compatible, else the shortest unambiguous names."""
    chosen_set = set(chosen)
    if isinstance(targets, str) and targets.lower() != "all-linear":
        return targets
    if isinstance(targets, (tuple, list)):
        return sorted(targets)
    tails = sorted({f.rsplit(".", 1)[-1] for f in chosen})
    if {f for f in sites if any(name_matches(f, t) for t in tails)} == chosen_set:
        return tails
    return sorted(chosen)
