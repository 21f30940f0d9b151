"""DoRA (LoRA(use_dora=True)) in parity with HF PEFT: checkpoints both ways, merge, gradients, every grad mode; its
per-channel scale is never stale, a zero-norm row stays finite, and compiled graphs keep routing as data.

PEFT's formula (peft/tuners/lora/dora.py, DoraLinearLayer.forward; variants.py, DoraLinearVariant.forward):
    g = m / ||W + s B A||_row (detached norm);  y' = y + (g - 1)(y - b) + g s B A x
    in training with dropout: y' = y + (g - 1) W d(x) + g s B A d(x)   (d: dropout; the base product is taken again)
checkpoint key: base_model.model.<path>.lora_magnitude_vector (no ".weight").
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from transformers.pytorch_utils import Conv1D

import peftc
from peftc.passes.lora.dora import DoraScale
from peftc.passes.lora.ops import _dropout
from tests.compare import assert_differs
from tests.models import inputs, main_output, make
from tests.parity import (MOVED, TOL, assert_loads_and_merges, assert_parity, assert_same_weights, max_diff,
                          parity_inputs, randomize_peft_)
from tests.recompiles import fresh_dynamo, no_recompiles  # noqa: F401 (fresh_dynamo: autouse fixture)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]   # PEFT warns about GPT-2's Conv1D

R, ALPHA = 4, 8
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"], "bert": ["query", "value", "dense"],
           "vit": ["q_proj", "v_proj"], "minilm": ["query", "value"], "qwen2": ["q_proj", "k_proj", "up_proj"]}
ARCHS = list(TARGETS)
tol = TOL[peftc.LoRA]


@torch.no_grad()
def spread_magnitudes_(model, seed: int) -> None:
    """Trained-looking magnitudes (a fresh one equals the weight's norms) on a PEFT model."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_magnitude_vector" in n:
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


def peft_dora(arch: str, seed: int = 3, **opts):
    ref = get_peft_model(make(arch), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[arch], use_dora=True,
                                                **opts))
    randomize_peft_(ref, seed)
    spread_magnitudes_(ref, seed)
    return ref.eval()


def random_ours_(pm, seed: int = 5) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_trainable_parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p)) if n.endswith("magnitude") else p.normal_(0, 0.2)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_dora_adapter_loads_and_merges(arch, tmp_path):
    ref = peft_dora(arch)
    ref.save_pretrained(tmp_path)
    ours = assert_loads_and_merges(ref, tmp_path, arch)
    assert any(k.endswith("lora_magnitude_vector") for k in ours.store.peft_state_dict("default"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "vit"])
