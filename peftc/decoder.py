"""Lower a causal LM to the graphs generation runs: a prefill graph and a decode graph over a static KV cache that
each call passes in as its own tensors (so concurrent calls never share a cache, and a failed call leaves nothing
behind).

    prefill(input_ids [B, S], position_ids [B, S], padding [B, L], cache_position [S], cache) -> logits [B, 1, V]
    decode (input_ids [B, 1], position_ids [B, 1], padding [B, L], cache_position [1], cache) -> logits [B, 1, V]

`cache` is a list of 2 tensors per attention layer, keys then values, each [B, kv_heads, L, head_dim]; the graph
writes this call's keys and values at `cache_position` in place (`index_copy_`) and attends over all L slots.
`padding` is 1 for the slots that hold a token (0 for left padding), and slots past the call's own are masked
causally, so L is any length (it is dynamic, as are B and the prefill's S).

The model runs under its own forward with a cache object of peftc's (`_InputCache`: transformers' Cache protocol
over the call's tensors, independent of transformers' cache classes) and a 4-D mask built here from `padding` and
`cache_position` (causal, with the config's sliding window where the model's layers use one), which transformers'
models take as given. The graphs are traced with the model's own module paths, so the matching pass finds the
same sites as in the forward graph and every method's rewrite inserts its adapters unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from .errors import GenerationError, PeftcError, TraceError
from .quant import stand_in
from .generation import hf_positions
from .trace import _device, _dtype, _is_hf, export_graph

log = logging.getLogger(__name__)

TRACE_BATCH = 2     # batch 1 would be specialized by export
TRACE_SEQ = 4
TRACE_CACHE = 8


def causal_lm_refusal(model: nn.Module | None) -> str | None:
    """Why `model` cannot generate with peftc (None: it can)."""
    if model is None:
        return "this module was compiled without its model"
    if not _is_hf(model):
        return f"{type(model).__name__} is not a transformers model"
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model; peftc generates with decoder-only causal LMs"
    can = getattr(model, "can_generate", None)
    if can is None or not can():
        return (f"{type(model).__name__} is not a causal language model (transformers says it cannot generate); "
                "peftc generates with *ForCausalLM models")
    params = inspect.signature(model.forward).parameters
    if _cache_kwarg(params) is None:
        return f"{type(model).__name__}.forward takes no KV cache (no `cache` / `past_key_values` argument)"
    return None


def _cache_kwarg(params) -> str | None:
    for name in ("cache", "past_key_values"):       # transformers 5 renamed past_key_values to cache
        if name in params:
            return name
    return None


def max_positions(config: Any) -> int | None:
    """The model's position limit, where its config names one."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The KV cache a decoder graph takes: one (kv_heads, key_dim, value_dim) per attention layer, its dtype and
    device, and the model's position limit."""

    layers: tuple[tuple[int, int, int], ...]
    dtype: torch.dtype
    device: torch.device
    limit: int | None
    weights_dtype: torch.dtype | None = None     # the model's floating weights' when the cache was read off it

    def following(self, weights: torch.Tensor | None) -> "CacheLayout":
        """This layout for a graph whose weights are now `weights`' device and dtype (after `.to()` / `.half()`):
        a cache in the weights' dtype follows them."""
        if weights is None:
            return self
        dtype = weights.dtype if self.dtype == self.weights_dtype else self.dtype
        return dataclasses.replace(self, device=weights.device, dtype=dtype, weights_dtype=weights.dtype)

    def allocate(self, batch: int, length: int) -> list[torch.Tensor]:
        """A fresh, zeroed cache for `batch` rows of `length` slots (keys, values per layer)."""
        out = []
        for heads, kd, vd in self.layers:
            out.append(torch.zeros(batch, heads, length, kd, dtype=self.dtype, device=self.device))
            out.append(torch.zeros(batch, heads, length, vd, dtype=self.dtype, device=self.device))
        return out


class _InputLayer:
    """One attention layer's slice of the call's cache: writes the new keys and values at the call's positions and
    returns all of the layer's slots (transformers' cache-layer protocol, the part attention layers use)."""

    is_compileable = True
    is_sliding = False
    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor):
        self.keys, self.values, self.position = keys, values, position

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.position, key_states)
        self.values.index_copy_(2, self.position, value_states)
        return self.keys, self.values

    def get_seq_length(self):
        return self.position[0]

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def get_mask_sizes(self, *args, **kwargs):
        return self.keys.shape[2], 0


def _input_cache(tensors: list[torch.Tensor], position: torch.Tensor):
    """A transformers Cache over the call's tensors (made while tracing; never kept)."""
    from transformers.cache_utils import Cache

    class _InputCache(Cache):
        def __init__(self):       # Cache's own __init__ builds layers of its own kinds: these are the call's
            self.layers = [_InputLayer(tensors[i], tensors[i + 1], position) for i in range(0, len(tensors), 2)]
            self.offloading = False
            self.layer_class_to_replicate = None

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return self.layers[layer_idx].update(key_states, value_states)

        def get_seq_length(self, layer_idx: int = 0):
            return self.layers[layer_idx].get_seq_length()

        def get_mask_sizes(self, query_length, layer_idx=0):
            return self.layers[layer_idx].get_mask_sizes()

        @property
        def is_compileable(self) -> bool:
            return True

    return _InputCache()


