"""peftc's quantized ops (peftc/quant.py) against bitsandbytes' own layers: forward, gradient w.r.t. x, fake kernels
(torch.library.opcheck), odd shapes, and nothing dequantized kept for backward."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit as bnb_dequantize_4bit
from bitsandbytes.functional import int8_vectorwise_dequant
from torch import nn

from peftc import SpecError
from peftc.quant import QuantLinear, quant_weight

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (out_features, in_features): a square one, odd sizes (561 codes: an odd count of nibbles, a partial block), and
# out_features that are no multiple of 32, which bitsandbytes' CPU eval path (the AVX512-BF16 repacking) rejects
SHAPES = [(64, 64), (33, 17), (100, 128)]
SHAPE_IDS = ["64x64", "33x17", "100x128"]
COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FOUR_BIT = [(qt, dq) for qt in ("nf4", "fp4") for dq in (False, True)]
FOUR_BIT_IDS = [f"{qt}{'-dq' if dq else ''}" for qt, dq in FOUR_BIT]


def dense(out_f: int, in_f: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def linear4bit(lin: nn.Linear, quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes' Linear4bit holding `lin`'s weight, quantized on the CPU (as from_pretrained does)."""
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type=quant_type)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().clone())
    layer = layer.to("cpu")
    # On an AVX512-BF16 CPU, an eval-mode call without grad repacks the weight in place into a layout peftc does
    # not read (and computes in bf16): keep bitsandbytes on its reference path, which peftc's op reproduces.
    layer.support_avx512bf16_for_cpu = False
    return layer


def linear8bit(lin: nn.Linear, threshold: float = 6.0) -> nn.Module:
    """bitsandbytes' Linear8bitLt (int8 inference weights, load_in_8bit's layer) holding `lin`'s weight."""
    layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().clone())
    return layer.to("cpu")


def args_4bit(layer, x: torch.Tensor) -> tuple:
    """The arguments of peftc::linear_4bit for `layer` at input `x` (its buffers shared, not copied)."""
    q = quant_weight("layer", layer, x.dtype)
    t = q.tensors
    return (x, t["weight"], t["weight_absmax"], t.get("weight_nested_absmax"), t.get("weight_nested_code"),
            t.get("weight_nested_offset"), layer.bias, *q.consts)


def args_8bit(layer, x: torch.Tensor, training: bool) -> tuple:
    q = quant_weight("layer", layer, x.dtype)
    return (x, q.tensors["weight"], q.tensors["weight_scb"], layer.bias, *q.consts, training)


