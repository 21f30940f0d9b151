"""LoftQ's init (passes/lora/inits.py loftq_init) and its nf4 / int8 round trips (peftc/quant_math.py) against PEFT
0.21.2's own loftq_init (peft/utils/loftq_utils.py) and bitsandbytes' own layers, run on the CPU (tests/peft_cpu.py
keeps PEFT's "cuda" tensors there); the spec's LoftQ options and their adapter_config.json form; the refusals."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import LoftQConfig
from peft.utils.loftq_utils import loftq_init as peft_loftq_init

import peftc
from peftc.errors import MissingDependency, SpecError
from peftc.passes.lora.inits import loftq_init
from peftc.passes.lora.spec import lora_from_config, lora_to_config
from peftc.quant_math import int8_roundtrip, nf4_roundtrip
from tests.peft_cpu import cuda_as_cpu

# odd shapes (a partial last block of 64, an odd element count), and rows of a multiple of 64
SHAPES = [(33, 17), (17, 33), (32, 64), (48, 128)]
CLOSE = dict(rtol=0, atol=1e-6)


def weight(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def peft(w: torch.Tensor, bits: int, r: int, iters: int):
    """PEFT's (A, B, quantized weight) from its own loftq_init (it returns qweight, lora_A, lora_B)."""
    with cuda_as_cpu():
        q, A, B = peft_loftq_init(w, num_bits=bits, reduced_rank=r, num_iter=iters)
    return A, B, q


# --- the init against PEFT's loftq_init ---------------------------------------------------------------------------

