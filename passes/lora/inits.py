"""PEFT's LoRA initialisations beyond True/False/"gaussian": PiSSA, OLoRA, orthogonal and LoftQ.

All weights are in nn.Linear's [out, in] layout; `scale` is the adapter's scaling (alpha / r, or alpha / sqrt(r) with
rsLoRA), so the adapter adds scale * B @ A. Everything is computed in float32 and cast back to the weight's dtype, as
PEFT does; PiSSA and OLoRA accept float32, float16 and bfloat16 weights only (PEFT raises on any other dtype).

- "pissa":  W = U S V^T (full SVD);  S_r' = S[:r] / scale;  A = diag(sqrt(S_r')) V^T[:r],
  B = U[:, :r] diag(sqrt(S_r')), so scale * B @ A is the top-r singular part of W; the base weight becomes
  W - scale * B @ A.
- "pissa_niter_N": the same with U, S, V from torch.svd_lowrank(W, q=r, niter=N); it draws one randn(min(out, in), r)
  from the global generator of W's device.
- "olora":  W = Q R (reduced QR);  A = R[:r],  B = Q[:, :r] (no division by scale);  base weight W - scale * B @ A.
- "loftq" (arXiv:2310.08659, loftq_bits b, loftq_iter N):  starting from B A = 0, N times: Q = quant_b(W - B A)
  (peftc.quant_math: nf4 for b = 4, int8 for b = 8), then B = U[:, :r] diag(sqrt(S[:r])), A = diag(sqrt(S[:r]))
  Vh[:r] from W - Q = U S Vh (torch.linalg.svd, full_matrices=False); the base weight becomes Q (the last one), which
  the adapter then runs on. As in PEFT, B A approximates W - Q without the scale: a LoftQ adapter with
  scale != 1 (lora_alpha != r) adds s B A ~ s (W - Q), and the layer no longer starts at W.
- "orthogonal": Q from the QR of X ~ randn(r, r);  A = (randn(in, r/2) @ Q[0::2]).T / 10,
  B = randn(r/2, out).T @ Q[1::2] / 10 (r must be even). B @ A is zero up to rounding (the rows of Q are orthogonal),
  so the base weight is left unchanged. The three randn draws come from the global CPU generator, in that order.

Random-number parity: PEFT builds lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out) (one kaiming_uniform_ draw
each, A first) before it calls these initialisations, so a caller who wants PEFT's numbers for "pissa_niter_N" and
"orthogonal" must make those two draws first, layer by layer in PEFT's order.

GPT-2's Conv1D stores [in, out]: transpose before and after residual_init. PEFT does that for PiSSA but not for OLoRA,
whose QR runs on the stored [in, out] matrix: its adapter then fails at the forward unless in == out, and even then
the layer no longer computes what it did. Matching that means passing the stored weight untransposed (square layers
only); refusing OLoRA on Conv1D is the sound choice.
"""
from __future__ import annotations

import difflib
import math

import torch

from peftc.errors import SpecError

INITS = (True, False, "gaussian", "pissa", "pissa_niter_<N>", "olora", "orthogonal", "loftq")
LOFTQ_BITS = (4, 8)           # nf4, int8 (PEFT: "Only nf4 and int8 quantization is supported")
RESIDUAL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NITER = "pissa_niter_"
_NEEDS_DATA = {
    "corda": "CorDA needs covariance statistics from calibration data (PEFT's preprocess_corda)",
    "eva": "EVA needs the SVD of layer inputs computed from data (PEFT's initialize_lora_eva_weights)",
    "lora_ga": "LoRA-GA needs gradients computed from data (PEFT's preprocess_loraga)",
}