def test_peftc_dora_adapter_loads_in_peft(arch, tmp_path):
    base = make(arch)
    pm = peftc.compile(base, peftc.LoRA(r=R, alpha=ALPHA, targets=TARGETS[arch], use_dora=True))
    random_ours_(pm)
    pm.save_adapter(tmp_path)
    ref = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    assert ref.peft_config["default"].use_dora
    assert_same_weights(pm, ref)
    assert max_diff(pm, base, parity_inputs(arch)[0]) > MOVED * tol
    for x in parity_inputs(arch):
        assert_parity(pm, ref, x, tol)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_dora_adapter_is_the_identity_and_its_magnitudes_are_the_weight_norms(arch):
    base = make(arch)
    pm = peftc.compile(base, peftc.LoRA(r=R, alpha=ALPHA, targets=TARGETS[arch], use_dora=True))
    ref = get_peft_model(make(arch), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[arch], use_dora=True))
    ours, theirs = pm.store.peft_state_dict("default"), dict(ref.named_parameters())
    for k, m in ours.items():
        if k.endswith("lora_magnitude_vector"):
            torch.testing.assert_close(m, theirs[k.replace("lora_magnitude_vector", "lora_magnitude_vector.default"
                                                           ".weight")].detach(), rtol=1e-6, atol=0)
    x = inputs(arch)
    with torch.no_grad():
        assert torch.equal(main_output(pm(**x)), main_output(base(**x)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_equal_peft(arch, tmp_path):
    """Same weights, same batch: the loss and every adapter gradient (A, B, magnitude) equal PEFT's (in training mode;
    GPT-2 in eval mode with autograd, as its own dropout would draw other masks on each side)."""
    ref = peft_dora(arch)
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(make(arch), tmp_path, is_trainable=True)
    ref = PeftModel.from_pretrained(make(arch), tmp_path, is_trainable=True)
    mode = arch != "gpt2"
    ours.train(mode), ref.train(mode)
    x = parity_inputs(arch, labels=True)[0]
    a, b = ours(**x).loss, ref(**x).loss
    torch.testing.assert_close(a, b, rtol=0, atol=tol)
    a.backward()
    b.backward()
    theirs = {n.removesuffix(".default.weight").removesuffix(".default").replace(".lora_magnitude_vector",
                                                                                  ".lora_magnitude_vector"): p
              for n, p in ref.named_parameters() if p.requires_grad}
    theirs = {k.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): p for k, p in theirs.items()}
    count = 0
    for k, p in ours.store.peft_parameters("default"):
        assert p.grad is not None, k
        torch.testing.assert_close(p.grad, theirs[k].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
        count += 1
    assert count == 3 * len(ours.store["default"].targets)


# Largest allowed |peftc - PEFT| per model dtype, unmerged and merged (same weights): the norms are taken in float64 for
# a float64 model and in float32 for half precision (PEFT: in the weight's dtype), merges added in float32 there
DTYPE_TOL = {torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
def test_equals_peft_in_float64_and_half_precision(dtype):
    model = make("llama").to(dtype)
    pm = peftc.compile(model, peftc.LoRA(r=R, alpha=ALPHA, targets=TARGETS["llama"], init=False, use_dora=True),
                       autocast_adapter_dtype=False)           # adapters in the model's dtype on both sides
    random_ours_(pm)
    ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS["llama"],
                                                          use_dora=True, init_lora_weights=False),
                         autocast_adapter_dtype=False)
    assert not set_peft_model_state_dict(ref, pm.store.peft_state_dict("default")).unexpected_keys
    assert_same_weights(pm, ref.eval())
    x = inputs("llama")
    with torch.no_grad():
        ours, theirs = main_output(pm(**x)), main_output(ref(**x))
        assert_differs(theirs, main_output(model(**x)), atol=MOVED * DTYPE_TOL[dtype])
        merged, theirs_merged = main_output(pm.merge()(**x)), main_output(ref.merge_and_unload()(**x))
    assert ours.dtype == merged.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=DTYPE_TOL[dtype])
    torch.testing.assert_close(merged, theirs_merged, rtol=0, atol=DTYPE_TOL[dtype])


def test_no_grad_inference_mode_and_grad_enabled_eval_agree():
    pm = peftc.compile(make("llama"), peftc.LoRA(r=R, alpha=ALPHA, targets=TARGETS["llama"], use_dora=True))
    random_ours_(pm)
    x = inputs("llama")
    pm.eval()
    with torch.no_grad():
        a = main_output(pm(**x))
    with torch.inference_mode():
        b = main_output(pm(**x))
    c = main_output(pm(**x)).detach()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


def test_eval_scale_follows_every_weight_change(tmp_path):
    """The cached per-channel scale is recomputed after an optimizer step and after in-place edits of each input."""
    ref = peft_dora("llama")
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(make("llama"), tmp_path, is_trainable=True).eval()
    ref = PeftModel.from_pretrained(make("llama"), tmp_path, is_trainable=True).eval()
    x = inputs("llama")
    assert_parity(ours, ref, x, tol)                                     # fills the cache
    opt_a = torch.optim.SGD(ours.trainable_parameters(), lr=0.5)
    opt_b = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    for model, opt in ((ours, opt_a), (ref, opt_b)):
        model.train()
        main_output(model(**x)).square().mean().backward()
        opt.step()
        model.eval()
    assert_parity(ours, ref, x, 10 * tol)
    with torch.no_grad():                                                 # each tensor the scale reads, in place
        for n, p in ours.named_trainable_parameters():
            if "q_proj" in n and n.endswith("magnitude"):
                p.mul_(2)
        for n, p in ref.named_parameters():
            if "q_proj" in n and "magnitude" in n:
                p.mul_(2)
    assert_parity(ours, ref, x, 10 * tol)


