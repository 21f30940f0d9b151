"""Exports: a merged model as a Hugging Face directory (streamed, sharded, atomic) and a graph as torch.export .pt2."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import recover_dir, replace_dir
from .errors import ExportError, UnknownAdapter
from .quant import quant_kind, quant_weight, quantized_state
from .passes.merge import folded_bias, folded_weight
from .passes.trainable_tokens import token_state
from .store import Adapter, site_key
from .trace import export_with_fallback

if TYPE_CHECKING:
    from .graph_model import GraphModel
    from .module import PeftModule

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.I)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


def parse_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ExportError(f"dtype={dtype!r} cannot hold the model's weights; use one of fp32, fp16, bf16 "
                      "(or a floating torch.dtype)")


def parse_size(size: Any) -> int:
    """'2GB' -> 2_000_000_000 (as Hugging Face counts: GB = 10^9, GiB = 2^30); an int is bytes."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = _SIZE.match(str(size))
    if not m or float(m.group(1)) <= 0:
        raise ExportError(f"max_shard_size={size!r} is not a size; use e.g. '2GB', '500MB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def _check_target(out: Path, overwrite: bool) -> None:
    recover_dir(out)                     # an export killed mid-switch: complete it first
    if out.exists() and not out.is_dir():
        raise ExportError(f"cannot export to {out}: it exists and is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; pass overwrite=True to replace it, or choose a new path")
    parent = out.parent   # the temp directory is made beside `out`, then renamed
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"cannot export to {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot export to {out}: {parent} is not writable")


class _Dense:
    """A quantized layer's weight, dequantized when it is written (sizes the shard plan without computing it)."""

    def __init__(self, path: str, layer: nn.Module, dtype: torch.dtype):
        self.q = quant_weight(path, layer)
        self.dtype, self.shape = dtype, (self.q.out_features, self.q.in_features)

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def is_floating_point(self) -> bool:
        return True

    def get(self) -> torch.Tensor:
        return self.q.dense(self.dtype)


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if quant_kind(m) is not None}


def _float_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _state_plan(adapter: Adapter, name: str, sites: dict, model: nn.Module,
                model_class: str, requantize: bool = False) -> tuple[list[tuple[str, Any]], bool]:
    """[(key, how)] in the model's state-dict order, where how is a tensor, ("fold", site, base weight),
    ("fold_bias", site, base bias) or ("saved", trained copy: modules_to_save, LoRA's bias, a weight with trained
    token rows);
    tied duplicates are left out (as save_pretrained does) unless folding would untie them. Returns (plan, untied).
    A quantized layer's weight is its dequantization (a _Dense, folded where adapted); the entries of its
    quantization state are left out. With `requantize`, an adapted quantized layer's entries are its folded weight
    quantized again (("requant", site, dense base, entry)); the other quantized layers keep theirs."""
    folded = {sites[p].state_key: sites[p] for p in adapter.targets}
    state = model.state_dict()
    quantized = _quantized_layers(model)
    if requantize:
        adapted = [p for p in adapter.targets if p in quantized]
        if not adapted:
            raise ExportError("requantize=True: no adapted layer of this model is quantized (requantizing applies "
                              "to bitsandbytes 4-bit and 8-bit bases); export without it")
        plan = []
        for k, v in state.items():
            path = next((p for p in adapted if k.startswith(f"{p}.") and k != f"{p}.bias"), None)
            if path is None:
                plan.append((k, v))
            else:
                dense = _Dense(path, quantized[path], _float_dtype(model))
                plan.append((k, ("requant", sites[path], dense, k[len(path) + 1:], v)))
        return plan, False
    dense_dtype = _float_dtype(model)
    for path, layer in quantized.items():
        state = {k: (_Dense(path, layer, dense_dtype) if k == f"{path}.weight" else v) for k, v in state.items()
                 if not k.startswith(f"{path}.") or k in (f"{path}.weight", f"{path}.bias")}
    biased = {}
    for p in adapter.targets:
        bias = state.get(f"{p}.bias")
        like = bias if bias is not None else torch.zeros(sites[p].out_features)
        if folded_bias(adapter, name, sites[p], bias, like) is None:
            continue
        if bias is None:
            raise ExportError(f"adapter {name!r} changes the bias at {p} (lora_bias), which has no bias in "
                              f"{model_class}: its Hugging Face checkpoint has no place for it; use "
                              "pm.export(path) (.pt2), or pm.merge()")
        biased[f"{p}.bias"] = sites[p]
    saved = {}
    for path in adapter.saved_modules:
        for pname, p in adapter.saved[site_key(path)].named_parameters():
            saved[f"{path}.{pname.replace('-', '.')}"] = p.detach()
    groups: dict[tuple, list[str]] = {}
    for k, v in state.items():
        if isinstance(v, _Dense):
            groups[("dense", k)] = [k]
            continue
        groups.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
    tokens = token_state(adapter, state)      # weights with trained token rows (one tensor per tied group of readers)
    untied = any(len(g) > 1 and (any(k in folded or k in saved or k in biased for k in g)
                                 or len({id(tokens.get(k)) for k in g}) > 1) for g in groups.values())
    keep = {k for g in groups.values() for k in (g if untied and len(g) > 1 else g[:1])}
    plan = []
    for k, v in state.items():
        if k not in keep:
            continue
        v = saved.get(k, tokens.get(k, v))     # a trained bias is what lora_bias's fold starts from
        plan.append((k, ("fold", folded[k], v) if k in folded else ("fold_bias", biased[k], v) if k in biased
                     else ("saved", v) if k in saved or k in tokens else v))
    return plan, untied


