"""passes/lora/inits.py against HF PEFT 0.21 (peft/tuners/lora/layer.py: LoraLayer.pissa_init, olora_init, orthogonal_init,
called from update_layer after it has built lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out)).

Same seed before PEFT's layer and before ours, with ours first making the two nn.Linear draws PEFT makes: A, B and
the residual base weight must then be equal bit for bit (same float32 operations on the same device)."""
from __future__ import annotations

import math
import warnings

import pytest

pytest.importorskip("peft")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from peftc.errors import SpecError  # noqa: E402
from peftc.passes.lora.inits import changes_base_weight, orthogonal_init, parse_init, residual_init  # noqa: E402
from tests.compare import assert_differs

IN, OUT = 24, 16
EXACT = dict(rtol=0, atol=0)
RESIDUAL_INITS = ["pissa", "pissa_niter_4", "pissa_niter_0", "olora"]
# (r, lora_alpha, use_rslora): the default case, rsLoRA, and a scale below 1
SCALINGS = [(4, 8, False), (4, 16, True), (6, 3, False)]


def scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def base_weight(dtype=torch.float32, out=OUT, in_=IN) -> torch.Tensor:
    return torch.randn(out, in_, generator=torch.Generator().manual_seed(7)).to(dtype)


def peft(init, weight, r, alpha, rslora=False, seed=0):
    """PEFT's (A, B, base weight) for one nn.Linear holding `weight`."""
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    base.weight.data.copy_(weight)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = PeftLinear(base, "default", r=r, lora_alpha=alpha,
                           config=LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=init))
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), base.weight.detach()


def peft_layer_draws(in_features: int, out_features: int, r: int) -> None:
    """The random numbers PEFT's update_layer draws before it initialises: building lora_A, then lora_B."""
    nn.Linear(in_features, r, bias=False)
    nn.Linear(r, out_features, bias=False)


def ours(init, weight, r, alpha, rslora=False, seed=0):
    torch.manual_seed(seed)
    peft_layer_draws(weight.shape[1], weight.shape[0], r)
    if init == "orthogonal":
        return (*orthogonal_init(weight.shape[1], weight.shape[0], r, dtype=weight.dtype), weight)
    return residual_init(init, weight, r, scaling(r, alpha, rslora))


# --- PiSSA and OLoRA: A, B and the residual equal PEFT's -------------------------------------------------------------

@pytest.mark.parametrize("r,alpha,rslora", SCALINGS)
@pytest.mark.parametrize("init", RESIDUAL_INITS)
def test_residual_init_matches_peft(init, r, alpha, rslora):
    w = base_weight()
    expected = peft(init, w, r, alpha, rslora)
    got = ours(init, w, r, alpha, rslora)
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype == torch.float32
        torch.testing.assert_close(g, e, **EXACT)
    assert_differs(got[2], w)  # the base weight did change


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", RESIDUAL_INITS)
def test_residual_init_half_precision_matches_peft(init, dtype):
    w = base_weight(dtype)
    expected = peft(init, w, 4, 8)
    got = ours(init, w, 4, 8)
    for e, g in zip(expected, got):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, **EXACT)


