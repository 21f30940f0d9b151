"""add_weighted_adapter: "linear", "cat" and "svd" give PEFT's new adapter (rank, alpha, sites, outputs); errors
leave the model as it was."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

import peftc
from peftc.store import site_key
from tests.models import make
from tests.parity import MOVED, STD, TOL, assert_parity, lora_config, max_diff, parity_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARCH = "llama"
# name -> peftc.LoRA keyword arguments; ranks, alphas, rsLoRA and sites all differ (a, c: one rank for "linear")
ADAPTERS = {
    "a": dict(r=8, alpha=16.0),                                               # q_proj, v_proj (PEFT's default)
    "b": dict(r=4, alpha=16.0, targets=["k_proj", "v_proj"]),
    "c": dict(r=8, alpha=4.0, targets=["k_proj", "o_proj"], use_rslora=True),
}
# id -> add_weighted_adapter arguments (the new adapter's name is the id)
CASES = {
    "linear": dict(adapters=["a", "c"], weights=[0.7, -0.4], combination_type="linear"),
    "linear-rslora-first": dict(adapters=["c", "a"], weights=[1.0, 0.5], combination_type="linear"),
    "cat": dict(adapters=["a", "b"], weights=[1.0, 0.5], combination_type="cat"),
    "cat-rslora-first": dict(adapters=["c", "b", "a"], weights=[0.3, -1.2, 0.8], combination_type="cat"),
    "svd": dict(adapters=["a", "b"], weights=[0.6, 0.8]),                                     # rank max(8, 4)
    "svd-rank3-clamp": dict(adapters=["b", "a"], weights=[1.0, -0.5], svd_rank=3, svd_clamp=0.9),
    "svd-reduced": dict(adapters=["a", "b", "c"], weights=[0.5, 0.5, 1.0], svd_rank=12, svd_full_matrices=False),
    "one-adapter": dict(adapters=["b"], weights=[0.5], combination_type="svd"),               # PEFT: linear
}
SVD_RTOL = 1e-3   # of the updates B A: PEFT's SVD and ours sum in another order (outputs still agree to 1e-4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(peftc, PEFT): the same three random adapters, saved by PEFT and loaded by peftc."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    names = list(ADAPTERS)
    ref = get_peft_model(make(ARCH), lora_config(ARCH, **ADAPTERS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        ref.add_adapter(name, lora_config(ARCH, **ADAPTERS[name]))
    _randomize_peft_(ref)
    ref.eval()
    root = tmp_path_factory.mktemp("adapters")
    ref.save_pretrained(root)                       # non-default adapters: root/<name>
    pm = peftc.load_adapter(make(ARCH), root / names[0], adapter_name=names[0])
    for name in names[1:]:
        pm.load_adapter(root / name, name)
    yield pm, ref
    torch.set_num_threads(threads)


@torch.no_grad()
def _randomize_peft_(model) -> None:
    """Random non-zero lora_B for every adapter at its own sites (parity.randomize_peft_ wants every site)."""
    g = torch.Generator().manual_seed(10)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for lin in m.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * STD)


def _products(state: dict, scale: float) -> dict[str, torch.Tensor]:
    """site -> scale * B @ A, the new adapter's weight update."""
    sites = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    return {s: scale * state[f"{s}.lora_B.weight"] @ state[f"{s}.lora_A.weight"] for s in sites}


@pytest.mark.parametrize("case", CASES)
def test_matches_peft(pair, case):
    pm, ref = pair
    args = CASES[case]
    pm.add_weighted_adapter(adapter_name=case, **args)
    ref.add_weighted_adapter(adapter_name=case, **args)
    assert pm.active_adapter == "a" and pm.adapters[-1] == case

    cfg, spec = ref.peft_config[case], pm.store[case].spec
    assert (spec.r, spec.alpha, spec.use_rslora) == (cfg.r, cfg.lora_alpha, cfg.use_rslora)
    assert spec.alpha == spec.r                                       # PEFT: lora_alpha = new r
    ours, theirs = pm.store.peft_state_dict(case), get_peft_model_state_dict(ref, adapter_name=case)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}   # sites and rank
    assert not any(p.requires_grad for p in pm.store[case].parameters())                  # frozen, as in PEFT
    scale = next(iter(pm.store[case].sites.values())).scale
    if "svd" in case:          # factors are unique up to signs: compare the updates
        a, b = _products(ours, scale), _products(theirs, scale)
        for k in a:
            err = (a[k] - b[k]).norm() / b[k].norm()
            assert err <= SVD_RTOL, f"{k}: relative difference {err:.3g}"
    else:
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)

    pm.set_adapter(case)
    ref.set_adapter(case)
    tol = TOL[peftc.LoRA]
    try:
        xs = parity_inputs(ARCH)
        with pm.disable_adapters():
            assert max_diff(pm, ref, xs[0]) > MOVED * tol, "the new adapter left the output unchanged"
        for x in xs:
            assert_parity(pm, ref, x, tol)
    finally:
        pm.set_adapter("a")
        ref.set_adapter("a")


