"""Which LoRA weights sit at a site, and the values a call routes to LoRA's inputs (passes.route): the call's
adapter's A, B, scale, dropout rate and its variants' tensors (passes.lora.variants) at a site, zeros where it has
none, and the base weight it runs on (its PiSSA / OLoRA residual, else the model's)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.store import Adapter, AdapterStore, site_key

from ..match import Site, tensor_at
from .spec import LoRA
from .variants import VARIANTS, Variant
from .weights import LoraWeights

# route key part -> LoraWeights attribute: the base method's, then each variant's (Variant.route)
PARTS = {"A": "A", "B": "B", "s": "scale_t", "p": "p_t", **{k: a for v in VARIANTS for k, a in v.route.items()}}


def input_of(site: Site, node: Node) -> Node:
    return node.args[site.spec.input_arg]


def lora_adapter(store: AdapterStore, name: str | None) -> Adapter | None:
    """Adapter `name` if it is a LoRA adapter (the store may hold other methods' adapters too), else None."""
    ad = store.adapters[name] if name is not None and name in store.adapters else None
    return ad if ad is not None and isinstance(ad.spec, LoRA) else None


def weights_at(store: AdapterStore, name: str | None, path: str) -> LoraWeights | None:
    """LoRA adapter `name`'s weights at module path `path`, or None (not LoRA, or not targeting it)."""
    ad = lora_adapter(store, name)
    return ad.sites[site_key(path)] if ad is not None and path in ad.targets else None


def all_weights(store: AdapterStore, path: str) -> list[LoraWeights]:
    return [w for a in store.names() if (w := weights_at(store, a, path)) is not None]


def variant_at(store: AdapterStore, path: str, variant: Variant) -> bool:
    """Whether any adapter has `variant` at `path` (the graph then serves it there: DoRA's rescale, lora_bias's
    bias)."""
    return any(variant.at(w) for w in all_weights(store, path))


def residual_at(store: AdapterStore, path: str) -> bool:
    """Whether any adapter runs on a base weight of its own at `path` (a variant's base: PiSSA / OLoRA)."""
    return any(v.base is not None and variant_at(store, path, v) for v in VARIANTS)


def dropout_live(store: AdapterStore, paths: list[str]) -> bool:
    """Whether any adapter has a dropout rate at one of the module paths `paths`."""
    return any(w.p > 0 for p in paths for w in all_weights(store, p))


def live_at(store: AdapterStore, paths: list[str]) -> bool:
    """Whether the graph draws dropout masks at `paths` in training: where an adapter has a rate, and everywhere
    under a capacity (an adapter with a rate may take a slot without a rebuild; a rate of 0 keeps x as it is)."""
    return store.capacity is not None or dropout_live(store, paths)


def site_rank(store: AdapterStore, path: str) -> int:
    """The rank every slot has at site `path` in the graph: the capacity's, else the largest routed there (the
    zeros that stand for an adapter not targeting the site have it too, so every adapter's inputs are alike)."""
    if store.capacity is not None:
        return store.capacity.rank
    return max((w.A.shape[0] for w in all_weights(store, path)), default=1)


def lora_value(w: LoraWeights | None, key: tuple, like: torch.Tensor, gm: GraphModule) -> torch.Tensor:
    """An adapter's A, B, scale, dropout rate or a variant's tensor (PARTS) at a site (`w`: its weights there); zeros
    of the graph's rank where it has none (another method's adapter, or one not targeting the site)."""
    t = None if w is None else getattr(w, PARTS[key[2]])
    if t is None:             # not targeted here, or without the variant: zeros (DoRA's d = 0: no rescale)
        t = torch.zeros(like.shape, dtype=like.dtype, device=device_of(gm))
    return t


def device_of(gm: GraphModule) -> torch.device:
    t = next(gm.parameters(), None)
    t = next(gm.buffers(), None) if t is None else t
    return t.device if t is not None else torch.device("cpu")


def residual_value(w: LoraWeights | None, key: tuple, like: torch.Tensor, gm: GraphModule) -> torch.Tensor:
    """The base weight an adapter runs on at a site: its PiSSA / OLoRA residual, else the model's weight."""
    return w.residual if w is not None and w.residual is not None else tensor_at(gm, key[2])
