"""Quantize-dequantize round trips through bitsandbytes (nf4, int8), as LoftQ (passes.lora.inits.loftq_init) uses them.

Each function returns what a bitsandbytes layer would compute with, in float32, on the weight's device:

- nf4_roundtrip(w):  bitsandbytes.functional.quantize_4bit(w, blocksize=64, compress_statistics=False,
  quant_type="nf4"), then dequantize_4bit: blocks of 64 consecutive elements (in memory order), each scaled by its
  absmax and rounded to the nearest of the 16 NormalFloat levels (what Params4bit(..., compress_statistics=False,
  quant_type="nf4") holds, and what PEFT's loftq_init quantizes with).
- int8_roundtrip(w): int8_vectorwise_quant(w in float16) (per row: round(127 w / absmax)), then
  int8_vectorwise_dequant (what Int8Params holds: it casts the weight to float16 first).

bitsandbytes is imported when a function is first called; without it they raise MissingDependency.

bitsandbytes 0.50's CPU kernel for dequantize_4bit reads the packed data row by row, which is wrong when a row's
length is not a multiple of the block size (a [64, 32] weight comes back with errors near its absmax); its fallback for
an odd last dimension is right but torch.compiles itself once per shape. Both are avoided by quantizing the flattened
weight (the same blocks: bitsandbytes blocks the memory order, whatever the shape) padded to an even length with one
zero (which joins the last block without raising its absmax; bitsandbytes pads the same way before packing).
"""
from __future__ import annotations

import torch

from peftc.errors import MissingDependency

NF4_BLOCKSIZE = 64
INSTALL = "pip install bitsandbytes  (or: pip install 'peftc[quant]')"


def bitsandbytes_module(option: str = "quantization"):
    """bitsandbytes, imported; MissingDependency naming `option` (what needs it) and the install command if absent."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise MissingDependency(f"{option} needs bitsandbytes, which is not installed ({e}); {INSTALL}") from None
    return bitsandbytes


@torch.no_grad()
def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """w quantized to nf4 (blocks of 64, no double quantization) and dequantized: float32, w's shape and device."""
    F = bitsandbytes_module("nf4 quantization").functional
    flat = w.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    if n % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    packed, state = F.quantize_4bit(flat.contiguous(), blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                    quant_type="nf4")
    return F.dequantize_4bit(packed, state).reshape(-1)[:n].view(w.shape)


@torch.no_grad()
def int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """w ([out, in]) quantized to int8 per row (LLM.int8()'s vector-wise quantization of w in float16, no outlier
    threshold) and dequantized: float32, w's shape and device."""
    F = bitsandbytes_module("int8 quantization").functional
    if w.dim() != 2:
        raise ValueError(f"int8_roundtrip quantizes the rows of a 2-D weight, got shape {tuple(w.shape)}")
    q, row_absmax, _ = F.int8_vectorwise_quant(w.detach().to(torch.float16).contiguous())
    return F.int8_vectorwise_dequant(q, row_absmax).to(torch.float32)
