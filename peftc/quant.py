"""Quantized bases: bitsandbytes' 4-bit and 8-bit linear layers as peftc's own custom ops.

torch.export cannot trace bitsandbytes' weight subclasses (Params4bit, Int8Params), so while a model is traced each
bitsandbytes layer is stood in by a module (`stand_in`) that calls one of these ops on plain tensors that share the
layer's storage (nothing is copied, nothing is kept dequantized):

    peftc::linear_4bit(x, packed, absmax, nested_absmax?, nested_code?, nested_offset?, bias?,
                       out_features, in_features, blocksize, quant_type, compute_dtype) -> y
    peftc::linear_8bit(x, CB, SCB, bias?, threshold, training) -> y
    peftc::dequantize_4bit(packed, absmax, nested_absmax?, nested_code?, nested_offset?,
                           out_features, in_features, blocksize, quant_type, dtype) -> W   (DoRA's norm, merge)

Each op computes what the bitsandbytes layer computes (4-bit: dequantize in the compute dtype, then linear; 8-bit:
LLM.int8(), activations quantized per row, outlier columns above `threshold` in fp16; in train mode on a CPU the
dequantized weight's matmul, as bitsandbytes does there) through bitsandbytes' own kernels, and has its own backward: dL/dx = dL/dy W, with W dequantized again in the backward, so autograd keeps no
dequantized weight and no activation for the base layer. The ops are opaque to torch.compile (no graph break).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SpecError
from .quant_math import bitsandbytes_module

QUANT_TYPES = ("nf4", "fp4", "int8")
NESTED_BLOCKSIZE = 256      # bitsandbytes' double quantization: absmax in 8-bit blocks of 256


def bnb():
    """bitsandbytes, imported when a quantized model is first met (it registers the torch.ops.bitsandbytes kernels);
    MissingDependency with the install command where it is absent."""
    return bitsandbytes_module("a model with bitsandbytes layers")


# --- the ops ----------------------------------------------------------------------------------------------------------
def _absmax(absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
            nested_offset: Optional[Tensor]) -> Tensor:
    """The per-block scales: absmax itself, or with double quantization its 8-bit codes dequantized."""
    if nested_absmax is None:
        return absmax
    bnb()
    return torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, nested_absmax, nested_code, NESTED_BLOCKSIZE,
                                                               torch.float32) + nested_offset


@torch.library.custom_op("peftc::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                    nested_offset: Optional[Tensor], out_features: int, in_features: int, blocksize: int,
                    quant_type: str, dtype: torch.dtype) -> Tensor:
    """W [out_features, in_features] in `dtype` from its packed 4-bit codes (two per byte) and block scales.

    The codes are dequantized as one flat run and then viewed as [out, in]: bitsandbytes blocks W in memory order
    whatever its shape, but its CPU kernel (0.50) given the shape [out, in] is wrong for some rows that are not a
    whole number of blocks ([64, 32] and [512, 1376] come back off by up to a block's absmax)."""
    return _dequantize_4bit(packed, absmax, nested_absmax, nested_code, nested_offset, out_features, in_features,
                            blocksize, quant_type, dtype)


def _dequantize_4bit(packed, absmax, nested_absmax, nested_code, nested_offset, out_features, in_features,
                     blocksize, quant_type, dtype) -> Tensor:
    """peftc::dequantize_4bit's body, called directly where a custom op's body needs W (no second dispatch)."""
    bnb()
    scales = _absmax(absmax, nested_absmax, nested_code, nested_offset)
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(packed.view(-1, 1), scales, blocksize, quant_type,
                                                          [out_features * in_features], dtype)
    return flat.view(out_features, in_features)


@dequantize_4bit.register_fake
def _(packed, absmax, nested_absmax, nested_code, nested_offset, out_features, in_features, blocksize, quant_type,
      dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)


@torch.library.custom_op("peftc::linear_4bit", mutates_args=())
def linear_4bit(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                nested_code: Optional[Tensor], nested_offset: Optional[Tensor], bias: Optional[Tensor],
                out_features: int, in_features: int, blocksize: int, quant_type: str,
                compute_dtype: torch.dtype) -> Tensor:
    """bitsandbytes' Linear4bit: linear(x, W, b) in `compute_dtype`, returned in x's dtype."""
    w = _dequantize_4bit(packed, absmax, nested_absmax, nested_code, nested_offset, out_features, in_features,
                         blocksize, quant_type, compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    return F.linear(x.to(compute_dtype), w, b).to(x.dtype)


@linear_4bit.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, nested_offset, bias, out_features, in_features, blocksize,
      quant_type, compute_dtype):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_4bit(ctx, inputs, output) -> None:
    x, packed, absmax, na, nc, no, bias, out_f, in_f, bs, qt, cd = inputs
    ctx.save_for_backward(packed, absmax, na, nc, no)     # the layer's own buffers: no activation is kept
    ctx.meta = (out_f, in_f, bs, qt, cd, x.dtype, None if bias is None else bias.dtype)


def _backward_4bit(ctx, grad: Tensor):
    packed, absmax, na, nc, no = ctx.saved_tensors
    out_f, in_f, bs, qt, cd, x_dtype, bias_dtype = ctx.meta
    gx = gb = None
    if ctx.needs_input_grad[0]:
        w = dequantize_4bit(packed, absmax, na, nc, no, out_f, in_f, bs, qt, cd)
        gx = (grad.to(cd) @ w).to(x_dtype)
    if ctx.needs_input_grad[6]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return gx, None, None, None, None, None, gb, None, None, None, None, None


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


def dequantize_8bit(CB: Tensor, SCB: Tensor, dtype: torch.dtype) -> Tensor:
    """W = CB * SCB / 127 per row (bitsandbytes' int8_vectorwise_dequant), in `dtype`."""
    return (CB.to(torch.float32) * (SCB.to(torch.float32) * (1.0 / 127.0)).unsqueeze(1)).to(dtype)


@torch.library.custom_op("peftc::linear_8bit", mutates_args=())
def linear_8bit(x: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float,
                training: bool) -> Tensor:
    """bitsandbytes' Linear8bitLt (inference weights), returned in x's dtype: the LLM.int8() matmul; in training on a
    CPU, the dequantized weight's matmul (bitsandbytes' MatMul8bitFp, what the layer does in train mode there)."""
    bnb()
    shape = x.shape
    a = x.reshape(-1, shape[-1])
    b = bias.to(x.dtype) if bias is not None else None
    if training and x.device.type in ("cpu", "xpu"):
        w = CB.to(x.dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
        return F.linear(x, w, b)
    ca, sca, outliers = torch.ops.bitsandbytes.int8_vectorwise_quant.default(a.to(torch.float16), threshold)
    if threshold > 0.0:
        y, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm.default(a, ca, CB, sca, SCB, outliers, b)
    else:
        y = torch.ops.bitsandbytes.int8_scaled_mm.default(ca, CB, sca, SCB, bias=b, dtype=a.dtype)
    return y.to(x.dtype).reshape(*shape[:-1], CB.shape[0])


@linear_8bit.register_fake
def _(x, CB, SCB, bias, threshold, training):
    return x.new_empty((*x.shape[:-1], CB.shape[0]))


def _setup_8bit(ctx, inputs, output) -> None:
    x, CB, SCB, bias, _, _ = inputs
    ctx.save_for_backward(CB, SCB)
    ctx.meta = (x.dtype, None if bias is None else bias.dtype)


def backward_weight_8bit(CB: Tensor, SCB: Tensor, dtype: torch.dtype) -> Tensor:
    """W as linear_8bit's backward multiplies with it: CB * SCB / 127 per row, computed in `dtype` (x's)."""
    return CB.to(dtype).mul_((SCB * (1.0 / 127.0)).unsqueeze(1).to(dtype))


def _backward_8bit(ctx, grad: Tensor):
    CB, SCB = ctx.saved_tensors
    x_dtype, bias_dtype = ctx.meta
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = grad.to(x_dtype) @ backward_weight_8bit(CB, SCB, x_dtype)
    if ctx.needs_input_grad[3]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
    return gx, None, None, gb, None, None


linear_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)

OPS_4BIT = (torch.ops.peftc.linear_4bit.default,)
OPS_8BIT = (torch.ops.peftc.linear_8bit.default,)


def dense_from_args(op, args: list, dtype: torch.dtype) -> Tensor:
    """W [out, in] in `dtype` from the arguments of a call of one of the ops above (tensors in place of nodes)."""
    if op in OPS_8BIT:
        return dequantize_8bit(args[1], args[2], dtype)
    _, packed, absmax, na, nc, no, _, out_f, in_f, bs, qt, _ = args
    return dequantize_4bit(packed, absmax, na, nc, no, out_f, in_f, bs, qt, dtype)


# --- what a quantized weight is -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QuantWeight:
    """A quantized layer's weight as plain tensors that share its storage: `tensors` by buffer name, in the order the
    layer's op takes them, and the op's constant arguments."""

    kind: str                    # "linear4bit" | "linear8bit"
    quant_type: str              # nf4 | fp4 | int8
    out_features: int
    in_features: int
    tensors: dict                # buffer name -> tensor (None where absent: no double quantization)
    consts: tuple                # the op's arguments after the bias

    def dense(self, dtype: torch.dtype) -> Tensor:
        """W [out, in] dequantized in `dtype` (a new tensor)."""
        t = self.tensors
        if self.kind == "linear8bit":
            return dequantize_8bit(t["weight"], t["weight_scb"], dtype)
        out_f, in_f, bs, qt, _ = self.consts
        return dequantize_4bit(t["weight"], t["weight_absmax"], t.get("weight_nested_absmax"),
                               t.get("weight_nested_code"), t.get("weight_nested_offset"), out_f, in_f, bs, qt, dtype)


def quantized_state(like: QuantWeight, w: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """W quantized again in the format of `like`, as bitsandbytes' layer writes it into a state dict (keys relative
    to the layer: "weight", and "weight.absmax", "weight.quant_map", ... or "SCB", "weight_format"), and that
    quantization dequantized (to measure its error)."""
    b = bnb()
    if like.kind == "linear8bit":
        cb, scb, _ = b.functional.int8_vectorwise_quant(w.to(torch.float16))
        entries = {"weight": cb, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}
        return entries, dequantize_8bit(cb, scb, w.dtype)
    _, _, bs, qt, _ = like.consts
    packed, state = b.functional.quantize_4bit(w.contiguous(), blocksize=bs,
                                               compress_statistics="weight_nested_absmax" in like.tensors,
                                               quant_type=qt)
    entries = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    nested = state.state2
    again = dequantize_4bit(packed, state.absmax, None if nested is None else nested.absmax,
                            None if nested is None else nested.code, None if nested is None else state.offset,
                            like.out_features, like.in_features, bs, qt, w.dtype)
    return entries, again


def quant_kind(layer: nn.Module) -> str | None:
    """"linear4bit" / "linear8bit" for a bitsandbytes linear layer, else None (bitsandbytes is not imported here
    unless the model already did)."""
    import sys

    if "bitsandbytes" not in sys.modules:
        return None
    mods = sys.modules["bitsandbytes"].nn
    if isinstance(layer, mods.Linear4bit):
        return "linear4bit"
    if isinstance(layer, mods.Linear8bitLt):
        return "linear8bit"
    return None


def logical_numel(p: Tensor) -> int:
    """The parameters a tensor stands for: a 4-bit weight packs two per byte (as PEFT counts them)."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def _plain(t: Tensor | None) -> Tensor | None:
    """The tensor as a plain torch.Tensor over the same storage (bitsandbytes' Parameter subclasses are not
    traceable)."""
    return None if t is None else t.detach().as_subclass(torch.Tensor)


def quant_weight(path: str, layer: nn.Module, x_dtype: torch.dtype | None = None) -> QuantWeight:
    """The QuantWeight of bitsandbytes layer `layer` at `path`; a layer peftc cannot serve gets a SpecError that says
    why."""
    kind = quant_kind(layer)
    w = layer.weight
    if kind == "linear4bit":
        s = getattr(w, "quant_state", None)
        if s is None:
            raise SpecError(f"4-bit layer {path} has no quantization state (its weight was never quantized: move the "
                            "model to its device, or load it with from_pretrained(quantization_config=...))")
        if getattr(s, "packing_format_for_cpu", False):
            raise SpecError(f"4-bit layer {path} was repacked by bitsandbytes for CPU inference (the model ran a "
                            "forward in eval mode on an AVX512-BF16 CPU), a layout peftc does not read; compile the "
                            "model before running it in eval mode, or load it again")
        if s.quant_type not in ("nf4", "fp4"):
            raise SpecError(f"4-bit layer {path} has quant_type {s.quant_type!r}; peftc knows "
                            f"{', '.join(QUANT_TYPES)}")
        if s.nested and s.state2.blocksize != NESTED_BLOCKSIZE:
            raise SpecError(f"4-bit layer {path} double-quantizes its scales in blocks of {s.state2.blocksize}; "
                            f"peftc knows bitsandbytes' {NESTED_BLOCKSIZE}")
        out_f, in_f = (int(d) for d in s.shape)
        tensors = {"weight": _plain(w), "weight_absmax": s.absmax}
        if s.nested:
            offset = s.offset if isinstance(s.offset, Tensor) else torch.tensor(float(s.offset))
            tensors.update(weight_nested_absmax=s.state2.absmax, weight_nested_code=s.state2.code,
                           weight_nested_offset=offset)
        cd = _compute_dtype(getattr(layer, "compute_type_is_set", False), layer.compute_dtype, x_dtype)
        return QuantWeight(kind, s.quant_type, out_f, in_f, tensors, (out_f, in_f, int(s.blocksize), s.quant_type, cd))
    if kind == "linear8bit":
        if layer.state.has_fp16_weights:
            raise SpecError(f"8-bit layer {path} keeps fp16 training weights (has_fp16_weights=True); peftc serves "
                            "8-bit inference weights (load_in_8bit=True, the default)")
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = layer.state.SCB
        if scb is None or w.dtype != torch.int8:
            raise SpecError(f"8-bit layer {path} has no int8 weight yet (move the model to its device, or load it "
                            "with from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True)))")
        out_f, in_f = w.shape
        return QuantWeight(kind, "int8", int(out_f), int(in_f), {"weight": _plain(w), "weight_scb": scb},
                           (float(layer.state.threshold),))
    raise SpecError(f"{path} ({type(layer).__name__}) is not a bitsandbytes linear layer peftc knows "
                    "(Linear4bit with nf4 / fp4, Linear8bitLt)")


def _compute_dtype(is_set: bool, configured: torch.dtype | None, x_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype Linear4bit computes in: its compute_dtype once set; before its first call, the input's dtype where
    that is float32 or bfloat16 (bitsandbytes' set_compute_type), else the configured one."""
    if is_set and configured is not None:
        return configured
    if x_dtype in (torch.float32, torch.bfloat16) or configured is None:
        return x_dtype or torch.float32
    return configured


# --- stand-ins while tracing --------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Stands in for a bitsandbytes linear layer while the model is traced: the same bias Parameter and the
    layer's quantized tensors as buffers (shared storage), calling peftc's op."""

    def __init__(self, path: str, layer: nn.Module):
        super().__init__()
        q = quant_weight(path, layer)
        self.layer_kind, self.consts = q.kind, q.consts
        self.compute = (getattr(layer, "compute_type_is_set", False), getattr(layer, "compute_dtype", None))
        self.bias = layer.bias
        self._names: list[str] = []
        for name, t in q.tensors.items():
            self.register_buffer(name, t)
            self._names.append(name)

    def forward(self, x: Tensor) -> Tensor:
        t = [getattr(self, n) for n in self._names]
        if self.layer_kind == "linear8bit":
            # traced in train mode; passes.dropout makes the flag follow the module's mode
            return torch.ops.peftc.linear_8bit(x, t[0], t[1], self.bias, *self.consts, self.training)
        nested = t[2:] if len(t) > 2 else [None, None, None]
        return torch.ops.peftc.linear_4bit(x, t[0], t[1], *nested, self.bias, *self.consts[:-1],
                                           _compute_dtype(*self.compute, x.dtype))


class Linear4bit(QuantLinear):
    """Stands in for bitsandbytes.nn.Linear4bit (the name a site's module type shows)."""


class Linear8bitLt(QuantLinear):
    """Stands in for bitsandbytes.nn.Linear8bitLt."""


STAND_INS = {"linear4bit": Linear4bit, "linear8bit": Linear8bitLt}


def _check_method(model: nn.Module) -> None:
    """A model quantized by something other than bitsandbytes gets an error that says what peftc knows."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)
    if method is not None and str(method) != "bitsandbytes":
        raise SpecError(f"this model is quantized with {method!r}; peftc knows bitsandbytes quantization "
                        f"(4-bit nf4 / fp4 with or without double quantization, 8-bit LLM.int8()): load the model "
                        "with BitsAndBytesConfig, or in full precision")


def _check_rest(model: nn.Module, served: set[str]) -> None:
    """Quantized weights outside the layers peftc stands in (bitsandbytes' 4-bit embeddings, ...) are refused by
    name: they cannot be traced."""
    if "bitsandbytes" not in __import__("sys").modules:
        return
    nn_ = __import__("sys").modules["bitsandbytes"].nn
    kinds = tuple(k for k in (getattr(nn_, "Params4bit", None), getattr(nn_, "Int8Params", None)) if k is not None)
    for path, m in model.named_modules():
        if path in served:
            continue
        for name, p in m.named_parameters(recurse=False):
            if isinstance(p, kinds):
                raise SpecError(f"{path or '<root>'} ({type(m).__name__}) holds a bitsandbytes-quantized {name}; "
                                "peftc serves quantized Linear4bit and Linear8bitLt layers only: keep this module "
                                "out of quantization (BitsAndBytesConfig(llm_int8_skip_modules=[...]))")


def _check_backend(found: list[tuple[str, nn.Module]]) -> None:
    """One layer of each kind and device dequantized once: a bitsandbytes build without kernels for that device
    fails here, by name, instead of in the middle of tracing."""
    seen = set()
    for path, layer in found:
        key = (quant_kind(layer), layer.weight.device.type)
        if key in seen:
            continue
        seen.add(key)
        try:
            q = quant_weight(path, layer)
            t = q.tensors
            if q.kind == "linear4bit":
                dequantize_4bit(t["weight"], t["weight_absmax"], t.get("weight_nested_absmax"),
                                t.get("weight_nested_code"), t.get("weight_nested_offset"), *q.consts[:4],
                                torch.float32)
            else:
                bnb()
                torch.ops.bitsandbytes.int8_vectorwise_quant.default(
                    torch.zeros(1, q.in_features, dtype=torch.float16, device=layer.weight.device), 0.0)
        except SpecError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the culprit named
            b = bnb()
            raise SpecError(f"bitsandbytes {getattr(b, '__version__', '?')} cannot run {key[0]} layer {path} on "
                            f"{key[1]}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; install a "
                            f"bitsandbytes build with the {key[1]} backend") from e


@contextlib.contextmanager
def stand_in(model: nn.Module) -> Iterator[dict[str, str]]:
    """Within the block, every bitsandbytes linear layer of `model` is a QuantLinear (yields path -> kind); the
    model's own layers are back in place afterwards, whatever happened."""
    _check_method(model)
    found = [(path, m) for path, m in model.named_modules() if quant_kind(m) is not None]
    _check_rest(model, {path for path, _ in found})
    _check_backend(found)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, layer in found:
            owner, _, leaf = path.rpartition(".")
            parent = model.get_submodule(owner) if owner else model
            standin = STAND_INS[quant_kind(layer)](path, layer)
            parent._modules[leaf] = standin
            swapped.append((parent, leaf, layer))
        yield {path: quant_kind(layer) for path, layer in found}
    finally:
        for parent, leaf, layer in reversed(swapped):
            parent._modules[leaf] = layer
