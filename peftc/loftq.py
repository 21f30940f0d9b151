"""LoftQ on a model already quantized to 4 bits (PEFT's replace_lora_weights_loftq): a LoRA adapter's A and B from the
gap between the original full-precision weights, read from the model's safetensors, and the 4-bit weights its layers
compute with (arXiv:2310.08659, one step).

    for each bitsandbytes 4-bit layer the adapter adapts, in graph order
    (W: the file's weight, float32; Q: the layer's weight dequantized, as the layer computes with it):
        W - Q = U S Vh                          torch.linalg.svd(full_matrices=False), float32
        B = U[:, :r] diag(sqrt(S[:r]))          [out, r]
        A = diag(sqrt(S[:r])) Vh[:r]            [r, in]      (passes.lora.inits.top_r)
        written into the adapter's own A, B (cast to their dtype); then callback(model, path) -> keep?
        (falsy: that layer's A, B go back to what they were)

As in PEFT: B A approximates W - Q without the scale s = alpha / r, so the adapted layer starts at Q + s (W - Q)_r,
closest to W at alpha == r (a warning says so otherwise); layers of other kinds the adapter adapts (full precision,
8-bit) keep their A and B (logged); nothing is quantized again and the user's model is not changed.

Where PEFT differs or is silent, peftc checks first and changes nothing on bad input: the model's base must have
4-bit layers under the adapter; DoRA adapters are refused (PEFT keeps the magnitude computed from the old A, B);
every layer's weight must be in the file (its key, the key without or with the model's base_model_prefix, or the
weight it is tied to), full precision, finite and of the layer's shape. Only safetensors are read (model.safetensors,
or model.safetensors.index.json and its shards): pickles are never loaded. If the callback raises, every layer
already written goes back too.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import CheckpointError, InputError, SpecError, UnknownAdapter
from .module import PeftModule
from .passes.lora import LoRA
from .passes.lora.inits import top_r
from .passes.match import dense_weight
from .store import site_key

log = logging.getLogger(__name__)

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAVE_HINT = ("save the full-precision model with save_pretrained(dir) (safetensors, the default) and pass "
             "model_path=dir")


@dataclass(frozen=True)
class WeightFiles:
    """A model's full-precision safetensors: which file holds each key, and where they were found (for messages)."""

    where: str
    files: dict             # key -> Path

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string, e.g. "F32") of `key`, read from the header only."""
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt", device="cpu") as f:
            s = f.get_slice(key)
            return tuple(s.get_shape()), s.get_dtype()

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt", device="cpu") as f:
            return f.get_tensor(key)


@dataclass(frozen=True)
class _Layer:
    path: str                # module path
    key: str                 # its weight's key in the file
    weights: object          # the adapter's LoraWeights there


def replace_lora_weights_loftq(model, model_path: str | os.PathLike | None = None, adapter_name: str = "default",
                               callback: Optional[Callable[[object, str], bool]] = None) -> list[str]:
    """LoftQ-initialise LoRA adapter `adapter_name` of `model` (a PeftModule, or a CompiledPeftModule) on its
    bitsandbytes 4-bit layers, in place, from the full-precision weights at `model_path` (a directory holding
    model.safetensors or model.safetensors.index.json, or such a file; default: the model's name_or_path, a local
    directory or a model in the local Hugging Face cache; nothing is downloaded). PEFT's
    peft.utils.loftq_utils.replace_lora_weights_loftq, on peftc's module.

    `callback(model, path)` is called after each layer's new A and B are written, with `model` as passed here (call
    it as the model: it runs with the new weights) and the layer's module path in the user's model (PEFT's name
    without "base_model.model.", e.g. "model.layers.0.self_attn.q_proj"); a falsy return puts that layer's old A
    and B back. Greedy, as in PEFT: calling again may improve further.

    A and B are written into the adapter store's own tensors, so every form (single, mixed, torch.compile'd) runs
    them at once, without a rebuild or a recompile. Returns the module paths whose new A, B were kept."""
    pm = model.peft if not isinstance(model, PeftModule) and isinstance(getattr(model, "peft", None), PeftModule) \
        else model
    if not isinstance(pm, PeftModule):
        raise InputError(f"replace_lora_weights_loftq takes a PeftModule (from peftc.compile), got "
                         f"{type(model).__name__}; compile the quantized model with peftc.compile(model, "
                         "peftc.LoRA(...)) first")
    if callback is not None and not callable(callback):
        raise InputError(f"callback must be a function (model, module_path) -> bool, got {type(callback).__name__}")
    layers, files = _plan(pm, model_path, adapter_name)
    scales = sorted({lay.weights.scale for lay in layers} - {1.0})
    if scales:
        log.warning("replace_lora_weights_loftq: adapter %r has scale(s) %s (alpha / r != 1); as in PEFT, B A "
                    "approximates W - Q without the scale, so its layers start at Q + s (W - Q)_r, not near W; use "
                    "alpha == r for LoftQ", adapter_name, scales)
    gm = pm.base_graph_module
    written: list[tuple[object, torch.Tensor, torch.Tensor]] = []
    kept: list[str] = []
    with torch.no_grad():
        try:
            for lay in layers:
                lw, site = lay.weights, pm.sites[lay.path]
                q = dense_weight(gm, site, _quant_dtype(pm, lay.path, gm, site)).to(torch.float32)   # [out, in]
                w = files.tensor(lay.key).to(device=q.device, dtype=torch.float32)                    # [out, in]
                if not torch.isfinite(w).all():
                    raise CheckpointError(f"{lay.key} in {files.where} has non-finite values; LoftQ needs the "
                                          "model's finite full-precision weights")
                A, B = top_r(w - q, lw.r)                                      # [r, in], [out, r]
                old = (lw.A_r.clone(), lw.B_r.clone())
                written.append((lw, *old))
                lw.A_r.copy_(A)
                lw.B_r.copy_(B)
                if callback is None:
                    kept.append(lay.path)
                    continue
                if callback(model, lay.path):        # under no_grad, as in PEFT
                    kept.append(lay.path)
                else:
                    lw.A_r.copy_(old[0])
                    lw.B_r.copy_(old[1])
                    log.info("replace_lora_weights_loftq: callback rejected %s; its A, B are unchanged", lay.path)
        except BaseException:
            for lw, a, b in reversed(written):
                lw.A_r.copy_(a)
                lw.B_r.copy_(b)
            raise
    log.info("replace_lora_weights_loftq: adapter %r, %d of %d 4-bit layers LoftQ-initialised from %s",
             adapter_name, len(kept), len(layers), files.where)
    return kept


def _plan(pm: PeftModule, model_path, adapter_name: str) -> tuple[list[_Layer], WeightFiles]:
    """Every check, before anything is written: the adapter, its 4-bit layers, the file and each layer's weight in
    it (key, dtype, shape, read from the header)."""
    if not isinstance(adapter_name, str) or adapter_name not in pm.adapters:
        raise UnknownAdapter(adapter_name, pm.adapters)
    ad = pm.store[adapter_name]
    if not isinstance(ad.spec, LoRA):
        raise SpecError(f"adapter {adapter_name!r} is a {type(ad.spec).__name__} adapter; LoftQ initialises LoRA's A "
                        "and B: pass a LoRA adapter's name")
    if ad.spec.use_dora:
        raise SpecError(f"adapter {adapter_name!r} uses DoRA (use_dora=True): its magnitude was set from its first A "
                        "and B, and new ones would leave it stale (PEFT's replace_lora_weights_loftq keeps the old "
                        "magnitude, so the layer no longer starts at its 4-bit weight plus B A); use a LoRA adapter "
                        "without DoRA")
    kinds: dict[str, list[str]] = {}
    for path in ad.targets:
        kinds.setdefault(pm.sites[path].kind, []).append(path)
    four = kinds.pop("linear4bit", [])
    if not four:
        found = ", ".join(f"{k}: {len(v)}" for k, v in kinds.items()) or "none"
        raise SpecError(f"replace_lora_weights_loftq needs LoRA on bitsandbytes 4-bit layers (as PEFT), but adapter "
                        f"{adapter_name!r} adapts none ({found}); load the model with from_pretrained(..., "
                        "quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4')) "
                        "before compiling, or on a full-precision model use peftc.LoRA(init='loftq')")
    if kinds:
        log.warning("replace_lora_weights_loftq: adapter %r also adapts layers that are not 4-bit (%s), as PEFT "
                    "leaves them: their A and B are not changed", adapter_name,
                    ", ".join(p for v in kinds.values() for p in v))
    files = weight_files(model_path, _name_or_path(pm))
    prefix = getattr(pm.base_model, "base_model_prefix", "") or ""
    tied = getattr(pm.base_model, "all_tied_weights_keys", None) or {}
    layers = []
    for path in four:
        site, lw = pm.sites[path], ad.sites[site_key(path)]
        key = _key(f"{path}.weight", files, prefix, tied)
        if key is None:
            close = difflib.get_close_matches(f"{path}.weight", list(files.files), n=3, cutoff=0.5)
            raise CheckpointError(f"{files.where} has no weight for 4-bit layer {path} (looked for "
                                  f"{_candidates(f'{path}.weight', prefix, tied)}; closest keys: {close or 'none'}); "
                                  "pass model_path= the full-precision checkpoint this model was quantized from")
        shape, dtype = files.meta(key)
        if not dtype.startswith(("F", "BF")):
            raise CheckpointError(f"{key} in {files.where} is {dtype}, not floating point: a quantized checkpoint "
                                  "(bitsandbytes saves packed 4-bit codes)? LoftQ needs the original full-precision "
                                  "weights: pass model_path= the checkpoint this model was quantized from")
        if shape != (site.out_features, site.in_features):
            raise CheckpointError(f"{key} in {files.where} has shape {list(shape)}, but 4-bit layer {path} is "
                                  f"[{site.out_features}, {site.in_features}] (out, in): the file is another model's; "
                                  "pass model_path= the checkpoint this model was quantized from")
        layers.append(_Layer(path, key, lw))
    return layers, files


def _name_or_path(pm: PeftModule) -> str:
    config = getattr(pm.base_model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(pm.base_model, "name_or_path", "") or ""


def _candidates(key: str, prefix: str, tied: dict) -> list[str]:
    """The keys a layer's weight may have in the file: its own, without / with the model's base_model_prefix (a file
    saved from the bare base model, or from the model with a head), and the same for the weight it is tied to."""
    out = []
    for k in (key, tied.get(key)):
        if k is None:
            continue
        out.append(k)
        if prefix and k.startswith(prefix + "."):
            out.append(k[len(prefix) + 1:])
        elif prefix:
            out.append(f"{prefix}.{k}")
    return list(dict.fromkeys(out))


def _key(key: str, files: WeightFiles, prefix: str, tied: dict) -> str | None:
    return next((k for k in _candidates(key, prefix, tied) if k in files.files), None)


def _quant_dtype(pm: PeftModule, path: str, gm, site) -> torch.dtype:
    """The dtype bitsandbytes dequantizes the layer's weight to (its quant_state's: the weight's dtype before
    quantization), which is what the layer computes with and what PEFT subtracts; else the site's output dtype."""
    try:
        state = pm.base_model.get_submodule(path).weight.quant_state
        return state.dtype
    except AttributeError:
        from .passes.match import site_dtype
        return site_dtype(gm, site)


