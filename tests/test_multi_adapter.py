"""Several adapters in one PeftModule: managing them, mixed batches (one adapter per row), parity with PEFT's
adapter_names, training on a mixed batch, and bad input that leaves the adapters as they were."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import peftc
from tests.models import inputs, main_output, make
from tests.parity import MOVED, STD, TOL, assert_parity, assert_same_weights, lora_config, randomize_ours_

# PEFT warns about GPT-2's Conv1D (fan_in_fan_out); it says nothing about parity.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BASE = "__base__"
ROW_TOL = 1e-5  # a row of a mixed batch vs the same row run alone with its adapter

# Three adapters per arch, with different ranks and targets: "default" (PEFT's default targets), "b" and "c".
ADAPTERS = {
    "llama": {"default": dict(r=4), "b": dict(r=2, targets=["k_proj", "mlp.down_proj"]),
              "c": dict(r=6, targets="all-linear")},
    "gpt2": {"default": dict(r=4), "b": dict(r=2, targets=["c_proj"]),                       # Conv1D sites
             "c": dict(r=6, targets=["c_fc", "transformer.h.1.attn.c_attn"])},
    "bert": {"default": dict(r=4), "b": dict(r=2, targets=["key", "output.dense"]),
             "c": dict(r=6, targets=["intermediate.dense", "query"])},
}


def out(pm, x: dict, **kw) -> torch.Tensor:
    with torch.no_grad():
        return main_output(pm(**x, **kw))


def row(x: dict, i) -> dict:
    """Row(s) `i` of a batch of inputs (an int keeps the batch dim)."""
    return {k: v[i:i + 1] if isinstance(i, int) else v[i] for k, v in x.items()}


def build(arch: str, names=("default", "b", "c")):
    """(the user's model, a PeftModule with the adapters `names` of ADAPTERS[arch], each with random non-zero B)."""
    model = make(arch)
    pm = peftc.compile(model, peftc.LoRA(**ADAPTERS[arch][names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, peftc.LoRA(**ADAPTERS[arch][n]))
    for seed, n in enumerate(names):
        randomize_ours_(pm, seed=10 + seed, name=n)
    return model, pm


def alone(pm, x: dict, name: str) -> torch.Tensor:
    """`x` run with `name` active for the whole batch (the non-mixed path); the active adapter is kept."""
    prev = pm.active_adapter
    if name == BASE:
        with pm.disable_adapters():
            return out(pm, x)
    pm.set_adapter(name)
    try:
        return out(pm, x)
    finally:
        pm.set_adapter(prev)


def assert_rows_alone(pm, x: dict, names: list[str], mixed: torch.Tensor, base_model=None) -> None:
    """Row i of the mixed output equals row i run alone with names[i] (and "__base__" rows equal the model's own)."""
    for i, name in enumerate(names):
        ref = alone(pm, row(x, i), name)[0]
        diff = (mixed[i] - ref).abs().max().item()
        assert diff <= ROW_TOL, f"row {i} ({name!r}) of the mixed batch differs from the row alone by {diff:.3g}"
        if name == BASE and base_model is not None:
            with torch.no_grad():
                own = main_output(base_model(**row(x, i)))[0]
            assert (mixed[i] - own).abs().max().item() <= ROW_TOL, f"base row {i} differs from the model's own"


# --- 1. managing adapters ------------------------------------------------------------------------------------------
def test_add_set_delete_disable():
    model, pm = build("llama", names=("default", "b"))
    x = inputs("llama")
    assert pm.adapters == ["default", "b"] and pm.active_adapter == "default", "add_adapter changed the active one"
    ya = out(pm, x)
    pm.set_adapter("b")
    assert pm.active_adapter == "b"
    yb = out(pm, x)
    assert (ya - yb).abs().max() > MOVED * TOL[peftc.LoRA], "adapters default and b give the same output"
    for name, y in [("default", ya), ("b", yb), ("default", ya), ("default", ya), ("b", yb)]:
        pm.set_adapter(name)
        assert torch.equal(out(pm, x), y), f"set_adapter({name!r}) back and forth changed the output"

    with torch.no_grad():
        own = main_output(model(**x))
    with pm.disable_adapters():
        assert torch.equal(out(pm, x), own), "disable_adapters is not exactly the base model"
        assert torch.equal(out(pm, x, adapter_names=[BASE] * 3), own)
    assert pm.active_adapter == "b" and torch.equal(out(pm, x), yb), "disable_adapters did not restore b"
    with pytest.raises(RuntimeError, match="boom"):
        with pm.disable_adapters():
            raise RuntimeError("boom")
    assert torch.equal(out(pm, x), yb), "an error inside disable_adapters left the adapters off"

    # adding an adapter changes neither the active adapter nor its output
    pm.add_adapter("c", peftc.LoRA(**ADAPTERS["llama"]["c"]))
    assert pm.adapters == ["default", "b", "c"] and pm.active_adapter == "b"
    torch.testing.assert_close(out(pm, x), yb, rtol=0, atol=ROW_TOL)
    assert {id(p) for p in pm.trainable_parameters()} == {id(p) for p in pm.store["b"].parameters()}
    assert {id(p) for p in pm.trainable_parameters("c")} == {id(p) for p in pm.store["c"].parameters()}

    pm.set_adapter("default")
    pm.delete_adapter("b")
    assert pm.adapters == ["default", "c"] and pm.active_adapter == "default"
    torch.testing.assert_close(out(pm, x), ya, rtol=0, atol=ROW_TOL)
    pm.delete_adapter("c")
    assert pm.adapters == ["default"]
    torch.testing.assert_close(out(pm, x), ya, rtol=0, atol=ROW_TOL)
    with pm.disable_adapters():
        assert torch.equal(out(pm, x), own)


def test_set_adapter_inside_disable_adapters_stays_consistent():
    """After a disable_adapters block the adapter that runs is pm.active_adapter, whatever happened inside."""
    model, pm = build("llama")
    x = inputs("llama")
    expected = {n: alone(pm, x, n) for n in pm.adapters}
    with pm.disable_adapters():
        pm.set_adapter("b")
    assert pm.active_adapter == "b"
    same = torch.equal(out(pm, x), expected["b"])
    assert same, "after set_adapter('b') inside disable_adapters, active_adapter says 'b' but another adapter runs"
    pm.set_adapter("c")
    with pm.disable_adapters():
        pm.delete_adapter("b")                      # the slots move: c goes from slot 3 to 2
    same = torch.equal(out(pm, x), expected["c"])
    assert same, "after delete_adapter inside disable_adapters, the active adapter c does not run"


def test_save_all_adapters_in_peft_layout_and_peft_loads_them(tmp_path):
    """save_adapter() writes "default" in dir and the others in dir/<name>; PEFT loads them and, with each adapter
    active, gives peftc's outputs (adapters of different ranks and targets: an untargeted site adds nothing)."""
    arch = "llama"
    _, pm = build(arch)
    written = pm.save_adapter(tmp_path)
    assert [Path(p) for p in written] == [tmp_path, tmp_path / "b", tmp_path / "c"]
    for d in written:
        assert sorted(f.name for f in Path(d).iterdir() if f.is_file()) == \
            ["adapter_config.json", "adapter_model.safetensors"]
    assert not (tmp_path / "default").exists()
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 2

    one = tmp_path / "one"
    pm.save_adapter(one, adapter_name="b")
    assert sorted(p.name for p in one.iterdir()) == ["b"], "save_adapter(adapter_name='b') wrote more than b"

    ref = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    ref.load_adapter(tmp_path / "b", adapter_name="b")
    ref.load_adapter(tmp_path / "c", adapter_name="c")
    x = inputs(arch)
    for name in ("b", "default", "c"):
        ref.set_adapter(name)
        pm.set_adapter(name)
        assert_same_weights(pm, ref, name)
        assert_parity(pm, ref, x, TOL[peftc.LoRA])
    # and back in peftc: one adapter alone (nothing else in the store) gives the same outputs as b among three
    single = peftc.load_adapter(make(arch), tmp_path / "b")
    pm.set_adapter("b")
    torch.testing.assert_close(out(single, x), out(pm, x), rtol=0, atol=ROW_TOL)


# --- 2. mixed batches: each row equals the row alone ----------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ADAPTERS))
def test_mixed_batch_rows_equal_rows_alone(arch):
    model, pm = build(arch)
    x = inputs(arch, batch=4, seq=9)                 # row 1 is left-padded
    with torch.no_grad():
        own = main_output(model(**x))
    active = out(pm, x)
    for names in (["b", "default", BASE, "c"], ["c", BASE, "b", "b"], ["default", "c", "default", BASE]):
        mixed = out(pm, x, adapter_names=names)
        for i, n in enumerate(names):
            if n != BASE:
                assert (mixed[i] - own[i]).abs().max() > MOVED * TOL[peftc.LoRA], f"adapter {n!r} is a no-op"
        assert_rows_alone(pm, x, names, mixed, base_model=model)
        by_index = out(pm, x, adapter_index=pm.adapter_index(names))
        assert torch.equal(by_index, mixed), "adapter_index and adapter_names route differently"
        assert torch.equal(out(pm, x), active), "a mixed call changed the routing of the next plain call"
    assert pm.active_adapter == "default"


def test_large_mixed_batch_routes_every_row():
    """The rows' slots are the call's own input, with no buffer of fixed size behind them: a batch of 1030 rows
    (past any small fixed row capacity) routes every row."""
    _, pm = build("llama")
    n = 1030
    x = inputs("llama", batch=n, seq=3, pad_row=False)
    names = [(BASE, "default", "b", "c")[i % 4] for i in range(n)]
    mixed = out(pm, x, adapter_names=names)
    picks = [0, 1, 2, 3, n - 2, n - 1]
    assert_rows_alone(pm, row(x, picks), [names[i] for i in picks], mixed[picks])


# --- 3. mixed batches equal PEFT's adapter_names -------------------------------------------------------------------
@torch.no_grad()
def randomize_peft_adapter_(model, seed: int, name: str) -> None:
    """Random lora_B of adapter `name` where it has one (adapters of other targets skip the layer)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLayer) and name in m.lora_B:
            w = m.lora_B[name].weight
            w.copy_(torch.randn(w.shape, generator=g) * STD)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_matches_peft_adapter_names(arch, tmp_path):
    ref = get_peft_model(make(arch), lora_config(arch, **ADAPTERS[arch]["default"]))
    for name in ("b", "c"):
        ref.add_adapter(name, lora_config(arch, **ADAPTERS[arch][name]))
    for seed, name in enumerate(("default", "b", "c")):
        randomize_peft_adapter_(ref, seed=20 + seed, name=name)
    ref.eval()
    ref.save_pretrained(tmp_path)

    base = make(arch)
    pm = peftc.load_adapter(base, tmp_path)
    pm.load_adapter(tmp_path / "b", "b")
    pm.load_adapter(tmp_path / "c", "c")
    assert pm.adapters == ["default", "b", "c"]
    x = inputs(arch, batch=4, seq=9)
    tol = TOL[peftc.LoRA]
    for names in (["c", "b", BASE, "default"], ["b", "default", "c", "b"]):
        with torch.no_grad():
            ours, theirs = main_output(pm(**x, adapter_names=names)), main_output(ref(**x, adapter_names=names))
            own = main_output(base(**x))
        diff = (ours - theirs).abs().max().item()
        assert diff <= tol, f"mixed batch {names} differs from PEFT's adapter_names by {diff:.3g}"
        for i, n in enumerate(names):
            if n != BASE:
                assert (ours[i] - own[i]).abs().max() > MOVED * tol, f"adapter {n!r} left row {i} unchanged"


# --- 4. training with a mixed batch ----------------------------------------------------------------------------------
def test_training_on_a_mixed_batch():
    model, pm = build("llama")
    pm.train()
    x = inputs("llama", batch=4, seq=9)
    names = ["default", "b", "default", BASE]           # c is in no row
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 9, 128, generator=g)               # (B, T, V): a loss that is a sum over rows

    def loss_of(xs, ws, **kw):
        return (main_output(pm(**xs, **kw)) * ws).sum()

    loss_of(x, w, adapter_names=names).backward()
    grads = {n: {k: p.grad.clone() if p.grad is not None else None for k, p in pm.store[n].named_parameters()}
             for n in pm.adapters}
    for n in ("default", "b"):
        for k, gr in grads[n].items():
            assert gr is not None and gr.abs().sum() > 0, f"{n}.{k} got no gradient from its rows"
    assert all(gr is None or not gr.any() for gr in grads["c"].values()), "an adapter in no row got a gradient"
    assert all(p.grad is None for p in model.parameters()), "a base weight got a gradient"

    # each adapter's gradient is the gradient of its own rows run alone with it active
    for n in ("default", "b"):
        pm.zero_grad(set_to_none=True)
        rows = [i for i, m in enumerate(names) if m == n]
        pm.set_adapter(n)
        loss_of(row(x, rows), w[rows]).backward()
        for k, p in pm.store[n].named_parameters():
            torch.testing.assert_close(grads[n][k], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}.{k}: {m}")
    pm.set_adapter("default")

    # an optimizer step on the active adapter's parameters changes only that adapter
    pm.zero_grad(set_to_none=True)
    loss_of(x, w, adapter_names=names).backward()
    before = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(pm.trainable_parameters(), lr=0.1)
    opt.step()
    after = pm.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    mine = {k for k in before if ".adapters.default." in k}
    assert changed and changed <= mine, f"the step changed {sorted(changed - mine)[:3]} outside 'default'"
    assert all(torch.equal(base_before[k], v) for k, v in model.state_dict().items()), "a base weight moved"


# --- 5. property: random assignments over adapters of random ranks ---------------------------------------------------
_CACHE: dict = {}
TARGETS = [None, "all-linear", ["up_proj", "o_proj"], ["k_proj"], ["q_proj", "mlp.down_proj"]]


def cached_llama():
    """(model, PeftModule): built once for the property test; each example replaces its adapters a1..a3."""
    if "pm" not in _CACHE:
        model = make("llama")
        _CACHE["pm"] = (model, peftc.compile(model, peftc.LoRA(r=1)))
    return _CACHE["pm"]


@pytest.mark.slow       # long: runs in CI's slow pass
@settings(max_examples=10, deadline=None, derandomize=True)
@given(ranks=st.lists(st.integers(1, 6), min_size=3, max_size=3),
       targets=st.lists(st.integers(0, len(TARGETS) - 1), min_size=3, max_size=3),
       names=st.lists(st.sampled_from(["a1", "a2", "a3", BASE]), min_size=1, max_size=5),
       seed=st.integers(0, 2**16))
def test_random_mixed_batches_equal_rows_alone(ranks, targets, names, seed):
    model, pm = cached_llama()
    for i, (r, t) in enumerate(zip(ranks, targets), start=1):
        name = f"a{i}"
        if name in pm.adapters:
            pm.delete_adapter(name)
        pm.add_adapter(name, peftc.LoRA(r=r, targets=TARGETS[t]))
        randomize_ours_(pm, seed=seed + i, name=name)
    assert pm.active_adapter == "default"
    x = inputs("llama", batch=len(names), seq=7, seed=seed)
    mixed = out(pm, x, adapter_names=names)
    assert_rows_alone(pm, x, names, mixed, base_model=model)


# --- 6. bad input: a clear error, and the adapters stay as they were -------------------------------------------------
@pytest.fixture(scope="module")
def two():
    """A llama PeftModule with adapters default (active) and b, its inputs and its outputs before any error."""
    model, pm = build("llama", names=("default", "b"))
    x = inputs("llama")
    names = ["b", BASE, "default"]
    return pm, x, names, out(pm, x), out(pm, x, adapter_names=names)


def assert_unchanged(two) -> None:
    pm, x, names, active, mixed = two
    assert pm.adapters == ["default", "b"], f"the adapters changed: {pm.adapters}"
    assert pm.active_adapter == "default"
    assert torch.equal(out(pm, x), active), "the active adapter's output changed after the error"
    assert torch.equal(out(pm, x, adapter_names=names), mixed), "the mixed output changed after the error"


KNOWN = r"adapters: \['default', 'b'\]"


def _broken_dirs(pm, tmp: Path) -> dict[str, Path]:
    """Adapter directories that must not load: missing, no weights, truncated weights, another rank, other keys."""
    pm.save_adapter(tmp / "ok", adapter_name="b")
    ok = tmp / "ok" / "b"
    dirs = {"missing": tmp / "nothing-here"}
    for what in ("no-weights", "truncated", "other-rank", "other-targets"):
        d = tmp / what
        d.mkdir()
        cfg = json.loads((ok / "adapter_config.json").read_text())
        weights = (ok / "adapter_model.safetensors").read_bytes()
        if what == "truncated":
            weights = weights[: len(weights) // 2]
        elif what == "other-rank":
            cfg["r"] = 3                     # shapes no longer fit: fails after the adapter was added
        elif what == "other-targets":
            cfg["target_modules"] = ["q_proj"]
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        if what != "no-weights":
            (d / "adapter_model.safetensors").write_bytes(weights)
        dirs[what] = d
    return dirs


def _load_broken(what: str):
    return lambda pm, x, tmp: pm.load_adapter(_broken_dirs(pm, tmp)[what], "c")


# case -> (action(pm, inputs, tmp_path), the error, a regex its message must contain)
BAD = {
    "set_adapter unknown": (lambda pm, x, t: pm.set_adapter("nope"), peftc.InputError, "'nope'.*" + KNOWN),
    "delete_adapter unknown": (lambda pm, x, t: pm.delete_adapter("nope"), peftc.InputError, "'nope'.*" + KNOWN),
    "adapter_names unknown": (lambda pm, x, t: pm(**x, adapter_names=["b", "nope", BASE]), peftc.InputError,
                              r"nope.*adapters: \[.default., .b., .__base__.\]"),
    "adapter_names too short": (lambda pm, x, t: pm(**x, adapter_names=["b", "default"]), peftc.InputError,
                                "one adapter per row"),
    "adapter_names too long": (lambda pm, x, t: pm(**x, adapter_names=["b"] * 4), peftc.InputError,
                               "one adapter per row"),
    "adapter_index wrong length": (lambda pm, x, t: pm(**x, adapter_index=torch.tensor([1, 2])), peftc.InputError,
                                   "one adapter per row"),
    "adapter_index out of range": (lambda pm, x, t: pm(**x, adapter_index=torch.tensor([0, 1, 7])),
                                   peftc.InputError, "7"),
    "adapter_index negative": (lambda pm, x, t: pm(**x, adapter_index=torch.tensor([0, -1, 1])),
                               peftc.InputError, "-1"),
    "mixed call with an unknown input": (lambda pm, x, t: pm(**x, adapter_names=["b", BASE, "b"], bogus=1),
                                         peftc.InputError, "bogus"),
    "delete the active adapter": (lambda pm, x, t: pm.delete_adapter("default"), peftc.InputError,
                                  "active adapter 'default'"),
    "add an existing name": (lambda pm, x, t: pm.add_adapter("b", peftc.LoRA(r=2)), peftc.SpecError, "'b' exists"),
    "add __base__": (lambda pm, x, t: pm.add_adapter(BASE, peftc.LoRA(r=2)), peftc.SpecError, BASE),
    "add with bad targets": (lambda pm, x, t: pm.add_adapter("c", peftc.LoRA(targets=["q_prj"])),
                             peftc.TargetNotFound, "q_prj.*q_proj"),
    "load an existing name": (lambda pm, x, t: pm.load_adapter(t / "nothing-here", "b"), peftc.SpecError,
                              "'b' exists"),
    **{f"load from a broken dir: {what}": (_load_broken(what), peftc.CheckpointError, "")
       for what in ("missing", "no-weights", "truncated", "other-rank", "other-targets")},
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_changes_nothing(two, case, tmp_path):
    pm, x, *_ = two
    action, error, message = BAD[case]
    with pytest.raises(error, match=message):
        action(pm, x, tmp_path)
    assert_unchanged(two)


# --- modules_to_save: routed for the whole batch, so only a batch of one adapter can use them ---------------------
@pytest.fixture(scope="module")
def saving():
    """bert with "default" saving the classifier (and LoRA) and "b" with LoRA only; active: default."""
    model = make("bert")
    pm = peftc.compile(model, peftc.LoRA(r=4, modules_to_save=["classifier"]))
    pm.add_adapter("b", peftc.LoRA(r=2))
    randomize_ours_(pm, seed=1)
    randomize_ours_(pm, seed=2, name="b")
    return pm, inputs("bert")


@pytest.mark.parametrize("names,active", [
    pytest.param(["default"] * 3, "b", id="all-default-while-b-active"),    # default's classifier copy applies
    pytest.param(["b", "b", BASE], "default", id="b-and-base-while-default-active"),  # the original classifier
])
def test_adapter_names_with_modules_to_save_route_each_row(saving, names, active):
    """Batches whose rows need no per-row copy are served (a refusal fails here); a mix that does is refused below."""
    pm, x = saving
    pm.set_adapter(active)
    try:
        mixed = out(pm, x, adapter_names=names)
    finally:
        pm.set_adapter("default")
    assert_rows_alone(pm, x, names, mixed)


def test_adapter_index_with_modules_to_save_is_refused_like_adapter_names(saving):
    pm, x = saving
    names = ["default", "b", BASE]
    with pytest.raises(peftc.InputError, match="modules_to_save"):
        pm(**x, adapter_names=names)
    with pytest.raises(peftc.InputError, match="modules_to_save"):
        pm(**x, adapter_index=pm.adapter_index(names))