@pytest.mark.parametrize("kwargs", [dict(combination_type="cat"), dict(combination_type="svd", svd_rank=12)],
                         ids=["cat", "svd-full-rank"])
def test_exact_update(pair, kwargs):
    """cat, and svd at a rank that loses nothing, give every site the update sum_i w_i s_i B_i A_i."""
    pm, _ = pair
    adapters, weights = ["a", "b"], [0.5, -2.0]
    pm.add_weighted_adapter(adapters, weights, "exact", **kwargs)
    try:
        new = pm.store["exact"]
        assert new.targets == [p for p in pm.sites if any(p in pm.store[a].targets for a in adapters)]
        for path in new.targets:
            got = _update(new, path)
            want = sum(w * _update(pm.store[a], path) for a, w in zip(adapters, weights) if path in pm.store[a].targets)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=path)
    finally:
        pm.delete_adapter("exact")


def _update(adapter, path: str) -> torch.Tensor:
    w = adapter.sites[site_key(path)]
    return w.scale * w.B @ w.A                                          # (out, in)


def test_saved_combination_loads_in_peft(pair, tmp_path):
    """The new adapter's checkpoint (union of sites, r = lora_alpha) gives the same outputs in PEFT."""
    pm, _ = pair
    pm.add_weighted_adapter(["b", "a"], [1.0, 0.5], "mix", combination_type="cat")
    try:
        pm.save_adapter(tmp_path, "mix")
        ref = PeftModel.from_pretrained(make(ARCH), tmp_path / "mix").eval()
        pm.set_adapter("mix")
        for x in parity_inputs(ARCH):
            assert_parity(pm, ref, x, TOL[peftc.LoRA])
    finally:
        pm.set_adapter("a")
        pm.delete_adapter("mix")


@pytest.fixture(scope="module")
def with_saved(pair):
    pm, _ = pair
    pm.add_adapter("m", peftc.LoRA(r=8, modules_to_save=["lm_head"]))
    yield pm
    pm.delete_adapter("m")


ERRORS = {
    "unknown adapter": (dict(adapters=["a", "zz"], weights=[1, 1]), peftc.InputError, r"unknown.*'zz'.*adapters: \["),
    "weights length": (dict(adapters=["a", "b"], weights=[1.0]), peftc.InputError, "one number per adapter"),
    "weights nan": (dict(adapters=["a", "b"], weights=[1.0, float("nan")]), peftc.InputError, "finite"),
    "name exists": (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="b"), peftc.SpecError, "exists already"),
    "linear ranks": (dict(adapters=["a", "b"], weights=[1, 1], combination_type="linear"), peftc.SpecError,
                     r"one rank, got ranks \[8, 4\]"),
    "modules_to_save": (dict(adapters=["a", "m"], weights=[1, 1]), peftc.SpecError, "modules_to_save"),
    "ties": (dict(adapters=["a", "c"], weights=[1, 1], combination_type="ties"), peftc.SpecError,
             r"not supported yet.*supported: \['cat', 'linear', 'svd'\]"),
    "unknown type": (dict(adapters=["a", "c"], weights=[1, 1], combination_type="mean"), peftc.SpecError,
                     r"supported: \['cat', 'linear', 'svd'\]"),
    "svd_rank": (dict(adapters=["a", "b"], weights=[1, 1], svd_rank=0), peftc.SpecError, "svd_rank"),
    "bad name": (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a.b"), peftc.SpecError, "adapter_name"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_error_leaves_model_unchanged(with_saved, case):
    pm = with_saved
    kwargs, error, match = ERRORS[case]
    kwargs = {"adapter_name": "new", **kwargs}
    x = parity_inputs(ARCH)[1]
    before_names, active = pm.adapters, pm.active_adapter
    with torch.no_grad():
        before = pm(**x)["logits"]
    with pytest.raises(error, match=match):
        pm.add_weighted_adapter(**kwargs)
    assert (pm.adapters, pm.active_adapter) == (before_names, active)
    with torch.no_grad():
        assert torch.equal(pm(**x)["logits"], before)
