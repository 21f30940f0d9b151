"""Adapter checkpoints in PEFT's format: adapter_config.json + adapter_model.safetensors, written atomically."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import recover, write_files
from .errors import CheckpointError, PeftcError, UnknownAdapter
from .methods import spec_from_config, spec_to_config
from .passes.match import tensor_at
from .passes.modules_to_save import copy_of
from .store import site_key
from .targets import peft_target_modules

if TYPE_CHECKING:
    from .store import AdapterStore

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# what peftc records in the safetensors metadata beside the tensors (PEFT ignores it): a checksum of the tensors, and
# the config they were saved with, so that bytes changed on disk or a config edited to another meaning (lora_alpha,
# r, targets, ...) are found at load time rather than giving a silently different model
SUM_KEY, CONFIG_KEY = "peftc.sha256", "peftc.config"



@dataclass(frozen=True)
class ModelData:
    """What checkpoints read and write (data, not the module): the adapter store, the sites, the base graph (the
    model's own tensors) and the model's names (PeftModule.checkpoint_data)."""

    store: "AdapterStore"
    sites: dict
    base_gm: Any
    base_name: str | None = None
    loss_type: str | None = None

def _prepare_dir(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save the adapter to {directory}: it exists and is a file; pass a directory path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create adapter directory {directory}: {e.strerror}") from e
    if not os.access(directory, os.W_OK):
        raise CheckpointError(f"adapter directory {directory} is not writable; choose another path")


def adapter_config(data: ModelData, adapter_name: str) -> dict:
    ad = data.store[adapter_name]
    spec = ad.spec
    task = getattr(spec, "task_type", None) or ("CAUSAL_LM" if data.loss_type == "ForCausalLM" else None)
    return spec_to_config(
        spec, target_modules=peft_target_modules(getattr(spec, "targets", None), data.sites,
                                                 [t for t in ad.targets if t not in ad.peft_paths]),
        base_model_name_or_path=data.base_name, task_type=task, modules_to_save=getattr(spec, "modules_to_save", ()),
    )


def save_adapters(data: ModelData, directory, adapter_name: str | None = None,
                  is_main_process: bool | None = None) -> list[Path]:
    """PEFT's layout: the adapter named "default" in `directory`, any other in `directory/<name>`; one adapter when
    `adapter_name` is given, else all of them. Returns the directories written (`is_main_process`: save_adapter)."""
    names = data.store.names() if adapter_name is None else [adapter_name]
    for name in names:
        if name not in data.store.names():
            raise UnknownAdapter(name, data.store.names())
    directory = Path(directory)
    return [save_adapter(data, directory if n == "default" else directory / n, n, is_main_process) for n in names]


def save_adapter(data: ModelData, directory, adapter_name: str, is_main_process: bool | None = None) -> Path:
    """One adapter's adapter_config.json + adapter_model.safetensors in `directory`.

    Sharded adapter weights (DTensors, e.g. under FSDP2's `fully_shard`) are gathered whole first: a collective, so
    every rank calls this, and only the main process writes (`is_main_process`, transformers' convention; default:
    rank 0 where tensors were sharded, else this process)."""
    if adapter_name not in data.store.names():
        raise UnknownAdapter(adapter_name, data.store.names())
    directory = Path(directory)
    state = {**data.store.peft_state_dict(adapter_name), **_bias_aliases(data, adapter_name)}
    sharded = any(_is_dtensor(v) for v in state.values())
    state = {k: _whole(v) for k, v in state.items()}       # every rank, in the same (the store's) order
    if is_main_process is None:
        is_main_process = not sharded or torch.distributed.get_rank() == 0
    if not is_main_process:
        return directory
    _prepare_dir(directory)
    tensors, seen = {}, set()
    for k, v in state.items():                 # a tensor saved under two keys (PEFT's tied token rows): two copies
        tensors[k] = v.detach().to("cpu").contiguous()
        ptr = tensors[k].untyped_storage().data_ptr()
        tensors[k] = tensors[k].clone() if ptr in seen else tensors[k]
        seen.add(ptr)
    cfg = adapter_config(data, adapter_name)
    meta = {"format": "pt", SUM_KEY: _digest(tensors), CONFIG_KEY: json.dumps(cfg, sort_keys=True)}
    write_files(directory, {
        WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata=meta),
        CONFIG_NAME: lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n"),
    })
    return directory


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's key, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(tensors[k].shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _metadata(path: Path) -> dict:
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}              # unreadable: reading the tensors says so, naming the file


def _is_dtensor(t: torch.Tensor) -> bool:
    # no DTensor exists before torch.distributed.tensor is imported: a plain save does not import it
    return "torch.distributed.tensor" in sys.modules and isinstance(t, sys.modules["torch.distributed.tensor"].DTensor)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (this rank's shard) as the whole tensor, all-gathered (a collective); other tensors as they are."""
    return t.full_tensor() if _is_dtensor(t) else t


def read_adapter_config(directory) -> dict:
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"adapter directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file; pass the adapter's directory (holding {CONFIG_NAME})")
    recover(directory)                   # a save killed mid-switch: complete it first
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}; is it an adapter saved by PEFT or peftc?")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                              "fix or re-save the adapter") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; fix or re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(cfg).__name__}")
    return cfg