def _sliding(config) -> tuple[bool, int | None]:
    """(per layer type: whether the model takes a dict of masks by layer type, the sliding window or None)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types and "sliding_attention" in types:
        return True, window
    return False, window if isinstance(window, int) and window > 0 else None


class _Step(nn.Module):
    """The module traced for generation: the model's own forward on the call's tokens, positions and cache. It
    holds the model's children under their own names (the same objects), so every node keeps the model's module
    paths."""

    def __init__(self, model: nn.Module, cache_kwarg: str, logits_to_keep: bool, positions: bool):
        super().__init__()
        object.__setattr__(self, "_model", model)
        self._modules = model._modules      # shared: the paths below the root are the model's
        self._parameters = model._parameters
        self._buffers = model._buffers
        cfg = model.config
        self.cache_kwarg = cache_kwarg
        self.logits_to_keep = logits_to_keep
        self.positions = positions
        self.by_type, self.window = _sliding(cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config")
                                             else cfg)
        self.additive = getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", None)

    def _mask(self, padding: torch.Tensor, cache_position: torch.Tensor, window: int | None) -> torch.Tensor:
        slots = torch.arange(padding.shape[1], device=padding.device)
        allowed = slots[None, :] <= cache_position[:, None]                        # [S, L] causal
        if window is not None:
            allowed = allowed & (slots[None, :] > cache_position[:, None] - window)
        allowed = padding[:, None, None, :].bool() & allowed[None, None]          # [B, 1, S, L]
        if not self.additive:
            return allowed
        dtype = _dtype(self._model)
        zero = torch.zeros((), dtype=dtype, device=padding.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def forward(self, input_ids, position_ids, padding, cache_position, cache):
        if self.by_type:
            mask: Any = {"full_attention": self._mask(padding, cache_position, None),
                         "sliding_attention": self._mask(padding, cache_position, self.window)}
        else:
            mask = self._mask(padding, cache_position, self.window)
        kwargs = {self.cache_kwarg: _input_cache(cache, cache_position), "use_cache": True, "return_dict": True}
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if self.positions:
            kwargs["position_ids"] = position_ids
        out = type(self._model).forward(self._model, input_ids=input_ids, attention_mask=mask, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits if self.logits_to_keep else logits[:, -1:]


@dataclasses.dataclass
class DecoderGraphs:
    """A causal LM lowered for generation: the prefill and decode graphs (base: no adapter), the cache they take,
    and each graph's sites (passes.match), found on that graph."""

    prefill: GraphModule
    decode: GraphModule
    layout: CacheLayout
    prefill_sites: dict
    decode_sites: dict


def cache_layout(model: nn.Module, step: nn.Module) -> CacheLayout:
    """The cache the model's attention layers fill, read from one token run through the model with a cache that
    records the keys' and values' shapes (the model's own forward; its modes are restored)."""
    seen: dict[int, tuple] = {}
    dev = _device(model)
    from transformers.cache_utils import DynamicCache

    ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
    with torch.no_grad(), stand_in(model):      # bitsandbytes layers as peftc's ops: never repacked (quant.py)
        out = type(model).forward(model, input_ids=ids, use_cache=True, return_dict=True,
                                  **{step.cache_kwarg: DynamicCache(config=model.config)})
    cache = getattr(out, step.cache_kwarg, None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise GenerationError(f"{type(model).__name__} filled no KV cache layers; peftc's generate needs attention "
                              "layers that use transformers' cache")
    for i, layer in enumerate(layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 4:
            raise GenerationError(f"{type(model).__name__}: cache layer {i} ({type(layer).__name__}) holds no "
                                  "[batch, heads, length, dim] keys and values; peftc's generate supports attention "
                                  "layers with a plain KV cache")
        seen[i] = (k.shape[1], k.shape[3], v.shape[3], k.dtype)
    dtypes = {s[3] for s in seen.values()}
    return CacheLayout(tuple(s[:3] for s in seen.values()), dtypes.pop(), dev, max_positions(model.config),
                       _dtype(model))


def trace_decoder(model: nn.Module) -> DecoderGraphs:
    """Trace `model` (a transformers causal LM; not changed) to its prefill and decode graphs, in eval mode (sites and
    base passes are the pipeline's: pipeline.lower_decoder)."""
    why = causal_lm_refusal(model)
    if why:
        raise GenerationError(f"cannot generate: {why}")
    params = inspect.signature(model.forward).parameters
    step = _Step(model, _cache_kwarg(params), "logits_to_keep" in params, "position_ids" in params)
    layout = cache_layout(model, step)
    limit = layout.limit or 1 << 20
    B, S, L = TRACE_BATCH, TRACE_SEQ, TRACE_CACHE
    batch, seq, length = Dim("batch", min=1), Dim("seq", min=1, max=limit), Dim("cache", min=2, max=limit)
    dev = layout.device

    def example(s: int, start: int):
        ids = torch.zeros(B, s, dtype=torch.long, device=dev)
        pos = torch.arange(start, start + s, device=dev).expand(B, s).contiguous()
        padding = torch.ones(B, L, dtype=torch.long, device=dev)
        return (ids, pos, padding, torch.arange(start, start + s, device=dev), layout.allocate(B, L))

    cache_dims = [{0: batch, 2: length}] * (2 * len(layout.layers))
    try:
        prefill = export_graph(model, step, example(S, 0), {},
                               ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: length}, {0: seq}, cache_dims),
                               train=False)
        decode = export_graph(model, step, example(1, S), {},
                              ({0: batch}, {0: batch}, {0: batch, 1: length}, None, cache_dims), train=False)
    except TraceError as e:
        raise GenerationError(
            f"cannot generate with {type(model).__name__}: peftc traces it with a static KV cache and a 4-D attention "
            f"mask (causal, padding, sliding window), and that trace failed: {str(e).splitlines()[0]} What to do: "
            "generate with transformers from a merged export (peftc.export_merged)") from e
    return DecoderGraphs(prefill.eval(), decode.eval(), layout, {}, {})


