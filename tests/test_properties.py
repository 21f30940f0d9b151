"""Properties over drawn specs, models, dtypes and input shapes, each comparing numbers: a fresh adapter is the
identity, merged == unmerged, save -> load is the identity, peftc == PEFT on the same weights (outputs, adapted
layers, tensors, training gradients), and invalid option combinations are refused by name.

Two profiles: each property runs a few derandomized examples by default, and broadly (more models, bfloat16,
randomized, the seed printed on failure) under `-m slow`; CI derandomizes that profile too. Every random tensor comes
from a drawn seed, so a falsifying example names it. Models are traced once (tests/strategies.py); compile gets a copy of that graph.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

import peftc
from peftc.store import site_key
from tests.strategies import (ALL_ARCHS, ALL_DTYPES, FAST_ARCHS, FAST_DTYPES, TOLS, Base, assert_moved,
                              as_traced, assert_near, base, call_inputs, compile_, load_, peft_config, peft_targets,
                              randomize_, scale_of, specs)

# PEFT warns about GPT-2's Conv1D (fan_in_fan_out), about rank > in or out on convolutions, and the like
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much], database=None,
               phases=(Phase.explicit, Phase.reuse, Phase.generate))   # no shrinking: each example compiles
FAST = settings(max_examples=8, derandomize=True, **_COMMON)
# CI (the CI variable set) runs a fixed set of broad draws, so that a build is reproducible; elsewhere each run draws
# new ones and prints the blob that reproduces a failure
BROAD = settings(max_examples=40, derandomize=bool(os.environ.get("CI")), print_blob=True, **_COMMON)
SEED = st.integers(0, 2**31 - 1)


def draw_base(data, broad: bool, dtypes=None) -> tuple[Base, int]:
    arch = data.draw(st.sampled_from(ALL_ARCHS if broad else FAST_ARCHS), label="arch")
    dtype = data.draw(st.sampled_from(dtypes or (ALL_DTYPES if broad else FAST_DTYPES)), label="dtype")
    return base(arch, dtype), data.draw(SEED, label="seed")


def out(b: Base, m, x) -> torch.Tensor:
    with torch.no_grad(), as_traced():
        return b.call(m, x)


# --- a fresh adapter is the identity where its init says so ----------------------------------------------------------

def check_fresh_adapter_is_the_identity(data, broad: bool):
    b, seed = draw_base(data, broad)
    spec, chosen = data.draw(specs(b, inits=(True, "gaussian"), residual=True), label="spec")
    x = data.draw(call_inputs(b, seed), label="inputs")
    pm = compile_(b, spec, seed).eval()
    assert pm.store["default"].targets == chosen
    got, want = out(b, pm, x), out(b, b.model, x)
    if spec.init in (True, "gaussian") and b.arch in ("kinds", "mha"):
        # y + 0 is y at the adapted layer, but the sum is a new contiguous tensor where the model had a convolution's
        # or a linear layer's own output (strided, between transposes), and the GEMMs after it round differently
        # (PEFT's fresh adapter: the same diff, a few ulp)
        torch.testing.assert_close(got, want, rtol=0, atol=8 * torch.finfo(b.dtype).eps * scale_of(want))
    elif spec.init in (True, "gaussian") and spec.use_dora:      # m = ||W||: g = m / ||W + s B A|| is 1 up to rounding
        assert_near(got, want, b.dtype, "fresh DoRA")            # (PEFT's fresh DoRA is not bit-exact either)
    elif spec.init in (True, "gaussian"):                        # B = 0, b_B = 0: bit for bit
        assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3g}"
    else:   # PiSSA / OLoRA / orthogonal: W = residual + s B A, computed in float32 whatever the dtype (as PEFT).
        # The residual W - s B A is stored in the model's dtype, and s B A is of the size of s times W's leading part:
        # its rounding, which the sum cancels only up to the dtype's precision, grows with |s| (rsLoRA at r = 2 with
        # alpha 16 is 11; PEFT's own fresh OLoRA in bfloat16 is further off than peftc's on such a draw)
        conditioning = max([1.0] + [abs(spec.scale_at(p)) for p in chosen])
        assert_near(got, want, torch.float32 if b.dtype == torch.float64 else b.dtype, f"fresh init={spec.init!r}",
                    factor=conditioning)


@FAST
@given(data=st.data())
def test_fresh_adapter_is_the_identity(data):
    check_fresh_adapter_is_the_identity(data, broad=False)


@pytest.mark.slow
@BROAD
@given(data=st.data())
def test_fresh_adapter_is_the_identity_broadly(data):
    check_fresh_adapter_is_the_identity(data, broad=True)


# --- merged == unmerged ------------------------------------------------------------------------------------------------

def check_merged_equals_unmerged(data, broad: bool):
    b, seed = draw_base(data, broad)
    spec, _ = data.draw(specs(b, inits=(True, False, "gaussian"), residual=True, mergeable=True), label="spec")
    x = data.draw(call_inputs(b, seed), label="inputs")
    pm = compile_(b, spec, seed).eval()
    randomize_(pm, seed)
    want = out(b, pm, x)
    merged = pm.merge()
    tol = assert_near(out(b, merged, x), want, b.dtype, "merged vs unmerged", factor=3)
    assert_moved(want, out(b, b.model, x), tol, b.dtype, "unmerged")


@FAST
@given(data=st.data())
def test_merged_equals_unmerged(data):
    check_merged_equals_unmerged(data, broad=False)


@pytest.mark.slow
@BROAD
@given(data=st.data())
def test_merged_equals_unmerged_broadly(data):
    check_merged_equals_unmerged(data, broad=True)


# --- save -> load is the identity --------------------------------------------------------------------------------------

def check_save_then_load_is_the_identity(data, broad: bool):
    b, seed = draw_base(data, broad)
    spec, chosen = data.draw(specs(b, residual=True), label="spec")
    x = data.draw(call_inputs(b, seed), label="inputs")
    pm = compile_(b, spec, seed).eval()
    randomize_(pm, seed)
    with tempfile.TemporaryDirectory() as d:
        pm.save_adapter(d)
        loaded = load_(b, d)
    ad, again = pm.store["default"], loaded.store["default"]
    assert again.targets == ad.targets == chosen
    assert {p: (w.r, w.scale) for p, w in again.sites.items()} == {p: (w.r, w.scale) for p, w in ad.sites.items()}
    ours, theirs = pm.store.peft_state_dict("default"), loaded.store.peft_state_dict("default")
    assert ours.keys() == theirs.keys()
    unequal = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not unequal, f"{len(unequal)} tensors changed, e.g. {unequal[0]}"
    assert torch.equal(out(b, loaded, x), out(b, pm, x))


@FAST
@given(data=st.data())
def test_save_then_load_is_the_identity(data):
    check_save_then_load_is_the_identity(data, broad=False)


@pytest.mark.slow
@BROAD
@given(data=st.data())
def test_save_then_load_is_the_identity_broadly(data):
    check_save_then_load_is_the_identity(data, broad=True)


# --- peftc == PEFT on the same weights ----------------------------------------------------------------------------------

def with_peft(b: Base, spec, pm):
    """PEFT's model for `spec` (its own LoraConfig from the spec's fields) on a copy of the model, holding pm's
    adapter tensors as pm saves them; its adapted layers, tensors and parameter counts equal pm's."""
    ref = get_peft_model(b.fresh_model(), peft_config(spec, b))
    with tempfile.TemporaryDirectory() as d:
        pm.save_adapter(d)
        tensors = load_file(Path(d) / "adapter_model.safetensors")
    result = set_peft_model_state_dict(ref, tensors)
    # PEFT's own checkpoints hold aliases it does not load back (a bias inside a modules_to_save module, saved thrice)
    unexpected = sorted(set(result.unexpected_keys) - set(get_peft_model_state_dict(ref)))
    assert not unexpected, f"PEFT has no place for {unexpected[:3]}"
    missing = [k for k in result.missing_keys if ".lora_" in k or "modules_to_save" in k]
    assert not missing, f"PEFT expected more adapter tensors: {missing[:3]}"
    assert peft_targets(ref) == sorted(pm.store["default"].targets), "PEFT adapted other layers"
    assert_same_weights(tensors, ref)
    assert pm.get_nb_trainable_parameters()[0] == ref.get_nb_trainable_parameters()[0]
    return ref