def read_adapter_weights(directory) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    if directory.is_dir():
        recover(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [n for n in PICKLE_NAMES if (directory / n).exists()]
        if pickled:
            raise CheckpointError(
                f"{directory} holds only {pickled[0]}, a pickle; peftc loads safetensors only (a pickle can run code). "
                "Re-save it with PEFT: PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({e}); re-save the adapter") from None
    recorded = _metadata(path).get(SUM_KEY)
    if recorded is not None and recorded != _digest(tensors):
        raise CheckpointError(f"{path}: its tensors do not match the checksum recorded when peftc saved them (bytes "
                              "changed on disk: a damaged copy, or a file edited by hand); copy or re-save the adapter "
                              "again")
    return tensors


def load_weights_(data: ModelData, adapter_name: str, tensors: dict[str, torch.Tensor], source: Any) -> None:
    """Copy PEFT-keyed tensors into the store, after checking that every key and shape fits (changes `data.store`)."""
    expected = dict(data.store.peft_parameters(adapter_name))
    tensors = {_strip_adapter_name(k, adapter_name): v for k, v in tensors.items()}
    tensors = _drop_embedding_copies(data, adapter_name, tensors, source)
    tensors = _drop_bias_aliases(data, adapter_name, tensors, source)
    kept = _trained_bias_keys(data, adapter_name) - set(tensors)
    if kept:      # as PEFT loads such a file (strict=False): those biases stay at the model's values
        log.warning("%s: %d trained bias(es) of adapter %r are not in the checkpoint (e.g. %s); they start from "
                    "the model's own", source, len(kept), adapter_name, sorted(kept)[0])
        expected = {k: p for k, p in expected.items() if k not in kept}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source}: key {unexpected[0]!r} (and {len(unexpected) - 1} more) has no place in this model; "
            f"was the adapter made for a different base model? This model has e.g. {next(iter(expected), None)!r}"
        )
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} key(s), e.g. {missing[0]!r}; the file is incomplete "
                              "or was made with other targets")
    for k, p in expected.items():
        if tuple(tensors[k].shape) != tuple(p.shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(tensors[k].shape)} in the checkpoint but {tuple(p.shape)} in this "
                "model; the adapter was made for a different base model (or another rank)"
            )
        if p.is_floating_point() and not tensors[k].is_floating_point():
            raise CheckpointError(
                f"{source}: {k} is stored as {tensors[k].dtype}, but adapter weights are floating point ({p.dtype} "
                "here); casting would change the adapter's values: the file is corrupted or was not written as an "
                "adapter, re-save it")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k].to(dtype=p.dtype, device=p.device))


def _drop_embedding_copies(data: ModelData, adapter_name: str, tensors: dict, source: Any) -> dict:
    """PEFT also saves the base weight of a targeted embedding (save_embedding_layers="auto"), under
    <path>.base_layer.weight. A copy equal to the model's own is dropped; a different one (a resized or retrained
    vocabulary) is refused, since peftc never replaces the model's weights from an adapter."""
    out = dict(tensors)
    for path in data.store[adapter_name].targets:
        key = f"base_model.model.{path}.base_layer.weight"
        if key not in out or data.sites[path].kind != "embedding":
            continue
        saved, own = out.pop(key), tensor_at(data.base_gm, data.sites[path].weight)
        if tuple(saved.shape) != tuple(own.shape) or not torch.equal(saved.to(own.dtype).cpu(), own.detach().cpu()):
            raise CheckpointError(f"{source}: {key} is a copy of embedding {path} (shape {tuple(saved.shape)}) that "
                                  f"differs from this model's (shape {tuple(own.shape)}): the adapter was trained with "
                                  "a changed vocabulary or embedding; load a base model that has that embedding (e.g. "
                                  "resize_token_embeddings and load its weights) first")
    return out


def _trained_bias_keys(data: ModelData, adapter_name: str) -> set[str]:
    """PEFT keys of the adapter's trained-bias copies (LoRA's bias; not its modules_to_save copies)."""
    ad = data.store[adapter_name]
    paths = {p for p in ad.saved_modules if not getattr(ad.saved[site_key(p)], "whole", True)}
    return {k for k, _ in data.store.peft_saved_parameters(adapter_name, paths)}