def share_tensors(gm: GraphModule, source: nn.Module) -> None:
    """Make every tensor `gm` reads the object `source` holds under the same name (the forward graph's own
    Parameters and buffers), so the decoder graphs follow what happens to the forward graph's (`.to()`, a merge's
    folded weights) and hold no copies."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, leaf = node.target.rpartition(".")
        try:
            src_owner = source.get_submodule(owner) if owner else source
            mod = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            continue
        for table in ("_parameters", "_buffers"):
            new = getattr(src_owner, table).get(leaf)
            old = getattr(mod, table).get(leaf)
            if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape \
                    and new.dtype == old.dtype:
                getattr(mod, table)[leaf] = new


def flat_graph(source: GraphModule, keep: str) -> GraphModule:
    """A copy of decoder graph `source` that is cheap to call once per token: positional inputs in the graph's
    order (input_ids, position_ids, padding, cache_position, the cache tensors, then the route's tensors) with no
    pytree flattening, one logits tensor out, and every weight it reads bound to one attribute of its own (no
    walk down the module path per read), but those under `keep` (the adapter store: its tensors may be replaced in
    place of a rebuild), which it reads by path as before. Together about 14 % of an eager decode step of a small
    model (benchmarks/generate.py's)."""
    from torch.fx.graph import CodeGen

    gm = GraphModule(source, copy.deepcopy(source.graph))
    gm.meta.update(source.meta)
    count = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target == keep or node.target.startswith(keep + "."):
            continue
        owner, _, leaf = node.target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        for table in (mod._parameters, mod._buffers):
            if isinstance(table.get(leaf), torch.Tensor):
                name = f"_peftc_t{count}"
                getattr(gm, "_parameters" if table is mod._parameters else "_buffers")[name] = table[leaf]
                node.target = name
                count += 1
                break
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        out.args = (value[0],)
    gm.graph._codegen = CodeGen()
    gm.graph.lint()
    gm.recompile()
    return gm


def check_against_model(model: nn.Module, graphs: DecoderGraphs) -> None:
    """The prefill graph's last logits must equal the model's own forward (no cache) on a left-padded batch: a
    model whose masks peftc builds wrongly is refused here, not generated from."""
    dev = graphs.layout.device
    vocab = int(getattr(model.config.get_text_config(decoder=True), "vocab_size", 2) or 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 6), generator=g).to(dev)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    was = {m: m.training for m in model.modules()}
    try:
        model.eval()
        # bitsandbytes layers as peftc's ops: an eval-mode forward without grad would have bitsandbytes repack the
        # user's 4-bit weights for CPU inference (AVX512-BF16), a layout peftc's graphs cannot read
        with torch.no_grad(), stand_in(model):
            padding = torch.ones(2, 8, dtype=torch.long, device=dev)
            padding[:, :6] = mask
            pos = hf_positions(padding)
            ref = model(input_ids=ids, attention_mask=mask, position_ids=pos[:, :6], use_cache=False).logits[:, -1]
            got = graphs.prefill(ids, pos[:, :6], padding, torch.arange(6, device=dev),
                                 graphs.layout.allocate(2, 8))[:, -1]
    except PeftcError:
        raise
    except Exception as e:  # noqa: BLE001 - named
        raise GenerationError(f"{type(model).__name__}: the prefill graph could not run: {type(e).__name__}: {e}") \
            from e
    finally:
        for m, t in was.items():
            m.training = t
    err = (got.float() - ref.float()).abs().max().item()
    tol = 1e-3 if ref.dtype == torch.float32 else 5e-2
    scale = max(ref.float().abs().max().item(), 1.0)
    if not err <= tol * scale:
        raise GenerationError(f"{type(model).__name__}: the static-cache graph's logits differ from the model's own "
                              f"forward by {err:.3g}; its attention masks are not ones peftc builds (causal, padding, "
                              "sliding window); generate with transformers on a merged model instead")