def _requantized(adapter: Adapter, name: str, site, dense: _Dense, cache: dict) -> dict[str, torch.Tensor]:
    """The adapted quantized layer's state-dict entries: W + delta quantized again in the layer's format (once per
    layer; the rounding error is logged)."""
    if site.fqn not in cache:
        merged = folded_weight(adapter, name, site, dense.get())
        entries, back = quantized_state(dense.q, merged)
        log.info("requantized %s: max |error| %.3g", site.fqn, float((back.float() - merged.float()).abs().max()))
        cache.clear()
        cache[site.fqn] = entries
    return cache[site.fqn]


def _materialize(how, adapter: Adapter, name: str, dtype, cache: dict | None = None) -> torch.Tensor:
    if isinstance(how, tuple) and how[0] == "requant":
        _, site, dense, entry, _ = how
        return _requantized(adapter, name, site, dense, cache if cache is not None else {})[entry].to("cpu")
    if isinstance(how, tuple) and how[0] == "fold":
        base = how[2].get() if isinstance(how[2], _Dense) else how[2]
        t = folded_weight(adapter, name, how[1], base)
    elif isinstance(how, _Dense):
        t = how.get()
    elif isinstance(how, tuple) and how[0] == "fold_bias":
        t = folded_bias(adapter, name, how[1], how[2], how[2])
    elif isinstance(how, tuple):
        t = how[1]
    else:
        t = how
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous()


def export_merged(pm: PeftModule, directory, *, dtype: Any = None, max_shard_size: Any = "2GB",
                  adapter_name: str | None = None, overwrite: bool = False, progress: bool = True,
                  requantize: bool = False) -> Path:
    """Write the merged model as a Hugging Face directory that `AutoModel...from_pretrained(directory)` loads.

    config.json (+ generation_config.json), safetensors weights under the model's own key names, sharded with an
    index above `max_shard_size`. Streams layer by layer: extra memory is one shard plus the folded weight being
    computed. Tied weights stay tied. Everything is written to a temp directory that replaces `directory` only when
    complete; nothing existing is touched on failure.

    A quantized base (bitsandbytes 4-bit / 8-bit) is written in full precision (its quantization_config dropped):
    every quantized layer dequantized, adapted ones with the update added exactly (`dtype` to pick the precision).
    `requantize=True` writes the adapted layers quantized again in their own format instead, beside the others'
    quantized weights, with the model's quantization_config (the rounding error is logged per layer).
    """
    name = adapter_name or pm.active_adapter
    if name not in pm.adapters:
        raise UnknownAdapter(name, pm.adapters)
    return write_merged(pm.store[name], name, pm.sites, pm.base_model, pm.config, pm.model_class, directory,
                        dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                        requantize=requantize)