def activations(in_f: int, dtype=torch.float32, seed: int = 1, outlier: bool = True) -> torch.Tensor:
    """x (2, 5, in) with one large column (LLM.int8() runs columns above its threshold in fp16)."""
    x = torch.randn(2, 5, in_f, generator=torch.Generator().manual_seed(seed))
    if outlier:
        x[..., in_f // 2] *= 20.0
    return x.to(dtype)


def grads(f, x: torch.Tensor, bias: nn.Parameter | None, seed: int = 2):
    """(y, dL/dx, dL/dbias) of y = f(x) for L = <y, g> with a fixed random g."""
    x = x.detach().clone().requires_grad_(True)
    if bias is not None:
        bias.grad = None
    y = f(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    y.backward(g)
    return y.detach(), x.grad, None if bias is None else bias.grad.clone()


def assert_bias_grad_close(ours: torch.Tensor, theirs: torch.Tensor, compute: torch.dtype) -> None:
    """dL/dbias: bitsandbytes sums over the batch dims in another order, and in the compute dtype (peftc in the
    output's), so equal to rounding: the float32 sum's, or the half-precision compute dtype's."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    tol = 1e-5 if compute == torch.float32 else 1e-2
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol * theirs.abs().max().item())


# --- 4-bit ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("quant_type, double_quant", FOUR_BIT, ids=FOUR_BIT_IDS)
@pytest.mark.parametrize("compute", list(COMPUTE), ids=list(COMPUTE))
def test_linear_4bit_equals_the_layer_forward_and_backward(shape, quant_type, double_quant, compute):
    """peftc::linear_4bit is bitsandbytes' Linear4bit: output and dL/dx bit for bit, dL/dbias to rounding, in train
    mode and in eval mode (with and without grad)."""
    lin = dense(*shape)
    layer = linear4bit(lin, quant_type, double_quant, COMPUTE[compute])
    x = activations(shape[1])
    op = torch.ops.peftc.linear_4bit
    for training in (True, False):
        layer.train(training)
        with torch.no_grad():
            assert torch.equal(op(*args_4bit(layer, x)), layer(x))
        ours = grads(lambda x: op(*args_4bit(layer, x)), x, layer.bias)
        theirs = grads(layer, x, layer.bias)
        for name, a, b in zip(("y", "dx"), ours, theirs):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs (training={training})"
        assert_bias_grad_close(ours[2], theirs[2], COMPUTE[compute])
        assert ours[0].dtype == x.dtype and ours[0].shape == (*x.shape[:-1], shape[0])


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_4bit_returns_the_input_dtype(x_dtype):
    """A half-precision input computes in the layer's compute dtype and comes back in its own dtype, as bitsandbytes
    does (Linear4bit.forward: .to(inp_dtype))."""
    layer = linear4bit(dense(33, 17, seed=3), "nf4", True, torch.float32)
    x = activations(17, x_dtype)
    with torch.no_grad():
        y = torch.ops.peftc.linear_4bit(*args_4bit(layer, x))
        assert y.dtype == x_dtype
        assert torch.equal(y, layer(x))


@pytest.mark.parametrize("quant_type, double_quant", FOUR_BIT, ids=FOUR_BIT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_4bit_equals_bitsandbytes(quant_type, double_quant, dtype):
    """peftc::dequantize_4bit (DoRA's norms, merging) is bitsandbytes' dequantize_4bit, and close to the weight it
    quantized."""
    lin = dense(33, 17, seed=4)
    layer = linear4bit(lin, quant_type, double_quant, torch.float32)
    a = args_4bit(layer, activations(17))
    w = torch.ops.peftc.dequantize_4bit(*a[1:6], 33, 17, a[9], a[10], dtype)
    ref = bnb_dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    assert w.shape == (33, 17) and w.dtype == dtype
    assert torch.equal(w, ref)
    # 4-bit codes: a relative error of a few per cent of the block's largest entry
    assert (w.float() - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()


def test_dense_of_a_quant_weight_is_the_dequantized_weight():
    """QuantWeight.dense (what the match pass hands adapters) equals bitsandbytes' own dequantization, 4- and 8-bit."""
    lin = dense(100, 128, seed=5)
    l4 = linear4bit(lin, "fp4", True, torch.bfloat16)
    assert torch.equal(quant_weight("l4", l4).dense(torch.float32),
                       bnb_dequantize_4bit(l4.weight.data, l4.weight.quant_state).float())
    l8 = linear8bit(lin)
    q = quant_weight("l8", l8)
    # CB * (SCB / 127), as the layer's CPU training matmul computes it; bitsandbytes' dequant helper rounds in
    # another order ((CB * SCB) / 127)
    w = q.dense(torch.float32)
    assert torch.equal(w, l8.weight.data.float() * (q.tensors["weight_scb"] * (1.0 / 127.0)).unsqueeze(1))
    torch.testing.assert_close(w, int8_vectorwise_dequant(l8.weight.data, q.tensors["weight_scb"]), rtol=1e-6, atol=0)


# --- 8-bit ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("threshold", [6.0, 0.0], ids=["outliers", "no-outliers"])
def test_linear_8bit_equals_the_layer_forward_and_backward(shape, threshold):
    """peftc::linear_8bit with training=True is Linear8bitLt in train mode (on a CPU: the dequantized weight's
    matmul), with training=False the layer in eval mode (LLM.int8(): int8 activations, outlier columns above the
    threshold in 16-bit): output and dL/dx equal bit for bit, dL/dbias to rounding."""
    layer = linear8bit(dense(*shape), threshold)
    x = activations(shape[1])
    for training in (True, False):
        layer.train(training)
        op = lambda x: torch.ops.peftc.linear_8bit(*args_8bit(layer, x, training))  # noqa: E731
        with torch.no_grad():
            assert torch.equal(op(x), layer(x)), f"outputs differ (training={training})"
        ours, theirs = grads(op, x, layer.bias), grads(layer, x, layer.bias)
        for name, a, b in zip(("y", "dx"), ours, theirs):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs (training={training})"
        assert_bias_grad_close(ours[2], theirs[2], torch.float32)


def test_linear_8bit_modes_differ_where_bitsandbytes_does():
    """The training flag selects a different kernel: with an outlier column the two results differ (so passes.dropout
    must tie the flag to the module's mode), each equal to the layer in that mode."""
    layer = linear8bit(dense(64, 64, seed=6))
    x = activations(64)
    with torch.no_grad():
        train = torch.ops.peftc.linear_8bit(*args_8bit(layer, x, True))
        infer = torch.ops.peftc.linear_8bit(*args_8bit(layer, x, False))
    assert not torch.equal(train, infer)
    assert (train - infer).abs().max() < 0.05 * train.abs().max()


def test_reading_a_layer_does_not_change_its_state():
    """quant_weight only reads: the tensors it hands out share the layer's storage, and a bitsandbytes forward
    afterwards (which moves CB/SCB from the weight to the layer's state on a first call) leaves them valid."""
    layer = linear8bit(dense(33, 17, seed=7))
    x = activations(17)
    q = quant_weight("layer", layer)
    cb, scb = q.tensors["weight"].clone(), q.tensors["weight_scb"].clone()
    with torch.no_grad():
        before = torch.ops.peftc.linear_8bit(*args_8bit(layer, x, True))
        assert torch.equal(before, layer.train()(x))
        after = torch.ops.peftc.linear_8bit(*args_8bit(layer, x, True))
    assert torch.equal(before, after)
    assert torch.equal(q.tensors["weight"], cb) and torch.equal(q.tensors["weight_scb"], scb)
    assert q.tensors["weight"].data_ptr() == layer.weight.data.data_ptr()


# --- fake kernels and autograd registration (torch.library.opcheck) -------------------------------------------------
OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("quant_type, double_quant, compute", [("nf4", True, torch.bfloat16),
                                                                ("fp4", False, torch.float32)], ids=["nf4-dq-bf16",
                                                                                                     "fp4-fp32"])
def test_opcheck_4bit_ops(quant_type, double_quant, compute):
    """Schema, autograd registration, fake kernel (shapes and dtypes as the real one) and AOT dispatch with dynamic
    shapes, for linear_4bit (x with grad, with a bias) and dequantize_4bit."""
    layer = linear4bit(dense(33, 17, seed=8), quant_type, double_quant, compute)
    a = args_4bit(layer, activations(17).requires_grad_(True))
    torch.library.opcheck(torch.ops.peftc.linear_4bit.default, a, test_utils=OPCHECK)
    torch.library.opcheck(torch.ops.peftc.dequantize_4bit.default, (*a[1:6], 33, 17, a[9], a[10], torch.float32),
                          test_utils=OPCHECK)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_linear_8bit(training):
    layer = linear8bit(dense(33, 17, seed=9))
    a = args_8bit(layer, activations(17).requires_grad_(True), training)
    torch.library.opcheck(torch.ops.peftc.linear_8bit.default, a, test_utils=OPCHECK)


def test_fake_kernels_give_the_shapes_and_dtypes_of_the_real_ones():
    """Under FakeTensorMode (what torch.export and torch.compile trace with) each op's output has the real one's
    shape and dtype, with symbolic leading dims kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    l4 = linear4bit(dense(33, 17, seed=10), "nf4", True, torch.bfloat16)
    l8 = linear8bit(dense(33, 17, seed=10))
    x = activations(17, torch.float16)
    real = {"4": torch.ops.peftc.linear_4bit(*args_4bit(l4, x)),
            "8": torch.ops.peftc.linear_8bit(*args_8bit(l8, x, False)),
            "w": torch.ops.peftc.dequantize_4bit(*args_4bit(l4, x)[1:6], 33, 17, 64, "nf4", torch.bfloat16)}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        fake = {"4": torch.ops.peftc.linear_4bit(*args_4bit(l4, fx)),
                "8": torch.ops.peftc.linear_8bit(*args_8bit(l8, fx, False)),
                "w": torch.ops.peftc.dequantize_4bit(*args_4bit(l4, fx)[1:6], 33, 17, 64, "nf4", torch.bfloat16)}
    for k in real:
        assert (tuple(fake[k].shape), fake[k].dtype) == (tuple(real[k].shape), real[k].dtype), k
    assert real["4"].shape == (2, 5, 33) and real["4"].dtype == torch.float16


# --- memory: nothing dequantized is kept for backward ---------------------------------------------------------------
def saved_for_backward(f, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor autograd saves while running f(x) (x with grad)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(x.detach().clone().requires_grad_(True)).sum().backward()
    return saved


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4", "int8-train", "int8-eval"])
def test_no_dequantized_weight_is_saved_for_backward(kind):
    """A quantized layer keeps only its own quantized buffers for backward (dL/dx dequantizes again): no floating
    tensor with out*in entries (the dense weight), and nothing new of that size at all."""
    out_f, in_f = 100, 128
    lin = dense(out_f, in_f, seed=11)
    x = activations(in_f)
    if kind.startswith("int8"):
        layer = linear8bit(lin)
        f = lambda x: torch.ops.peftc.linear_8bit(*args_8bit(layer, x, kind == "int8-train"))  # noqa: E731
        own = [layer.weight.data]
    else:
        qt = kind[:3]
        layer = linear4bit(lin, qt, kind.endswith("-dq"), torch.float32)
        f = lambda x: torch.ops.peftc.linear_4bit(*args_4bit(layer, x))  # noqa: E731
        own = [layer.weight.data]
    saved = saved_for_backward(f, x)
    assert saved, "nothing saved: the op's backward could not run"
    w = quant_weight("layer", layer).dense(torch.float32)       # the check sees a dense layer's weight
    control = saved_for_backward(lambda x: torch.nn.functional.linear(x, w), x)
    assert any(t.is_floating_point() and t.numel() == out_f * in_f for t in control)
    dense_like = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= out_f * in_f]
    assert not dense_like, f"floating tensors of the dense weight's size saved for backward: {dense_like}"
    ptrs = {t.data_ptr() for t in own}
    big = [t for t in saved if t.numel() * t.element_size() >= out_f * in_f // 2]
    assert all(t.data_ptr() in ptrs for t in big), "a weight-sized tensor other than the layer's own codes is saved"


# --- what peftc refuses --------------------------------------------------------------------------------------------
def test_a_repacked_layer_is_refused_by_name():
    """A Linear4bit that bitsandbytes repacked for its CPU inference kernel (an eval-mode call without grad on an
    AVX512-BF16 CPU) is in a layout peftc does not read: SpecError naming the layer and what to do."""
    layer = linear4bit(dense(64, 64, seed=12), "nf4", False, torch.float32)
    layer.weight.quant_state.packing_format_for_cpu = True      # what bitsandbytes' repacking sets
    with pytest.raises(SpecError, match=r"model\.layers\.3\.q_proj.*repacked.*compile the model before"):
        QuantLinear("model.layers.3.q_proj", layer)


def test_an_8bit_layer_with_training_weights_is_refused():
    layer = bnb.nn.Linear8bitLt(17, 33, has_fp16_weights=True)
    with pytest.raises(SpecError, match=r"q_proj.*has_fp16_weights=True"):
        quant_weight("q_proj", layer)


# rows that are not a whole number of blocks: bitsandbytes 0.50's CPU kernel, given the shape [out, in],
# dequantizes these wrongly (off by up to the block's absmax); bitsandbytes blocks W in memory order whatever its shape
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 32), (128, 48), (16, 16), (8, 1376)],
                         ids=["64x32", "128x48", "16x16", "8x1376"])
def test_dequantize_4bit_blocks_memory_order_whatever_the_rows(shape, quant_type):
    from bitsandbytes.functional import quantize_4bit

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    flat, state = quantize_4bit(w.reshape(-1).contiguous(), blocksize=64, quant_type=quant_type)
    reference = bnb_dequantize_4bit(flat, state).view(shape)       # quantized and dequantized as one flat run
    packed, _ = quantize_4bit(w, blocksize=64, quant_type=quant_type)
    assert torch.equal(packed.view(-1), flat.view(-1))            # the same codes: the shape does not change blocks
    ours = torch.ops.peftc.dequantize_4bit(packed, state.absmax, None, None, None, *shape, 64, quant_type,
                                           torch.float32)
    assert torch.equal(ours, reference)
    blocks = w.reshape(-1, 64).abs().amax(1, keepdim=True)     # rounding moves an entry by <= its block's absmax / 2
    assert ((ours - w).reshape(-1, 64).abs() <= blocks / 2 + 1e-6).all()