class ZeroRow(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)
        with torch.no_grad():
            self.proj.weight[1] = 0                                        # a dead output channel

    def forward(self, x):
        return self.proj(x)


def test_zero_norm_row_gives_finite_outputs_and_gradients():
    model = ZeroRow()
    x = torch.randn(3, 6)
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["proj"], use_dora=True), example_inputs=(x,)).train()
    assert pm.store["default"].sites["proj"].magnitude[1].item() == 0.0
    out = pm(x)
    torch.testing.assert_close(out, model(x))
    out.square().sum().backward()
    for p in pm.trainable_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    with torch.no_grad():
        pm.eval()
        assert torch.isfinite(pm(x)).all() and torch.isfinite(pm.merge()(x)).all()


class Proj(nn.Module):
    def __init__(self, conv1d: bool):
        super().__init__()
        self.proj = Conv1D(5, 7) if conv1d else nn.Linear(7, 5)      # GPT-2's Conv1D: weight (in, out)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_form_equals_peft_with_a_real_mask(kind):
    """DoraScale.dropped (training with dropout: the base product again on d(x)) against PEFT's DoRA layer in
    training mode: from one seed peftc's dropout drops what PEFT's does, and the outputs agree; the mask really
    drops, and with nothing dropped the form is the plain rescale of LoRA's output."""
    torch.manual_seed(0)
    ref = get_peft_model(Proj(kind == "conv1d"), LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], use_dora=True,
                                                            lora_dropout=0.5, init_lora_weights=False,
                                                            fan_in_fan_out=kind == "conv1d"))
    spread_magnitudes_(ref, 1)
    layer = ref.base_model.model.proj
    Wk, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    m, s = layer.lora_magnitude_vector["default"].weight.detach(), torch.tensor(layer.scaling["default"])
    d = torch.tensor(1.0)
    x = torch.randn(4, 6, 7)
    ref.train()
    torch.manual_seed(1)
    with torch.no_grad():
        want = ref(x)
    torch.manual_seed(1)
    xd = _dropout(x, torch.tensor(0.5))
    assert 0 < (xd == 0).float().mean() < 1, "nothing was dropped"
    y = layer.base_layer(x).detach()
    ds = DoraScale(kind)
    got = ds.dropped(y, xd, A, B, s, Wk, b, m, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = ds.rescale(y + s * (x @ A.t()) @ B.t(), A, B, s, Wk, b, m, d)
    assert (got - plain).abs().max() > 100 * tol, "the dropped form is not far from the undropped one"
    torch.testing.assert_close(ds.dropped(y, x, A, B, s, Wk, b, m, d), plain)
    W = Wk.t() if kind == "conv1d" else Wk
    g = m / torch.linalg.norm(W + s * B @ A, dim=1)
    torch.testing.assert_close(plain, y + (g - 1) * (y - b) + g * (s * (x @ A.t()) @ B.t()))


def test_dora_and_plain_adapters_switch_without_recompiling():
    base = make("llama")
    pm = peftc.compile(base, peftc.LoRA(r=R, targets=TARGETS["llama"], use_dora=True))
    pm.add_adapter("plain", peftc.LoRA(r=R, targets=TARGETS["llama"]))
    random_ours_(pm)
    with torch.no_grad():
        for p in pm.store["plain"].parameters():
            p.normal_(0, 0.2)
    x = inputs("llama")
    eager = {}
    pm.eval()
    with torch.no_grad():
        for name in ("default", "plain"):
            pm.set_adapter(name)
            eager[name] = main_output(pm(**x))
    alone = peftc.compile(make("llama"), peftc.LoRA(r=R, targets=TARGETS["llama"])).eval()
    alone.store["default"].load_state_dict(pm.store["plain"].state_dict())
    with torch.no_grad():
        assert torch.equal(main_output(alone(**x)), eager["plain"])       # d = 0: exactly plain LoRA
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    with torch.no_grad():
        pm.set_adapter("default")
        torch.testing.assert_close(main_output(compiled(**x)), eager["default"], rtol=0, atol=1e-5)
        with no_recompiles():
            pm.set_adapter("plain")
            torch.testing.assert_close(main_output(compiled(**x)), eager["plain"], rtol=0, atol=1e-5)
            pm.set_adapter("default")
            torch.testing.assert_close(main_output(compiled(**x)), eager["default"], rtol=0, atol=1e-5)


def test_mixed_batch_and_weighted_combination_refuse_dora():
    pm = peftc.compile(make("llama"), peftc.LoRA(r=R, targets=["q_proj"], use_dora=True))
    pm.add_adapter("plain", peftc.LoRA(r=R, targets=["q_proj"]))
    x = inputs("llama")
    with pytest.raises(peftc.InputError, match=r"adapter 'default' cannot share a batch .* it uses DoRA"):
        pm(**x, adapter_names=["default", "plain", "__base__"])
    pm(**x, adapter_names=["default"] * 3)                                # one adapter for the batch is fine
    with pytest.raises(peftc.SpecError, match="uses DoRA"):
        pm.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "mix", combination_type="linear")
    assert pm.adapters == ["default", "plain"]