@pytest.mark.parametrize("r,alpha,rslora", SCALINGS)
@pytest.mark.parametrize("init", RESIDUAL_INITS)
def test_residual_plus_adapter_is_the_weight(init, r, alpha, rslora):
    w = base_weight()
    s = scaling(r, alpha, rslora)
    A, B, residual = residual_init(init, w, r, s)
    assert A.shape == (r, IN) and B.shape == (OUT, r) and residual.shape == w.shape
    torch.testing.assert_close(residual + s * B @ A, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("r,alpha,rslora", SCALINGS)
def test_pissa_adapter_is_the_top_singular_part(r, alpha, rslora):
    """PiSSA divides the singular values by the scale and splits their square root between A and B."""
    w = base_weight()
    s = scaling(r, alpha, rslora)
    A, B, _ = residual_init("pissa", w, r, s)
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    top = (U[:, :r] * S[:r]) @ Vh[:r]
    torch.testing.assert_close((s * B @ A).double(), top, rtol=0, atol=1e-5)
    root = (S[:r] / s).sqrt()
    torch.testing.assert_close(A.double().norm(dim=1), root, rtol=1e-5, atol=0)  # rows of A: sqrt(S/scale) * v_i
    torch.testing.assert_close(B.double().norm(dim=0), root, rtol=1e-5, atol=0)  # columns of B: sqrt(S/scale) * u_i


def test_olora_adapter_is_the_truncated_qr():
    """OLoRA does not divide by the scale: A = R[:r], B = Q[:, :r]."""
    w = base_weight()
    A, B, residual = residual_init("olora", w, 4, 2.0)
    torch.testing.assert_close(B.T @ B, torch.eye(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(A, torch.triu(A), **EXACT)
    torch.testing.assert_close(w - 2.0 * B @ A, residual, rtol=0, atol=1e-6)


def test_pissa_niter_uses_the_global_rng():
    w = base_weight()
    first = ours("pissa_niter_1", w, 4, 8, seed=0)
    again = ours("pissa_niter_1", w, 4, 8, seed=0)
    other = ours("pissa_niter_1", w, 4, 8, seed=1)
    torch.testing.assert_close(first[0], again[0], **EXACT)
    assert_differs(first[0], other[0])


@pytest.mark.parametrize("init", RESIDUAL_INITS)
def test_residual_init_refuses_float64_like_peft(init):
    w = base_weight(torch.float64)
    with pytest.raises(TypeError):
        peft(init, w, 4, 8)
    with pytest.raises(SpecError, match=r"float32, float16 or bfloat16 weight .* got torch.float64; cast"):
        residual_init(init, w, 4, 2.0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_refuses_a_rank_above_min_dims(init):
    w = base_weight()
    assert peft(init, w, 20, 8)[0].shape[0] == 16  # PEFT silently shrinks the adapter to min(out, in)
    with pytest.raises(SpecError, match=r"1 <= r <= min\(out, in\) = 16 .* got r=20; lower r"):
        residual_init(init, w, 20, 0.4)


def test_residual_init_refusals():
    w = base_weight()
    with pytest.raises(SpecError, match="'orthogonal' leaves the base weight unchanged"):
        residual_init("orthogonal", w, 4, 2.0)
    with pytest.raises(SpecError, match="got init=True"):
        residual_init(True, w, 4, 2.0)
    with pytest.raises(SpecError, match="unknown LoRA init 'pisa'"):
        residual_init("pisa", w, 4, 2.0)
    with pytest.raises(SpecError, match=r"2-D \[out, in\] weight, got shape \(24,\)"):
        residual_init("pissa", w[0], 4, 2.0)
    with pytest.raises(SpecError, match="finite, positive scale .* got scale=0.0"):
        residual_init("pissa", w, 4, 0.0)
    with pytest.raises(SpecError, match="finite scale .* got scale=inf"):
        residual_init("olora", w, 4, math.inf)
    assert torch.equal(residual_init("olora", w, 4, 0.0)[2], w)  # OLoRA with scale 0: nothing is moved


# --- orthogonal -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("r,alpha,rslora", SCALINGS)
def test_orthogonal_matches_peft(r, alpha, rslora, dtype):
    w = base_weight(dtype)
    A_p, B_p, W_p = peft("orthogonal", w, r, alpha, rslora)
    A, B, _ = ours("orthogonal", w, r, alpha, rslora)
    assert A.dtype == B.dtype == dtype and A.shape == (r, IN) and B.shape == (OUT, r)
    torch.testing.assert_close(A, A_p, **EXACT)
    torch.testing.assert_close(B, B_p, **EXACT)
    torch.testing.assert_close(W_p, w, **EXACT)  # PEFT leaves the base weight as it was
    assert A.abs().min() > 0 and B.abs().max() > 0


def test_orthogonal_adapter_is_zero_up_to_rounding():
    torch.manual_seed(0)
    A, B = orthogonal_init(IN, OUT, 8)
    assert A.abs().max() > 1e-2 and B.abs().max() > 1e-2
    torch.testing.assert_close(B @ A, torch.zeros(OUT, IN), rtol=0, atol=1e-6)


@pytest.mark.parametrize("r", [3, 0, True])
def test_orthogonal_refuses_odd_rank(r):
    with pytest.raises(SpecError, match=f"even rank r >= 2, got r={r!r}"):
        orthogonal_init(IN, OUT, r)


def test_orthogonal_odd_rank_is_refused_by_peft_too():
    with pytest.raises(ValueError, match="rank to be even"):
        peft("orthogonal", base_weight(), 3, 8)


# --- several layers through get_peft_model: the random numbers are drawn layer by layer ------------------------------

class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(IN, 32)
        self.down = nn.Linear(32, OUT)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("init", ["pissa_niter_2", "orthogonal", "pissa", "olora"])
def test_get_peft_model_two_layers(init):
    torch.manual_seed(3)
    model = TwoLayers()
    weights = {name: getattr(model, name).weight.detach().clone() for name in ("up", "down")}
    torch.manual_seed(11)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=init))
    torch.manual_seed(11)
    for name in ("up", "down"):  # PEFT's order: the model's module order
        w = weights[name]
        peft_layer_draws(w.shape[1], w.shape[0], 4)
        if init == "orthogonal":
            A, B, residual = (*orthogonal_init(w.shape[1], w.shape[0], 4), w)
        else:
            A, B, residual = residual_init(init, w, 4, 2.0)
        layer = getattr(pm.base_model.model, name)
        torch.testing.assert_close(layer.lora_A["default"].weight, A, **EXACT)
        torch.testing.assert_close(layer.lora_B["default"].weight, B, **EXACT)
        torch.testing.assert_close(layer.base_layer.weight, residual, **EXACT)


# --- GPT-2's Conv1D ([in, out]) ---------------------------------------------------------------------------------------

class OneConv1D(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.c = Conv1D(out_features, in_features)

    def forward(self, x):
        return self.c(x)


def conv1d_peft(init, in_features, out_features):
    torch.manual_seed(5)
    model = OneConv1D(in_features, out_features)
    stored = model.c.weight.detach().clone()
    x = torch.randn(3, in_features)
    y = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c"], init_lora_weights=init))
    return stored, pm.base_model.model.c, pm, x, y


def test_conv1d_pissa_is_the_transposed_linear_case():
    stored, layer, pm, x, y = conv1d_peft("pissa", IN, OUT)
    A, B, residual = residual_init("pissa", stored.T, 4, 2.0)
    torch.testing.assert_close(layer.lora_A["default"].weight, A, **EXACT)
    torch.testing.assert_close(layer.lora_B["default"].weight, B, **EXACT)
    torch.testing.assert_close(layer.base_layer.weight, residual.T, **EXACT)
    torch.testing.assert_close(pm(x), y, rtol=0, atol=1e-5)


def test_conv1d_olora_in_peft_skips_the_transpose():
    """The fact the module docstring states: PEFT's OLoRA runs its QR on the stored [in, out] weight, and the
    adapted layer then no longer computes what it did."""
    stored, layer, pm, x, y = conv1d_peft("olora", OUT, OUT)
    A, B, residual = residual_init("olora", stored, 4, 2.0)
    torch.testing.assert_close(layer.lora_A["default"].weight, A, **EXACT)
    torch.testing.assert_close(layer.lora_B["default"].weight, B, **EXACT)
    torch.testing.assert_close(layer.base_layer.weight, residual, **EXACT)
    assert (pm(x) - y).abs().max() > 1e-2


# --- parse_init -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), ("gaussian", "gaussian"), ("Gaussian", "gaussian"), ("pissa", "pissa"),
    ("pissa_niter_4", "pissa_niter_4"), ("pissa_niter_0", "pissa_niter_0"), ("pissa_niter_016", "pissa_niter_16"),
    ("olora", "olora"), ("OLoRA", "olora"), ("orthogonal", "orthogonal"), ("loftq", "loftq"),
])
def test_parse_init_accepts(value, expected):
    got = parse_init(value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value,match", [
    ("pisa", r"unknown LoRA init 'pisa'; did you mean 'pissa'\?"),
    ("PiSSA", r"unknown LoRA init 'PiSSA'; did you mean 'pissa'\?"),
    ("Orthogonal", r"unknown LoRA init 'Orthogonal'; did you mean 'orthogonal'\?"),
    ("pissa_niter4", r"unknown LoRA init 'pissa_niter4'"),
    ("true", r"unknown LoRA init 'true'"),
    ("", r"unknown LoRA init ''"),
    ("pissa_niter_x", r"'pissa_niter_x': .* must be a non-negative integer, e.g. 'pissa_niter_4'"),
    ("pissa_niter_", r"must be a non-negative integer"),
    ("pissa_niter_-1", r"must be a non-negative integer"),
    ("pissa_niter_ 3", r"must be a non-negative integer"),
    ("LoftQ", r"unknown LoRA init 'LoftQ'; did you mean 'loftq'\?"),
    ("corda", r"'corda' is not supported yet: CorDA needs .* calibration data"),
    ("eva", r"'eva' is not supported yet: EVA needs .* data"),
    ("lora_ga", r"'lora_ga' is not supported yet: LoRA-GA needs gradients computed from data"),
    ("mica", r"'mica' is not supported yet: MiCA freezes B"),
    (1, r"must be a bool or a string, got init=1 \(int\)"),
    (None, r"must be a bool or a string, got init=None"),
])
def test_parse_init_refuses(value, match):
    with pytest.raises(SpecError, match=match) as info:
        parse_init(value)
    choices = "True, False, 'gaussian', 'pissa', 'pissa_niter_<N>', 'olora', 'orthogonal', 'loftq'"
    fix = "e.g. 'pissa_niter_4'" if "non-negative" in match else choices
    assert str(info.value).endswith(fix)  # every refusal names the fix


@pytest.mark.parametrize("value", ["pisa", "PiSSA", "Orthogonal", "pissa_niter4", "true", "pissa_niter_x", 1])
def test_peft_refuses_what_parse_init_calls_unknown(value):
    with pytest.raises((ValueError, AttributeError)):
        peft(value, base_weight(), 4, 8)


def test_changes_base_weight():
    assert [changes_base_weight(parse_init(v)) for v in (True, False, "gaussian", "orthogonal")] == [False] * 4
    assert [changes_base_weight(parse_init(v)) for v in ("pissa", "pissa_niter_2", "OLoRA")] == [True] * 3