def write_merged(adapter: Adapter, name: str, sites: dict, model: nn.Module, config: Any, model_class: str,
                 directory, *, dtype: Any = None, max_shard_size: Any = "2GB", overwrite: bool = False,
                 progress: bool = True, requantize: bool = False) -> Path:
    """export_merged from data: `adapter` (named `name`) folded at `sites` into the weights of `model` (the user's
    model, whose state dict gives the key names and tied tensors), written with `config` as `model_class`."""
    from tqdm.auto import tqdm

    if not hasattr(model, "save_pretrained") or config is None:
        raise ExportError(f"{model_class} is not a Hugging Face model; use pm.export(path) for a .pt2 program")
    dtype = parse_dtype(dtype)
    limit = parse_size(max_shard_size)
    out = Path(directory)
    _check_target(out, overwrite)
    plan, untied = _state_plan(adapter, name, sites, model, model_class, requantize)
    if requantize and dtype is not None:
        raise ExportError("requantize=True writes the quantized layers in their own format; dtype applies to a "
                          "full-precision export: pass one or the other")

    # shard plan from sizes alone, so file names are known before any tensor is computed
    shards: list[list[tuple[str, Any]]] = [[]]
    used = 0
    for k, how in plan:
        n = _size(how[-1] if isinstance(how, tuple) else how, dtype)
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append((k, how))
        used += n
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.peftc-tmp-", dir=out.parent))
    try:
        cfg = copy.deepcopy(config)
        cfg.architectures = [model_class]
        if not requantize and _quantized_layers(model) and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config          # the weights written are full precision
        if dtype is not None:
            cfg.dtype = dtype
        if untied:
            log.warning("an adapted layer shares its weight with another (tied embeddings); the merged weights are "
                        "written untied and config.tie_word_embeddings is set to False")
            cfg.tie_word_embeddings = False
        cfg.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and model.can_generate():
            gen.save_pretrained(tmp)
        weight_map: dict[str, str] = {}
        total = 0
        bar = tqdm(total=len(plan), desc="exporting merged weights", unit="tensor", disable=not progress)
        cache: dict = {}
        for fname, shard in zip(files, shards):
            tensors = {}
            for k, how in shard:
                tensors[k] = _materialize(how, adapter, name, dtype, cache)
                total += tensors[k].numel() * tensors[k].itemsize
                weight_map[k] = fname
                bar.update()
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            del tensors
        bar.close()
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d tensors in %d file(s) to %s", len(plan), len(files), out)
    return out


def _size(t: torch.Tensor, dtype) -> int:
    return t.numel() * ((dtype if dtype is not None and t.is_floating_point() else t.dtype).itemsize)


def _program(module: GraphModel, names: list[str], positional: bool) -> nn.Module:
    """What torch.export sees: the module called with the model's own inputs, spelled out as named parameters
    (trace-time constants such as use_cache=False are filled in by the module)."""
    params = ", ".join(names)
    call = params if positional else ", ".join(f"{n}={n}" for n in names)
    scope: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self.inner({call})\n", scope)  # noqa: S102 - our own names
    cls = type("Program", (nn.Module,), {"forward": scope["forward"]})
    prog = cls()
    prog.inner = module
    return prog


def export_program(module: GraphModel, path) -> Path:
    """torch.export `module` (eval mode) with dynamic batch and sequence and save it atomically to `path`."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"cannot write the program to {path}: it is a directory; pass a file path such as model.pt2")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write the program to {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write the program to {path}: {parent} is not writable")
    t = module._traced
    args, kwargs = t.example
    kwargs = {k: v for k, v in kwargs.items() if k not in t.constants}
    if t.positional:
        prog = _program(module, [f"arg{i}" for i in range(len(args))], positional=True)
        dyn = tuple(t.dynamic)
    else:
        names = [n for n in t.input_names if n not in t.constants]
        prog = _program(module, names, positional=False)
        dyn = {k: v for k, v in t.dynamic.items() if k not in t.constants}
    was = module.training
    module.eval()
    try:
        ep = export_with_fallback(prog, args, kwargs, dyn)
    finally:
        module.train(was)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.pt2", dir=path.parent)
    os.close(fd)
    try:
        torch.export.save(ep, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