def test_use_dora_must_be_a_bool():
    with pytest.raises(peftc.SpecError, match="use_dora must be True or False"):
        peftc.LoRA(use_dora="yes")


# --- grouped convolutions ---------------------------------------------------------------------------------------------
# PEFT's lora_B there is a grouped 1x1 conv, B [out, r / groups, 1, ...]; its DoRA norm reads B.view(-1, r) @ A.view(r,
# -1) laid out as W (DoraConvNdLayer.get_lora_weight), not the update lora_B(lora_A(x)) applies. Merging is refused.

class Grouped(nn.Module):
    """Grouped convolutions of each rank: Conv1d (2 groups), Conv2d (4 groups, out != in), depthwise Conv3d."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.c3 = nn.Conv3d(4, 4, (1, 2, 2), groups=4, bias=False)

    def forward(self, seq, img, vol):
        return self.c1(seq).mean((1, 2)) + self.c2(img).mean((1, 2, 3)) + self.c3(vol).mean((1, 2, 3, 4))


GROUPED = ["c1", "c2", "c3"]


def grouped(seed: int = 0) -> Grouped:
    torch.manual_seed(seed)
    return Grouped().eval()


def grouped_inputs(batch: int = 3, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 7, generator=g), torch.randn(batch, 8, 6, 6, generator=g),
            torch.randn(batch, 4, 3, 4, 4, generator=g))


def peft_grouped_dora(**opts):
    """PEFT's DoRA on the grouped convolutions, B random (init False) and magnitudes away from the weight norms."""
    torch.manual_seed(1)
    ref = get_peft_model(grouped(), LoraConfig(r=4, lora_alpha=6, target_modules=GROUPED, use_dora=True,
                                               init_lora_weights=False, **opts))
    spread_magnitudes_(ref, 2)
    return ref.eval()


def grouped_diff(a, b, x) -> float:
    with torch.no_grad():
        return (a(*x) - b(*x)).abs().max().item()


