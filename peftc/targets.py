"""Resolve a spec's targets (PEFT's forms) to matched sites, with errors that name the closest candidates."""
from __future__ import annotations

import difflib
import re
from dataclasses import replace
from typing import Iterable, Sequence

from torch import nn

from .passes.match import Site
from .errors import SpecError, TargetNotFound
from .spec import SEQ_CLS_HEADS, pattern_matches


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
    """The layer names, linear ones first: "q_proj, ..., lm_head; other layers: embed_tokens (embedding)"."""
    linear = ", ".join(dict.fromkeys(s.name for s in sites.values() if s.linear_like))
    other = ", ".join(dict.fromkeys(f"{s.name} ({s.kind})" for s in sites.values() if not s.linear_like))
    return linear + (f"; other layers: {other}" if other else "")


def output_head_paths(model: nn.Module | None, task_type: str | None) -> set[str]:
    """The output head that "all-linear" leaves out, as PEFT decides it: for a Hugging Face model the output
    embeddings (lm_head) if it has them, else with task_type="SEQ_CLS" the classification head (classifier, score).
    Any other module keeps every linear layer, its final one included (PEFT asks only get_output_embeddings)."""
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out):
        return set()
    head = get_out()
    if head is not None:
        return {n for n, m in model.named_modules() if m is head}
    if task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEADS:
            if isinstance(getattr(model, name, None), nn.Module):
                return {name}
    return set()


MHA = "MultiheadAttention"


def mha_out_projs(sites: dict[str, Site], chosen: Sequence[str]) -> set[str]:
    """The out_proj sites that come with each chosen nn.MultiheadAttention (PEFT adapts in_proj and out_proj
    together when the attention module is targeted)."""
    return {f"{f}.out_proj" for f in chosen if sites[f].module_type == MHA and f"{f}.out_proj" in sites}


def with_out_projs(sites: dict[str, Site], chosen: Sequence[str]) -> list[str]:
    """`chosen` and the out_proj of each nn.MultiheadAttention in it, in graph order."""
    keep = set(chosen) | mha_out_projs(sites, chosen)
    return [f for f in sites if f in keep]


def site_for(sites: dict[str, Site], path: str, chosen: Sequence[str]) -> Site:
    """The site as an adapter over `chosen` sees it: an nn.MultiheadAttention's out_proj takes that module's r and
    alpha (Site.pattern_path) only when it comes with it; targeted on its own it keeps its own path."""
    site = sites[path]
    return site if not site.parent or site.parent in chosen else replace(site, parent="")


def module_sites(sites: dict[str, Site]) -> dict[str, Site]:
    """The sites module targets choose from: all but parameter sites (those only target_parameters choose)."""
    return {f: s for f, s in sites.items() if not s.param}


def resolve_targets(targets, sites: dict[str, Site], heads: set[str], saved: Sequence[str] = ()) -> list[str]:
    """Module paths of the sites selected by `targets`, with each chosen attention module's out_proj."""
    sites = module_sites(sites)
    return with_out_projs(sites, _resolve_targets(targets, sites, heads, saved))


def _resolve_targets(targets, sites: dict[str, Site], heads: set[str], saved: Sequence[str] = ()) -> list[str]:
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
            # nn.MultiheadAttention is left out with its out_proj: PEFT skips the attention module (not an
            # nn.Linear) and wraps its out_proj as a linear layer whose LoRA never runs (the attention's forward
            # reads out_proj.weight itself), so neither has an effect there
            mha = [f for f, site in sites.items() if site.module_type == MHA]
            skip = set(heads) | set(mha) | mha_out_projs(sites, mha)
            return [f for f, site in sites.items() if site.linear_like   # as PEFT: nn.Linear and Conv1D only
                    and f not in skip and not any(f == m or f.startswith(m + ".") for m in saved)]
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