def parse_init(value: object) -> bool | str:
    """`value` (LoraConfig.init_lora_weights) normalised as PEFT reads it: True, False, "gaussian", "pissa",
    "pissa_niter_<N>" (N a non-negative integer, written without leading zeros), "olora", "orthogonal" or "loftq".

    Like PEFT, "gaussian" and "olora" match in any case and "pissa", "orthogonal", "loftq" only in lower case. PEFT
    also takes anything int() reads as N ("pissa_niter_-1" runs as niter=0, "pissa_niter_ 3" as 3); these are refused
    here, as PEFT's documentation asks for a non-negative integer."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise SpecError(f"LoRA init must be a bool or a string, got init={value!r} ({type(value).__name__}); "
                        f"use one of {_choices()}")
    lower = value.lower()
    if lower in ("gaussian", "olora"):
        return lower
    if value in ("pissa", "orthogonal", "loftq"):
        return value
    if value.startswith(_NITER):
        n = value[len(_NITER):]
        if n.isascii() and n.isdigit():
            return f"{_NITER}{int(n)}"
        raise SpecError(f"LoRA init {value!r}: the number of subspace iterations after {_NITER!r} must be a "
                        f"non-negative integer, e.g. 'pissa_niter_4'")
    name = "corda" if lower.startswith("corda") else lower
    if name in _NEEDS_DATA:
        raise SpecError(f"LoRA init {value!r} is not supported yet: {_NEEDS_DATA[name]}; use one of the data-free "
                        f"inits {_choices()}")
    if lower == "mica":
        raise SpecError(f"LoRA init {value!r} is not supported yet: MiCA freezes B during training, a LoRA variant "
                        f"peftc does not have; use one of {_choices()}")
    close = difflib.get_close_matches(lower, ["gaussian", "pissa", _NITER + "4", "olora", "orthogonal", "loftq"],
                                      n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise SpecError(f"unknown LoRA init {value!r}{hint} (PEFT would refuse it); use one of {_choices()}")


def changes_base_weight(init: bool | str) -> bool:
    """Whether the (normalised) init replaces the base weight by a residual W - s B A: PiSSA and OLoRA do; LoftQ
    replaces it by a quantized weight (loftq_init); the others leave it."""
    return isinstance(init, str) and (init == "olora" or init == "pissa" or init.startswith(_NITER))


@torch.no_grad()
def residual_init(init: str, weight: torch.Tensor, r: int, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], residual base weight [out, in]) for init "pissa", "pissa_niter_<N>" or "olora", all in
    weight's dtype and device, with weight == residual + scale * B @ A up to rounding (exactly so in float32 math).
    `weight` is [out, in] (transpose a Conv1D weight before and the residual after)."""
    init = parse_init(init)
    if not changes_base_weight(init):
        raise SpecError(f"residual_init takes 'pissa', 'pissa_niter_<N>' or 'olora', got init={init!r}; "
                        f"{init!r} leaves the base weight unchanged")
    if weight.dim() != 2:
        raise SpecError(f"LoRA init {init!r} needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in RESIDUAL_DTYPES:
        raise SpecError(f"LoRA init {init!r} needs a float32, float16 or bfloat16 weight (PEFT refuses others), got "
                        f"{weight.dtype}; cast the model to float32 first")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(weight.shape):
        raise SpecError(f"LoRA init {init!r} needs 1 <= r <= min(out, in) = {min(weight.shape)} for a weight of shape "
                        f"{tuple(weight.shape)}, got r={r!r}; lower r (PEFT would silently shrink the adapter)")
    if not math.isfinite(scale) or (init != "olora" and scale <= 0):
        raise SpecError(f"LoRA init {init!r} needs a finite{'' if init == 'olora' else ', positive'} scale "
                        f"(lora_alpha / r), got scale={scale!r}; use a positive lora_alpha")
    w = weight.detach().to(torch.float32)
    if init == "olora":
        Q, R = torch.linalg.qr(w)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    else:
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, V = torch.svd_lowrank(w, r, niter=int(init[len(_NITER):]))
            Vh = V.t()
        root = torch.diag(torch.sqrt(S / scale))
        A, B = root @ Vh, U @ root
    residual = w - scale * B @ A
    return A.to(weight.dtype), B.to(weight.dtype), residual.to(weight.dtype)


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r], quantized-dequantized base weight [out, in]) for init "loftq" (see the module
    docstring), computed in float32 on weight's device and returned in weight's dtype. `weight` is [out, in]."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LOFTQ_BITS:
        raise SpecError(f"loftq_bits must be 4 (nf4) or 8 (int8), got loftq_bits={bits!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise SpecError(f"loftq_iter must be an integer >= 1, got loftq_iter={iters!r}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise SpecError(f"LoRA init 'loftq' needs a 2-D floating-point [out, in] weight, got shape "
                        f"{tuple(weight.shape)}, dtype {weight.dtype}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(weight.shape):
        raise SpecError(f"LoRA init 'loftq' needs 1 <= r <= min(out, in) = {min(weight.shape)} for a weight of shape "
                        f"{tuple(weight.shape)}, got r={r!r}; lower r (PEFT would silently shrink the adapter)")
    from peftc.quant_math import int8_roundtrip, nf4_roundtrip

    quantize = nf4_roundtrip if bits == 4 else int8_roundtrip
    w = weight.detach().to(torch.float32)
    target = w                                      # what Q approximates: W - B A, with B A = 0 at first
    for i in range(iters):
        Q = quantize(target)
        A, B = top_r(w - Q, r)
        if i + 1 < iters:
            target = w - B @ A
    return A.to(weight.dtype), B.to(weight.dtype), Q.to(weight.dtype)


@torch.no_grad()
def top_r(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B @ A the top-r part of `residual` ([out, in], float32):
    residual = U S Vh (torch.linalg.svd, full_matrices=False),  B = U[:, :r] diag(sqrt(S[:r])),
    A = diag(sqrt(S[:r])) Vh[:r]  (one LoftQ step; also peftc.loftq's, on a base already quantized)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(S[:r])
    return root[:, None] * Vh[:r], U[:, :r] * root


@torch.no_grad()
def orthogonal_init(in_features: int, out_features: int, r: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) for init "orthogonal", drawn from the global CPU generator and then moved to `device`
    and cast to `dtype` (the base weight's); the base weight is left unchanged. r must be even."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 2 or r % 2:
        raise SpecError(f"LoRA init 'orthogonal' needs an even rank r >= 2, got r={r!r}; use an even r")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    A = torch.randn(in_features, r // 2).mm(Q[0::2]).T / 10.0
    B = torch.randn(r // 2, out_features).T.mm(Q[1::2]) / 10.0
    return A.contiguous().to(device=device, dtype=dtype), B.contiguous().to(device=device, dtype=dtype)


def _choices() -> str:
    return ", ".join(map(repr, INITS))