@pytest.mark.parametrize("iters", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_loftq_init_equals_peft(shape, bits, iters):
    w = weight(shape)
    A, B, q = loftq_init(w, 4, bits, iters)
    eA, eB, eq = peft(w, bits, 4, iters)
    assert A.shape == (4, shape[1]) and B.shape == (shape[0], 4) and q.shape == w.shape
    torch.testing.assert_close(q, eq, **CLOSE)          # the quantized-dequantized base weight
    torch.testing.assert_close(A, eA, **CLOSE)          # the SVD's signs and scaling as PEFT's
    torch.testing.assert_close(B, eB, **CLOSE)
    assert (q - w).abs().max() > 1e-3                   # the base weight did change
    # B A is the top-r part of W - Q, without the LoRA scale: it shrinks the quantization error
    assert (w - q - B @ A).norm() < (w - q).norm()


def test_more_iterations_fit_the_weight_better_and_rank_is_full_svd_at_the_limit():
    w = weight((32, 64))
    errors = [(w - q - B @ A).norm().item() for A, B, q in (loftq_init(w, 8, 4, n) for n in (1, 3))]
    assert errors[1] < errors[0]
    A, B, q = loftq_init(w, 32, 4, 1)                   # r = min(out, in): B A is all of W - Q
    torch.testing.assert_close(q + B @ A, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_is_computed_in_float32_and_cast_back_as_peft(dtype):
    """PEFT computes in float32, returns the quantized weight in the weight's dtype and later casts lora_A / lora_B to
    the base layer's dtype (_move_adapter_to_device_of_base_layer)."""
    w = weight((32, 64), dtype)
    A, B, q = loftq_init(w, 4, 4, 1)
    eA, eB, eq = peft(w, 4, 4, 1)
    assert A.dtype == B.dtype == q.dtype == eq.dtype == dtype
    torch.testing.assert_close(q, eq, rtol=0, atol=0)
    torch.testing.assert_close(A, eA.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(B, eB.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(bits=3), r"loftq_bits must be 4 \(nf4\) or 8 \(int8\), got loftq_bits=3"),
    (dict(iters=0), r"loftq_iter must be an integer >= 1, got loftq_iter=0"),
    (dict(r=18), r"needs 1 <= r <= min\(out, in\) = 17 .* got r=18; lower r"),
])
def test_loftq_init_refuses(bad, match):
    args = {**dict(r=4, bits=4, iters=1), **bad}
    with pytest.raises(SpecError, match=match):
        loftq_init(weight((33, 17)), args["r"], args["bits"], args["iters"])


# --- nf4 / int8 round trips against bitsandbytes' own layers --------------------------------------------------------

def bnb_nf4(w: torch.Tensor):
    """What PEFT's loftq_init quantizes with: Params4bit(compress_statistics=False, nf4, blocksize 64)."""
    import bitsandbytes as bnb

    with cuda_as_cpu():
        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4").to("cuda")
        return p, bnb.functional.dequantize_4bit(p.data, p.quant_state)


@pytest.mark.parametrize("shape", SHAPES + [(7, 3), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_nf4_roundtrip_equals_bitsandbytes_params4bit(shape):
    w = weight(shape)
    _, expected = bnb_nf4(w)
    got = nf4_roundtrip(w)
    assert got.dtype == torch.float32 and got.shape == w.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_nf4_roundtrip_where_bitsandbytes_cpu_kernel_splits_blocks_across_rows():
    """Rows of 32 (a block of 64 spans two rows): bitsandbytes 0.50's CPU dequantize_4bit kernel reads the packed
    codes row by row and comes back wrong there, so PEFT's loftq_init run on the CPU gets another (wrong) Q. The
    packed codes and scales are bitsandbytes' own; dequantized as the flat block sequence they are, they give peftc's
    round trip, whose error stays within nf4's bound (half the widest gap between levels, -1 and -0.6962, times the
    block's absmax)."""
    import bitsandbytes.functional as F

    w = weight((64, 32))
    p, cpu_kernel = bnb_nf4(w)
    got = nf4_roundtrip(w)
    state = p.quant_state
    state.shape = torch.Size([w.numel()])
    flat = F.dequantize_4bit(p.data, state).reshape(w.shape)
    torch.testing.assert_close(got, flat, rtol=0, atol=0)
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert ((got - w).reshape(-1, 64).abs() <= 0.1520 * absmax + 1e-6).all()
    assert (cpu_kernel - w).abs().max() > 1.0               # the kernel's error, documented in peftc/quant_math.py


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_roundtrip_equals_bitsandbytes_int8params(shape):
    import bitsandbytes as bnb

    w = weight(shape)
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu")      # quantizes w in float16, per row
    expected = bnb.functional.int8_vectorwise_dequant(p.data, p.SCB)
    got = int8_roundtrip(w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert (got - w).abs().max() <= w.abs().amax(1).max() / 127        # within one step of the row's scale


@pytest.mark.parametrize("roundtrip", [nf4_roundtrip, int8_roundtrip])
def test_roundtrips_are_idempotent(roundtrip):
    """Quantizing an already quantized weight changes nothing: why loading a LoftQ adapter on the base PEFT saved
    (which quantizes that base again, as PEFT does) gives the saved model back."""
    q = roundtrip(weight((48, 128)))
    assert torch.equal(roundtrip(q), q)


# --- without bitsandbytes -------------------------------------------------------------------------------------------

def test_without_bitsandbytes_loftq_is_refused_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)       # import bitsandbytes -> ImportError
    with pytest.raises(MissingDependency, match=r"init='loftq' .* bitsandbytes, which is not installed; "
                                                r"pip install bitsandbytes"):
        peftc.LoRA(r=4, init="loftq")
    for roundtrip in (nf4_roundtrip, int8_roundtrip):
        with pytest.raises(MissingDependency, match=r"needs bitsandbytes, .*; pip install bitsandbytes"):
            roundtrip(weight((4, 4)))
    assert peftc.LoRA(r=4, init="pissa").init == "pissa"           # other inits do not need it


# --- the spec's options and adapter_config.json ---------------------------------------------------------------------

def test_spec_defaults_are_peft_loftqconfig_defaults():
    spec = peftc.LoRA(r=4, init="loftq")
    assert (spec.loftq_bits, spec.loftq_iter) == (LoftQConfig().loftq_bits, LoftQConfig().loftq_iter) == (4, 1)
    assert spec == peftc.LoRA(r=4, init="loftq", loftq_bits=4, loftq_iter=1)
    assert (peftc.LoRA(r=4).loftq_bits, peftc.LoRA(r=4).loftq_iter) == (None, None)


@pytest.mark.parametrize("kwargs,match", [
    (dict(init="loftq", loftq_bits=3), r"loftq_bits must be 4 \(nf4\) or 8 \(int8\).*got loftq_bits=3; pass "
                                       r"loftq_bits=4 or loftq_bits=8"),
    (dict(init="loftq", loftq_bits=True), r"got loftq_bits=True"),
    (dict(init="loftq", loftq_bits="4"), r"got loftq_bits='4'"),
    (dict(init="loftq", loftq_iter=0), r"loftq_iter .* must be an integer >= 1, got loftq_iter=0; pass loftq_iter=1"),
    (dict(init="loftq", loftq_iter=1.5), r"got loftq_iter=1.5"),
    (dict(loftq_bits=8), r"loftq_bits=8 only applies with init='loftq', got init=True; pass init='loftq' or drop"),
    (dict(init="pissa", loftq_iter=2), r"loftq_iter=2 only applies with init='loftq', got init='pissa'"),
])
def test_spec_refuses_bad_loftq_options(kwargs, match):
    with pytest.raises(SpecError, match=match):
        peftc.LoRA(r=4, **kwargs)


def peft_config_dict(**loftq) -> dict:
    """adapter_config.json as PEFT writes it for a LoftQ adapter (its to_dict, as save_pretrained writes it)."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="loftq",
                     loftq_config=LoftQConfig(**loftq)).to_dict()
    return {k: (v if not isinstance(v, set) else sorted(v)) for k, v in cfg.items()}


def test_peft_config_maps_both_ways():
    cfg = peft_config_dict(loftq_bits=8, loftq_iter=2)
    assert cfg["init_lora_weights"] == "loftq" and cfg["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 2}
    spec = lora_from_config(cfg)
    assert (spec.init, spec.loftq_bits, spec.loftq_iter) == ("loftq", 8, 2)
    out = lora_to_config(spec, target_modules=["q_proj"], base_model_name_or_path=None, task_type=None,
                         modules_to_save=None)
    assert out["init_lora_weights"] == "loftq" and out["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 2}
    plain = lora_to_config(peftc.LoRA(r=4), target_modules=["q_proj"], base_model_name_or_path=None, task_type=None,
                           modules_to_save=None)
    assert plain["loftq_config"] == LoraConfig(r=4).loftq_config == {}           # PEFT's neutral value


def test_config_refusals_and_peft_ignoring_loftq_config_without_loftq(caplog):
    cfg = peft_config_dict()
    with pytest.raises(SpecError, match=r"init_lora_weights='loftq' needs loftq_config .* got loftq_config=\{\}"):
        lora_from_config({**cfg, "loftq_config": {}})
    with pytest.raises(SpecError, match=r"loftq_config must hold exactly \['loftq_bits', 'loftq_iter'\].*"
                                        r"got keys \['loftq_bits'\]"):
        lora_from_config({**cfg, "loftq_config": {"loftq_bits": 4}})
    with pytest.raises(SpecError, match=r"adapter_config.json: loftq_bits must be 4 \(nf4\) or 8"):
        lora_from_config({**cfg, "loftq_config": {"loftq_bits": 2, "loftq_iter": 1}})
    # PEFT drops a loftq_config given with another init (with a warning); so does peftc
    with caplog.at_level(logging.WARNING, logger="peftc.passes.lora.spec"):
        spec = lora_from_config({**cfg, "init_lora_weights": True})
    assert spec.init is True and spec.loftq_bits is None and "loftq_config" in caplog.text
    with pytest.warns(UserWarning, match="loftq_config"):
        assert LoraConfig(r=4, init_lora_weights=True, loftq_config=LoftQConfig()).loftq_config == {}
