"""Weighted combinations of LoRA adapters into a new adapter: PEFT's add_weighted_adapter ("linear", "cat", "svd").

Per site, with adapter i's weights A_i [r_i, in], B_i [out, r_i], scale s_i and user weight w_i (c_i = w_i s_i):

    linear:  A = sum_i sign(c_i) sqrt|c_i| A_i,   B = sum_i sqrt|c_i| B_i        (equal ranks; r = r_i)
    cat:     A = concat_rows(c_i A_i),            B = concat_cols(B_i)           (exact; r = sum_i r_i)
    svd:     U S Vh = svd(sum_i c_i B_i A_i),     B = U[:, :r] S[:r], A = Vh[:r] (r = svd_rank or max_i r_i)

As in PEFT, the new adapter has lora_alpha = r (scale 1; sqrt(r) when the first adapter uses rsLoRA, which PEFT
keeps), the other settings of the first adapter, the union of the adapters' sites, and frozen weights. A site that
an adapter does not target gets nothing from it. The store is untouched until the new adapter is complete.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, NamedTuple

import torch

from .errors import InputError, SpecError, UnknownAdapter
from .methods import work_dtype
from .passes.lora.spec import LoRA
from .build import check_adapter_name
from .passes.lora.weights import LoraWeights
from .store import Adapter, AdapterStore, site_key

log = logging.getLogger(__name__)


class Part(NamedTuple):
    """One adapter's share of one site: its weights and the user's weight for it."""

    lora: LoraWeights
    weight: float


class Options(NamedTuple):
    svd_clamp: float | None
    svd_full_matrices: bool
    svd_driver: str | None


# combination_type -> (new rank from the adapters' ranks and svd_rank, per-site (A [r, in], B [out, r]) builder)
Combine = Callable[[list[Part], int, Options], tuple[torch.Tensor, torch.Tensor]]
COMBINATIONS: dict[str, tuple[Callable[[list[int], int | None], int], Combine]] = {}
NOT_YET = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
           "magnitude_prune_svd")  # PEFT's other combination types


def _combination(name: str, rank: Callable[[list[int], int | None], int]):
    def register(fn: Combine) -> Combine:
        if name in COMBINATIONS:
            raise ValueError(f"combination_type {name!r} is registered twice")
        COMBINATIONS[name] = (rank, fn)
        return fn
    return register


def _equal_ranks(ranks: list[int], svd_rank: int | None) -> int:
    if len(set(ranks)) != 1:
        raise SpecError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; use "
                        "combination_type='cat' (exact, rank = sum) or 'svd' (rank = svd_rank)")
    return ranks[0]


@_combination("linear", _equal_ranks)
def _linear(parts: list[Part], r: int, opt: Options) -> tuple[torch.Tensor, torch.Tensor]:
    # A += sign(c) sqrt|c| A_i, B += sqrt|c| B_i  (the sign goes on one side only, so it is not squared away)
    dt = work_dtype(parts[0].lora.A_r.dtype)
    A = torch.zeros(parts[0].lora.A_r.shape, dtype=dt, device=parts[0].lora.A_r.device)    # (r, in)
    B = torch.zeros(parts[0].lora.B_r.shape, dtype=dt, device=parts[0].lora.B_r.device)    # (out, r)
    for p in parts:
        c = p.weight * p.lora.scale
        root = math.sqrt(abs(c))
        A += (root if c >= 0 else -root) * p.lora.A_r.to(dt)
        B += root * p.lora.B_r.to(dt)
    return A, B


@_combination("cat", lambda ranks, svd_rank: sum(ranks))
def _cat(parts: list[Part], r: int, opt: Options) -> tuple[torch.Tensor, torch.Tensor]:
    # the present adapters' ranks side by side, from rank 0 on; rows/columns of absent adapters stay zero at the end
    dt = work_dtype(parts[0].lora.A_r.dtype)
    A = torch.cat([p.weight * p.lora.scale * p.lora.A_r.to(dt) for p in parts], dim=0)  # (sum r_i, in)
    B = torch.cat([p.lora.B_r.to(dt) for p in parts], dim=1)                             # (out, sum r_i)
    return _pad(A, B, r)


@_combination("svd", lambda ranks, svd_rank: svd_rank or max(ranks))
def _svd(parts: list[Part], r: int, opt: Options) -> tuple[torch.Tensor, torch.Tensor]:
    dt = work_dtype(parts[0].lora.A_r.dtype)
    delta = sum(p.weight * p.lora.scale * (p.lora.B_r.to(dt) @ p.lora.A_r.to(dt)) for p in parts)   # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=opt.svd_full_matrices, driver=opt.svd_driver)
    k = min(r, S.shape[0])                 # a rank above min(in, out) keeps every direction; the rest is zero
    B = U[:, :k] * S[:k]                   # (out, k)
    A = Vh[:k, :]                          # (k, in)
    if opt.svd_clamp is not None:          # clip both factors to the clamp-quantile of their entries (kohya-ss)
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), opt.svd_clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return _pad(A, B, r)


def _pad(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = r - A.shape[0]
    if extra:
        A = torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)
    return A, B


def weighted_adapter(store: AdapterStore, sites: dict, adapters: list[str], weights: list[float], adapter_name: str,
                     combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                     svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                     majority_sign_method: str = "total") -> Adapter:
    """The adapter `adapter_name`, the `weights`-weighted combination of `adapters` in `store` at `sites` (a new
    Adapter; nothing is changed: PeftModule.add_weighted_adapter adds it). Checks everything first."""
    check_adapter_name(adapter_name)
    if adapter_name in store.names():   # PEFT returns silently here; peftc says so
        raise SpecError(f"an adapter named {adapter_name!r} exists already; adapters: {store.names()}; pick a new name "
                        "or delete_adapter() it first")
    if isinstance(adapters, str) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise InputError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    unknown = [a for a in adapters if a not in store.names()]
    if unknown:
        raise UnknownAdapter(unknown, store.names(), "adapters")
    given = weights
    try:
        weights = None if isinstance(given, (str, bytes)) else [float(w) for w in given]
    except (TypeError, ValueError):
        weights = None
    if weights is None or len(weights) != len(adapters):
        raise InputError(f"weights must give one number per adapter: {len(adapters)} adapters {adapters}, "
                         f"got weights={given!r}")
    if not all(math.isfinite(w) for w in weights):
        raise InputError(f"weights must be finite numbers, got {given!r}")
    if combination_type not in COMBINATIONS:
        later = " (PEFT's " + ", ".join(repr(c) for c in NOT_YET) + " are not supported yet)" \
            if combination_type in NOT_YET else ""
        raise SpecError(f"combination_type={combination_type!r} is not supported{later}; supported: "
                        f"{sorted(COMBINATIONS)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise SpecError(f"svd_rank must be a positive integer or None (the largest rank), got {svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0.0 <= svd_clamp <= 1.0):
        raise SpecError(f"svd_clamp must be a quantile in [0, 1] or None (no clamping), got {svd_clamp!r}")
    if density is not None:
        log.warning("density=%r is used by PEFT's ties/dare/magnitude_prune combinations only; %r ignores it",
                    density, combination_type)

    ads = [store[a] for a in adapters]
    for name, ad in zip(adapters, ads):
        if not isinstance(ad.spec, LoRA):
            raise SpecError(f"adapter {name!r} is a {type(ad.spec).__name__}; only LoRA adapters can be combined")
        if ad.spec.use_dora:
            raise SpecError(f"adapter {name!r} uses DoRA; its magnitudes have no weighted combination; combine "
                            "plain LoRA adapters (or merge() the DoRA adapter)")
        if ad.peft_paths:
            raise SpecError(f"adapter {name!r} adapts parameters (target_parameters, e.g. {next(iter(ad.peft_paths))})"
                            "; they have no weighted combination (PEFT refuses them too); combine adapters without")
        if ad.spec.rank_pattern or ad.spec.alpha_pattern:
            raise SpecError(f"adapter {name!r} has per-layer ranks or alphas (rank_pattern/alpha_pattern); weighted "
                            "combinations need one rank per adapter; combine adapters without them")
        if ad.saved_modules:
            raise SpecError(f"adapter {name!r} has modules_to_save {ad.saved_modules}; whole-module copies have no "
                            "weighted combination (PEFT allows at most one such adapter and gives the new adapter "
                            "fresh copies); combine adapters without modules_to_save")
        if ad.tokens:
            raise SpecError(f"adapter {name!r} trains embedding rows (trainable_token_indices: "
                            f"{[t.path for t in ad.tokens.values()]}); trained rows have no weighted combination; "
                            "combine adapters without them")
    if len(adapters) == 1 and combination_type != "linear":   # PEFT's rule: one adapter is always scaled linearly
        log.info("one adapter: combination_type=%r becomes 'linear' (as in PEFT)", combination_type)
        combination_type = "linear"
    rank_of, combine = COMBINATIONS[combination_type]
    r = rank_of([max(w.r for w in ad.sites.values()) for ad in ads], svd_rank)

    paths = [p for p in sites if any(p in ad.targets for ad in ads)]   # the union, in graph order
    spec = dataclasses.replace(ads[0].spec, r=r, alpha=float(r), targets=tuple(paths), modules_to_save=(),
                               rank_pattern=(), alpha_pattern=(), layers_to_transform=None, layers_pattern=None,
                               exclude_modules=None)
    new = Adapter(spec, paths, [])
    opt = Options(svd_clamp, svd_full_matrices, svd_driver)
    with torch.no_grad():
        for path in paths:
            key = site_key(path)
            parts = [Part(ad.sites[key], w) for ad, w in zip(ads, weights) if path in ad.targets]
            A, B = combine(parts, r, opt)                                            # (r, in), (out, r)
            like = parts[0].lora.A_r
            w = LoraWeights(r, A.shape[1], B.shape[0], spec.scale, spec.dropout, True, dtype=like.dtype,
                            device=like.device)
            w.A_r.copy_(A)
            w.B_r.copy_(B)
            new.sites[key] = w
    for p in new.parameters():   # PEFT freezes the new adapter too
        p.requires_grad_(False)
    return new
    log.info("added %r = %s of %s (weights %s): r=%d, %d sites", adapter_name, combination_type, adapters, weights,
             r, len(paths))