def assert_same_weights(a: dict, ref) -> None:
    """The tensors peftc saved equal those PEFT would save, key for key and bit for bit."""
    theirs = get_peft_model_state_dict(ref)
    theirs = {k: v for k, v in theirs.items() if not k.endswith(".base_layer.weight")}   # embeddings' own weight
    assert sorted(a) == sorted(theirs), f"keys: only peftc {sorted(set(a) - set(theirs))[:3]}, " \
                                         f"only PEFT {sorted(set(theirs) - set(a))[:3]}"
    unequal = [k for k in a if a[k].shape != theirs[k].shape or not torch.equal(a[k], theirs[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[0]}"


@torch.no_grad()
def peft_ready_(b: Base, pm, seed: int) -> None:
    """Random adapter tensors; an attention module's out_proj B at zero (PEFT 0.21.2 applies that delta twice, see
    tests/test_mha.py)."""
    randomize_(pm, seed)
    ad = pm.store["default"]
    for path in ad.targets:
        if path.rpartition(".")[0] in b.mha:
            w = ad.sites[site_key(path)]
            w.B_r.zero_()
            if w.B_bias is not None:
                w.B_bias.zero_()


def check_equals_peft(data, broad: bool):
    b, seed = draw_base(data, broad)
    spec, _ = data.draw(specs(b, inits=(True, False, "gaussian"), residual=True, peft=True), label="spec")
    x = data.draw(call_inputs(b, seed), label="inputs")
    pm = compile_(b, spec, seed).eval()
    peft_ready_(b, pm, seed)
    ref = with_peft(b, spec, pm).eval()
    want = out(b, ref, x)
    if b.dtype != torch.float64:
        ref64 = copy.deepcopy(ref).double()         # the same weights exactly, computed in float64
        noise = [out(b, rounded(ref, seed + i), x) for i in range(2)]
        tol = assert_as_close_as_peft(out(b, pm, x), want, out(b, ref64, to64(x)), b.dtype, "peftc vs PEFT",
                                      also=noise)
    else:
        tol = assert_near(out(b, pm, x), want, b.dtype, "peftc vs PEFT")
    assert_moved(want, out(b, b.model, x), tol, b.dtype, "PEFT")


def to64(x):
    """Call inputs with every floating tensor in float64."""
    args, kw = x
    up = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v   # noqa: E731
    return tuple(map(up, args)), {k: up(v) for k, v in kw.items()}


@torch.no_grad()
def rounded(model, seed: int):
    """A copy of `model` whose floating weights each moved by up to half an ulp of their dtype (a random relative
    perturbation, then rounding back): the model as another valid rounding of its weights would hold it."""
    m, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    for p in m.parameters():
        if p.is_floating_point():
            u = torch.rand(p.shape, generator=g, dtype=torch.float64) - 0.5
            p.copy_(p.double() * (1 + torch.finfo(p.dtype).eps * u))
    return m


def assert_as_close_as_peft(got, theirs, exact, dtype, what: str, also=()) -> float:
    """float32 and bfloat16: peftc and PEFT round differently (op order), and through an ill-conditioned network (a
    saturated softmax) a one-ulp difference grows past any fixed tolerance. The field's test for that instead:
    peftc's error against the float64 result of the same weights is at most twice PEFT's own error, plus 4 ulps of
    `dtype` at the output's scale. PEFT's error is one draw of this network's rounding noise, and a max over a few
    elements is a noisy statistic (on one drawn Llama, PEFT's error was 16 ulps and on five roundings of its weights
    16 to 84; peftc's 44): `also` holds PEFT's outputs on such roundings (`rounded`), and the largest of those errors
    counts. Returns the bound."""
    exact = exact.double()
    err = lambda y: (y.double() - exact).abs().max().item()          # noqa: E731
    ours, peft = err(got), max(err(y) for y in (theirs, *also))
    bound = 2 * peft + 4 * torch.finfo(dtype).eps * scale_of(exact)
    assert ours <= bound, f"{what}: peftc's error against float64 {ours:.3g} > 2 x PEFT's {peft:.3g} + 4 ulps"
    return bound


@FAST
@given(data=st.data())
def test_equals_peft_on_the_same_weights(data):
    check_equals_peft(data, broad=False)


@pytest.mark.slow
@BROAD
@given(data=st.data())
def test_equals_peft_on_the_same_weights_broadly(data):
    check_equals_peft(data, broad=True)


# --- training: gradients of the adapter equal PEFT's, the model gets none -----------------------------------------------

def check_gradients_equal_peft(data, broad: bool):
    """Broadly, in float64 only, as torch.autograd.gradcheck: a wrong gradient formula shows there (peftc and PEFT
    agree to ~1e-11 of the largest entry), while in float32 a random, ill-conditioned network (a saturated softmax)
    amplifies two valid summation orders apart by 1e-4 relative, past any bound that would still catch a small error.
    The default profile keeps float32 on its fixed examples. Even in float64 that amplification reaches 7e-10 of the
    largest entry on a drawn nn.MultiheadAttention model: each gradient's bound adds twice the distance between
    PEFT's gradient and PEFT's on a rounding of its weights (`rounded`), this network's own rounding noise."""
    b, seed = draw_base(data, broad, dtypes=(torch.float64,) if broad else None)
    spec, _ = data.draw(specs(b, inits=(True, False, "gaussian"), residual=True, peft=True, dropout=False),
                        label="spec")
    x = data.draw(call_inputs(b, seed), label="inputs")
    pm = compile_(b, spec, seed)
    peft_ready_(b, pm, seed)
    ref = with_peft(b, spec, pm)
    low = b.dtype != torch.float64
    ref64 = copy.deepcopy(ref).double() if low else None       # the float64 result of the same weights
    runs = [(pm, x), (ref, x), (ref64, to64(x)) if low else (rounded(ref, seed), x)]
    for m, _ in runs:
        m.train()
    losses, ys = [], []
    for m, xi in runs:
        y = b.call(m, xi)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        loss = (y.double() * w).sum()        # summed in float64: a bfloat16 sum's own rounding is no difference
        loss.backward()
        losses.append(loss.detach())
        ys.append(y.detach())
    if low:    # the training outputs, element by element (a weighted sum of errors is a noisier statistic)
        assert_as_close_as_peft(ys[0], ys[1], ys[2], b.dtype, "training output")
    else:
        assert_near(losses[0], losses[1], b.dtype, "loss")
    theirs = [peft_tensors(m) for m, _ in runs[1:]]
    ours = dict(pm.store.peft_parameters("default"))
    grads = 0
    for key, p in ours.items():
        mine, q = p.grad, theirs[0][key]
        if q.grad is None:
            assert mine is None or not mine.any(), f"{key}: peftc has a gradient, PEFT none"
            continue
        assert mine is not None, f"{key}: no gradient (PEFT's max |grad| {q.grad.abs().max().item():.3g})"
        if low:
            assert_as_close_as_peft(mine, q.grad, theirs[1][key].grad, b.dtype, f"grad of {key}")
        else:
            noise = (q.grad - theirs[1][key].grad).abs().max().item()
            tol = TOLS[b.dtype] * scale_of(q.grad) + 2 * noise
            torch.testing.assert_close(mine, q.grad, rtol=0, atol=tol, msg=lambda m: f"grad of {key}: {m} "
                                       f"(PEFT's own rounding noise {noise:.3g})")
        grads += bool(q.grad.any())
    assert grads, "no adapter tensor got a non-zero gradient"
    assert all(p.grad is None for p in b.model.parameters()), "the user's model got gradients"


def peft_tensors(ref) -> dict:
    """PEFT's checkpoint key -> the model's own parameter holding it (and its .grad)."""
    by_ptr = {p.data_ptr(): p for p in ref.parameters()}
    return {k: by_ptr[t.data_ptr()] for k, t in get_peft_model_state_dict(ref).items() if t.data_ptr() in by_ptr}


@FAST
@given(data=st.data())
def test_gradients_equal_peft(data):
    check_gradients_equal_peft(data, broad=False)


@pytest.mark.slow
@BROAD
@given(data=st.data())
def test_gradients_equal_peft_broadly(data):
    check_gradients_equal_peft(data, broad=True)


# --- invalid combinations are refused, naming the option, leaving the model as it was --------------------------------

INVALID = {
    # name: (arch, dtype, LoRA keyword arguments, the message names)
    "dora on attention module": ("mha", torch.float32, dict(targets=["attn"], use_dora=True), r"use_dora .*attn"),
    "pissa on attention module": ("mha", torch.float32, dict(targets=["attn"], init="pissa"), r"init='pissa'"),
    "lora_bias on embedding": ("kinds", torch.float32, dict(targets=["emb"], lora_bias=True), r"lora_bias on emb"),
    "olora on conv": ("kinds", torch.float32, dict(targets=["img"], init="olora"), r"init='olora' on img"),
    "rank not a multiple of groups": ("kinds", torch.float32, dict(r=3, targets=["img2"]), r"r=3 at img2"),
    "rank above the layer": ("attn", torch.float32, dict(r=17, targets=["q"]), r"r=17 is larger"),
    "olora on Conv1D": ("gpt2", torch.float32, dict(targets=["c_attn"], init="olora"), r"olora"),
    "pissa in float64": ("attn", torch.float64, dict(targets=["q"], init="pissa"), r"pissa|float64"),
    "orthogonal with odd rank": ("attn", torch.float32, dict(r=3, targets=["q"], init="orthogonal"), r"even rank"),
    "rank_pattern key matching nothing": ("llama", torch.float32, dict(targets=["q_proj"], rank_pattern={"nowhere": 2}),
                                          r"rank_pattern key 'nowhere'"),
    "exclude everything": ("attn", torch.float32, dict(targets=["q", "v"], exclude_modules=".*"), r"exclude_modules"),
    "no such layer": ("llama", torch.float32, dict(targets=["q_proj"], layers_to_transform=[7], layers_pattern="layers"),
                      r"layers_to_transform"),
    "target nowhere": ("gpt2", torch.float32, dict(targets=["q_proj"]), r"q_proj"),
    "target and modules_to_save": ("attn", torch.float32, dict(targets=["head"], modules_to_save=["head"]),
                                   r"both adapter targets and modules_to_save"),
    "dora with lora_bias": ("attn", torch.float32, dict(use_dora=True, lora_bias=True), r"lora_bias=True"),
    "layers with a regex target": ("llama", torch.float32, dict(targets=".*q_proj", layers_to_transform=0),
                                   r"layers_to_transform"),
    "layers_pattern alone": ("llama", torch.float32, dict(targets=["q_proj"], layers_pattern="layers"),
                             r"layers_pattern"),
    "zero rank": ("attn", torch.float32, dict(r=0), r"r=0"),
    "dropout of one": ("attn", torch.float32, dict(dropout=1.0), r"dropout"),
    "unknown bias mode": ("attn", torch.float32, dict(bias="some"), r"bias must be one of"),
    "data-driven init": ("attn", torch.float32, dict(init="corda"), r"corda|CorDA"),
    "lora_bias on attention module": ("mha", torch.float32, dict(targets=["attn"], lora_bias=True),
                                      r"lora_bias on blocks\.0\.attn \(nn\.MultiheadAttention\)"),
    "lora_bias with a gaussian init": ("attn", torch.float32, dict(lora_bias=True, init="gaussian"),
                                       r"lora_bias=True is only supported with init=True or init=False"),
    "pissa with a negative alpha": ("attn", torch.float32, dict(targets=["q"], init="pissa", alpha=-4),
                                    r"'pissa' needs a finite, positive scale"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_combinations_are_refused_clearly(case):
    arch, dtype, kwargs, match = INVALID[case]
    b = base(arch, dtype)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    with pytest.raises(peftc.SpecError, match=match):
        compile_(b, peftc.LoRA(**kwargs))
    assert all(torch.equal(v, before[k]) for k, v in b.model.state_dict().items()), "the model was changed"