def check_rank(spec, sites: dict[str, Site], chosen: Sequence[str]) -> None:
    """Each chosen site's rank (spec.rank_at: r, or its rank_pattern entry) fits its layer (not checked for
    parameter targets, which PEFT takes at any rank)."""
    for f in chosen:
        s = site_for(sites, f, chosen)
        if s.key:
            continue
        r = spec.rank_at(s.pattern_path)
        groups = s.params.get("groups", 1) if s.kind == "conv" else 1
        if r % groups:
            raise SpecError(f"LoRA rank r={r} at {f}, a convolution with groups={groups}: r must be a multiple of "
                            f"groups (as in PEFT); use r={groups * max(1, r // groups)} or leave the layer out")
        if s.linear_like and r > min(s.in_features, s.out_features):
            raise SpecError(
                f"LoRA rank r={r} is larger than min(in, out)={min(s.in_features, s.out_features)} of layer {f} "
                f"(in={s.in_features}, out={s.out_features}); use r <= {min(s.in_features, s.out_features)} or leave "
                "that layer out of targets"
            )


def peft_target_modules(targets, sites: dict[str, Site], chosen: Sequence[str]):
    """target_modules for adapter_config.json that makes PEFT select exactly `chosen`: the user's own form when it
    is PEFT-compatible, else the shortest unambiguous names."""
    sites = module_sites(sites)
    chosen = [f for f in chosen if f not in mha_out_projs(sites, chosen)]   # PEFT adds these itself
    chosen_set = set(chosen)
    if isinstance(targets, str) and targets.lower() != "all-linear":
        return targets
    if isinstance(targets, (tuple, list)):
        return sorted(targets)
    tails = sorted({f.rsplit(".", 1)[-1] for f in chosen})
    if {f for f in sites if any(name_matches(f, t) for t in tails)} == chosen_set:
        return tails
    return sorted(chosen)


def _excluded(path: str, exclude) -> bool:
    """PEFT's exclude_modules: a regex string must match the whole path; names match it exactly or as its tail."""
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return any(name_matches(path, e) for e in exclude)


def _layer_index(path: str, layers_pattern) -> int | None:
    """PEFT's rule: the first numbered path component (after one of `layers_pattern`, when given)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        m = None
        for pattern in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if m is not None:
                break
    return int(m["idx"]) if m else None


def select_layers(spec, chosen: list[str], sites: dict[str, Site], param_paths: Sequence[str] = ()) -> list[str]:
    """`chosen` less the spec's exclude_modules and the layers outside layers_to_transform (which, as in PEFT,
    spares a target given as its exact path). An nn.MultiheadAttention's out_proj follows its attention module:
    left out with it, kept with it (PEFT builds both in one layer). Errors name the option that left nothing.
    `param_paths`: the parameter names target_parameters chose (PEFT applies neither option to them, but their
    rank / alpha patterns match them)."""
    added = mha_out_projs(sites, chosen)
    out = [p for p in chosen if p not in added]
    exclude = getattr(spec, "exclude_modules", None)
    if exclude and out:
        kept = [p for p in out if not _excluded(p, exclude)]
        if not kept:
            raise TargetNotFound(f"exclude_modules={exclude!r} excludes every target ({len(out)} layers); "
                                 "narrow exclude_modules or widen targets")
        out = kept
    layers = getattr(spec, "layers_to_transform", None)
    if layers is not None and out:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        exact = set(spec.targets or ())
        kept = [p for p in out if p in exact or _layer_index(p, spec.layers_pattern) in wanted]
        if not kept:
            found = sorted({i for i in (_layer_index(p, spec.layers_pattern) for p in out) if i is not None})
            raise TargetNotFound(
                f"layers_to_transform={layers!r} (layers_pattern={spec.layers_pattern!r}) selects none of the "
                f"{len(out)} targets; their layer indices are {found or 'not found (check layers_pattern)'}, "
                f"e.g. {out[0]}")
        out = kept
    out = with_out_projs(sites, out)
    paths = {site_for(sites, p, out).pattern_path for p in out} | set(param_paths)
    for option in ("rank_pattern", "alpha_pattern"):
        for key, _ in getattr(spec, option, ()):
            if not any(pattern_matches(key, p) for p in paths):
                raise SpecError(f"{option} key {key!r} matches none of the adapted layers (e.g. "
                                f"{(out or list(param_paths) or ['none'])[0]}); a key is "
                                "a regex matched against the end of a module path, e.g. 'q_proj' or "
                                r"'layers\.0\.self_attn\.q_proj' (an nn.MultiheadAttention's out_proj takes its "
                                "attention module's entry: key the attention module)")
    return out