def test_dora_magnitude_on_a_grouped_convolution_is_peft_norm():
    """A fresh PEFT adapter's magnitude (its norm of its own random A and B) is peftc's dora_norm of them."""
    from peftc.passes.lora.dora import dora_norm
    torch.manual_seed(1)
    ref = get_peft_model(grouped(), LoraConfig(r=4, lora_alpha=6, target_modules=GROUPED, use_dora=True,
                                               init_lora_weights=False))
    for name in GROUPED:
        layer = getattr(ref.base_model.model, name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert B.shape[1] == 4 // layer.base_layer.groups                  # grouped B: [out, r / groups, 1, ...]
        m = layer.lora_magnitude_vector["default"].weight.flatten()
        n = dora_norm(layer.base_layer.weight, A, B, layer.scaling["default"], "conv")
        torch.testing.assert_close(n, m.detach(), rtol=1e-6, atol=0)
        plain = layer.base_layer.weight.flatten(1).norm(dim=1)
        assert (n - plain).abs().max() > 1e-2, "B is zero: the check would not see the grouped product's layout"


def test_dora_on_grouped_convolutions_equals_peft_both_ways(tmp_path):
    ref = peft_grouped_dora()
    ref.save_pretrained(tmp_path / "peft")
    x = grouped_inputs(3, 1)
    ours = peftc.load_adapter(grouped(), tmp_path / "peft", example_inputs=grouped_inputs(2))
    assert_same_weights(ours, ref)
    sites = ours.store["default"].sites
    assert tuple(sites["c2"].B.shape) == (12, 1, 1, 1) and tuple(sites["c2"].magnitude.shape) == (1, 12, 1, 1)
    assert grouped_diff(ours, grouped(), x) > MOVED * tol
    assert grouped_diff(ours, ref, x) <= 1e-5
    # an adapter made by peftc (random B, trained-looking magnitudes) loads in PEFT with the same outputs
    pm = peftc.compile(grouped(), peftc.LoRA(r=4, alpha=6, targets=GROUPED, use_dora=True, init=False),
                       example_inputs=grouped_inputs(2))
    random_ours_(pm)
    pm.save_adapter(tmp_path / "ours")
    theirs = PeftModel.from_pretrained(grouped(), tmp_path / "ours").eval()
    assert_same_weights(pm, theirs)
    assert grouped_diff(pm, grouped(), x) > MOVED * tol
    assert grouped_diff(pm, theirs, x) <= 1e-5


def test_dora_on_a_grouped_convolution_trains_as_peft(tmp_path):
    """In training with dropout (the base conv taken again on the dropped input): from one seed the same masks, the
    same outputs and the same gradients of A, B and the magnitude."""
    peft_grouped_dora(lora_dropout=0.3).save_pretrained(tmp_path)
    ours = peftc.load_adapter(grouped(), tmp_path, is_trainable=True, example_inputs=grouped_inputs(2)).train()
    ref = PeftModel.from_pretrained(grouped(), tmp_path, is_trainable=True).train()
    x = grouped_inputs(3, 4)
    torch.manual_seed(7)
    a = ours(*x)
    torch.manual_seed(7)
    b = ref(*x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    theirs = {n.replace(".default.weight", ".weight").replace("magnitude_vector.weight", "magnitude_vector"): p
              for n, p in ref.named_parameters() if p.requires_grad}
    grads = dict(ours.store.peft_parameters("default"))
    assert len(grads) == 3 * len(GROUPED) and set(grads) == set(theirs)
    for k, p in grads.items():
        torch.testing.assert_close(p.grad, theirs[k].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_merging_dora_on_a_grouped_convolution_is_refused_as_in_peft(tmp_path):
    ref = peft_grouped_dora()
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(grouped(), tmp_path, example_inputs=grouped_inputs(2))
    x = grouped_inputs(3, 1)
    before = ours(*x)
    with pytest.raises(peftc.MergeError, match=r"c1 is a convolution with groups=2: .* cannot be merged"):
        ours.merge()
    with pytest.raises(NotImplementedError, match="groups > 1"):                          # PEFT refuses it too
        ref.merge_adapter()
    assert torch.equal(ours(*x), before)