def weight_files(model_path, name_or_path: str) -> WeightFiles:
    """The full-precision safetensors at `model_path` (a directory with model.safetensors or
    model.safetensors.index.json, or such a file), or with model_path None at `name_or_path` (a local directory, or
    a model in the local Hugging Face cache: nothing is downloaded). Pickled checkpoints are refused, never loaded."""
    if model_path is None:
        if not name_or_path:
            raise CheckpointError("model_path is None and the model has no name_or_path (it was not loaded with "
                                  "from_pretrained); pass model_path= the directory of its full-precision "
                                  "safetensors")
        p = Path(name_or_path)
        if not p.exists():
            p = _hub_cache(name_or_path)
    else:
        if not isinstance(model_path, (str, os.PathLike)):
            raise InputError(f"model_path must be a path (str or os.PathLike), got {type(model_path).__name__}")
        p = Path(model_path)
        if not p.exists():
            raise CheckpointError(f"model_path {str(p)!r} does not exist; {SAVE_HINT}")
    if p.is_dir():
        if (p / SINGLE).is_file():
            p = p / SINGLE
        elif (p / INDEX).is_file():
            p = p / INDEX
        else:
            names = sorted(x.name for x in p.iterdir())
            pickles = [n for n in names if n.endswith(PICKLES)]
            if pickles:
                raise CheckpointError(f"{p} holds pickled weights only ({', '.join(pickles)}); peftc never loads "
                                      f"pickles (unpickling can run arbitrary code); {SAVE_HINT}")
            raise CheckpointError(f"{p} has no {SINGLE} or {INDEX} (found: {', '.join(names) or 'nothing'}); "
                                  f"{SAVE_HINT}")
    if p.name.endswith(PICKLES):
        raise CheckpointError(f"{p} is a pickled checkpoint; peftc never loads pickles (unpickling can run arbitrary "
                              f"code); {SAVE_HINT}")
    if p.name.endswith(".json"):
        return _sharded(p)
    if not p.name.endswith(".safetensors"):
        raise CheckpointError(f"{p} is not a safetensors file (.safetensors or {INDEX}); {SAVE_HINT}")
    return WeightFiles(str(p), {k: p for k in _keys(p)})


def _keys(p: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(p, framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; re-raised with the file named
        raise CheckpointError(f"{p} is not a readable safetensors file ({type(e).__name__}: {e}); {SAVE_HINT}") \
            from None


def _sharded(index: Path) -> WeightFiles:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a 'weight_map': {e}); "
                              f"{SAVE_HINT}") from None
    files = {}
    for shard in sorted(set(weight_map.values())):
        f = index.parent / shard
        if not f.is_file():
            raise CheckpointError(f"{index} names shard {shard}, which is missing from {index.parent}")
        if not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index} names shard {shard}, which is not a safetensors file; peftc never loads "
                                  f"pickles; {SAVE_HINT}")
        held = set(_keys(f))
        files.update({k: f for k, s in weight_map.items() if s == shard and k in held})
    return WeightFiles(str(index), files)


def _hub_cache(name: str) -> Path:
    """The local Hugging Face cache's copy of model `name` (never downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - invalid ids, missing cache entries, no huggingface_hub: all one answer
        raise CheckpointError(f"model_path is None and the model's name_or_path {name!r} is neither a local "
                              f"directory nor a model in the local Hugging Face cache ({type(e).__name__}); pass "
                              "model_path= the directory of its full-precision safetensors") from None