def _saved_bias_aliases(data: ModelData, adapter_name: str) -> Iterator[tuple[str, str, str]]:
    """(copy alias, original alias, get_attr target) of each bias inside a modules_to_save module, for bias="all".

    PEFT's bias="all" saves every state-dict key ending in ".bias", so a modules_to_save module's biases come twice
    more, under its wrapper's names: <m>.modules_to_save.bias (the copy; the adapter name is stripped only when the
    bias is the module's own, else it stays: <m>.modules_to_save.<name>.dense.bias) and <m>.original_module.bias
    (the model's). PEFT's load ignores the first and writes the second into the model."""
    ad = data.store[adapter_name]
    if getattr(ad.spec, "bias", "none") != "all":
        return
    for m in ad.saved_modules:
        holder = ad.saved[site_key(m)]
        if not getattr(holder, "whole", True):
            continue
        for leaf in holder._parameters:
            sub = leaf.replace("-", ".")
            if sub == "bias" or sub.endswith(".bias"):
                copy = f"{m}.modules_to_save.{sub}" if sub == "bias" else f"{m}.modules_to_save.{adapter_name}.{sub}"
                yield f"base_model.model.{copy}", f"base_model.model.{m}.original_module.{sub}", f"{m}.{sub}"


def _bias_aliases(data: ModelData, adapter_name: str) -> dict[str, torch.Tensor]:
    ad = data.store[adapter_name]
    out = {}
    for copy, orig, target in _saved_bias_aliases(data, adapter_name):
        out[copy] = copy_of(ad, target)[0].detach().clone()     # its own storage: safetensors refuses shared ones
        out[orig] = tensor_at(data.base_gm, target).detach().clone()
    return out


def _drop_bias_aliases(data: ModelData, adapter_name: str, tensors: dict, source: Any) -> dict:
    """Drop the modules_to_save aliases of bias="all" (see _saved_bias_aliases); an original_module bias that
    differs from the model's is refused, since peftc never changes the model's weights from an adapter."""
    out = dict(tensors)
    for copy, orig, target in _saved_bias_aliases(data, adapter_name):
        wrapper = copy[:copy.index(".modules_to_save.") + len(".modules_to_save.")]
        for k in [k for k in out if k.startswith(wrapper)]:    # with whichever adapter name PEFT saved it under
            del out[k]
        saved = out.pop(orig, None)
        own = tensor_at(data.base_gm, target)
        if saved is not None and (tuple(saved.shape) != tuple(own.shape)
                                  or not torch.equal(saved.to(own.dtype).cpu(), own.detach().cpu())):
            raise CheckpointError(f"{source}: {orig} (the model's own bias under a modules_to_save module) differs "
                                  f"from this model's {target}: the adapter was saved from another base model, or "
                                  "its original module was changed; peftc does not change the model's weights")
    return out


def _strip_adapter_name(key: str, name: str) -> str:
    """PEFT strips the adapter name on save; tolerate keys that kept it (lora_A.<name>.weight)."""
    key = key.replace(f".lora_A.{name}.", ".lora_A.").replace(f".lora_B.{name}.", ".lora_B.") \
             .replace(f".modules_to_save.{name}.", ".")
    return key.removesuffix(f".{name}") if key.endswith(f".trainable_tokens_delta.{name}") else key


def load_spec(directory):
    """The spec of adapter_config.json; where peftc saved the weights beside it, the config recorded with them must
    mean the same spec (fields such as base_model_name_or_path or inference_mode may differ)."""
    cfg = read_adapter_config(directory)
    source = str(Path(directory) / CONFIG_NAME)
    spec = spec_from_config(cfg, source=source)
    recorded = _metadata(Path(directory) / WEIGHTS_NAME).get(CONFIG_KEY)
    if recorded is not None:
        try:
            saved = json.loads(recorded)
            same = spec_from_config(saved, source=source) == spec
        except (ValueError, PeftcError):
            saved, same = {}, False
        if not same:
            fields = sorted(k for k in {*cfg, *saved} if cfg.get(k) != saved.get(k))
            shown = ", ".join(f"{k}: {cfg.get(k)!r} (saved with {saved.get(k)!r})" for k in fields[:4])
            raise CheckpointError(
                f"{source} does not mean the adapter its weights were saved with: {shown or 'unreadable record'}. "
                f"Restore the config as saved (the record is in {WEIGHTS_NAME}'s metadata, key {CONFIG_KEY!r}); to "
                "change the adapter's meaning on purpose, load it as saved and save a new adapter")
    return spec
