"""A declared capacity (pm.reserve / peftc.compile(capacity=...)): fixed slots at a fixed rank, so adding, loading
and deleting adapters within it writes data and never changes the graph; going past it is a clear error."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftc
from tests.models import inputs, main_output, make
from tests.parity import randomize_ours_
from tests.recompiles import fresh_dynamo, graphs, no_recompiles  # noqa: F401 (fresh_dynamo: autouse fixture)

X = inputs("llama")     # 3 rows x 11 tokens, row 1 left-padded
TOL = 1e-5
BASE = "__base__"


def out(f, x=X, **kw) -> torch.Tensor:
    with torch.no_grad():
        return main_output(f(**x, **kw))


def close(a, b, tol=TOL) -> bool:
    return (a - b).abs().max().item() <= tol


def differ(a, b) -> bool:
    return (a - b).abs().max().item() > 1e-3


def capped(model=None, adapters=4, rank=8, **spec):
    """A PeftModule with "default" (r=4 on q, v, random B) and a capacity of `adapters` x `rank`."""
    model = model or make("llama")
    pm = peftc.compile(model, peftc.LoRA(**{"r": 4, "targets": ["q_proj", "v_proj"], **spec}),
                       capacity=peftc.Capacity(adapters, rank)).eval()
    randomize_ours_(pm, seed=1)
    return model, pm


def uncapped_twin(model, pm) -> peftc.PeftModule:
    """The same adapters (same weights) in a PeftModule without a capacity."""
    names = pm.adapters
    twin = peftc.compile(model, pm.store[names[0]].spec, adapter_name=names[0]).eval()
    for n in names[1:]:
        twin.add_adapter(n, pm.store[n].spec)
    with torch.no_grad():
        for n in names:
            for k, w in pm.store[n].sites.items():
                twin.store[n].sites[k].A.copy_(w.A_r)
                twin.store[n].sites[k].B.copy_(w.B_r)
    twin.set_adapter(pm.active_adapter)
    return twin


def frozen_adapter(pm, tmp_path, name, seed, **spec):
    """Save an adapter (random B) from a scratch PeftModule and load it into `pm` frozen, as a server would."""
    src = peftc.compile(pm.base_model, peftc.LoRA(**spec), adapter_name=name)
    randomize_ours_(src, seed=seed, name=name)
    src.save_adapter(tmp_path / name, adapter_name=name)
    pm.load_adapter(tmp_path / name / name if name != "default" else tmp_path / name, name)


# --- equal to the same adapters without a capacity ---------------------------------------------------------------
def test_capacity_matches_uncapped_model():
    model, pm = capped()
    pm.add_adapter("b", peftc.LoRA(r=8, targets=["k_proj", "o_proj"]))
    pm.add_adapter("c", peftc.LoRA(r=2, targets=["q_proj"], use_rslora=True))
    randomize_ours_(pm, seed=2, name="b")
    randomize_ours_(pm, seed=3, name="c")
    twin = uncapped_twin(model, pm)
    assert pm.store.slots() == [BASE, "default", "b", "c", None]
    for name in pm.adapters:
        pm.set_adapter(name)
        twin.set_adapter(name)
        assert close(out(pm), out(twin))
    names = ["c", BASE, "b"]
    assert close(out(pm, adapter_names=names), out(twin, adapter_names=names))
    with pm.disable_adapters():
        with torch.no_grad():
            assert torch.equal(out(pm), main_output(model(**X)))


def test_weights_are_allocated_at_the_capacity_rank_with_zero_pads():
    _, pm = capped(rank=8)
    w = next(iter(pm.store["default"].sites.values()))
    assert w.A.shape[0] == 8 and w.B.shape[1] == 8 and w.r == 4
    assert w.A_r.shape[0] == 4 and torch.count_nonzero(w.A[4:]) == 0 and torch.count_nonzero(w.B[:, 4:]) == 0
    sd = pm.store.peft_state_dict("default")                   # checkpoints carry the adapter's own rank
    assert all(v.shape[0] == 4 for k, v in sd.items() if "lora_A" in k)
    assert all(v.shape[1] == 4 for k, v in sd.items() if "lora_B" in k)


def test_training_keeps_pads_zero_and_matches_uncapped_gradients():
    model, pm = capped(rank=8)
    twin = uncapped_twin(model, pm)
    pm.train()
    twin.train()
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        grads = []
        for m in (pm, twin):
            m.zero_grad(set_to_none=True)
            main_output(m(**X)).pow(2).mean().backward()
            grads.append({k: (w.A.grad, w.B.grad) for k, w in m.store["default"].sites.items()})
        if step == 0:      # same weights so far: the true-rank part of the gradient is the uncapped gradient
            for k, (gA, gB) in grads[0].items():
                tA, tB = grads[1][k]
                assert close(gA[:4], tA, 1e-4) and close(gB[:, :4], tB, 1e-4)
                assert torch.count_nonzero(gA[4:]) == 0 and torch.count_nonzero(gB[:, 4:]) == 0
        opt.step()
    for w in pm.store["default"].sites.values():
        assert torch.count_nonzero(w.A[4:]) == 0 and torch.count_nonzero(w.B[:, 4:]) == 0


def test_dropout_only_while_some_slot_has_a_rate():
    """A capacity's graph has a dropout module at every site; with no rate in any slot it is the identity in training
    (no masks drawn), and an adapter with lora_dropout turns it on for its rows."""
    _, pm = capped()
    pm.train()
    with torch.no_grad():
        assert torch.equal(main_output(pm(**X)), main_output(pm(**X)))
    pm.add_adapter("drop", peftc.LoRA(r=4, targets=["q_proj"], dropout=0.5, init=False))
    pm.set_adapter("drop")
    with torch.no_grad():
        assert differ(main_output(pm(**X)), main_output(pm(**X)))
        pm.eval()
        assert torch.equal(main_output(pm(**X)), main_output(pm(**X)))
    pm.train()
    pm.set_adapter("default")
    pm.delete_adapter("drop")
    with torch.no_grad():
        assert torch.equal(main_output(pm(**X)), main_output(pm(**X)))


def test_save_load_round_trip_between_capped_and_uncapped(tmp_path):
    model, pm = capped()
    pm.save_adapter(tmp_path)
    plain = peftc.load_adapter(model, tmp_path)
    assert close(out(pm), out(plain))
    _, other = capped(model)
    other.load_adapter(tmp_path, "loaded")
    other.set_adapter("loaded")
    assert close(out(other), out(plain))


def test_merge_under_a_capacity_equals_the_adapter():
    _, pm = capped()
    pm.add_adapter("b", peftc.LoRA(r=8, targets=["k_proj"]))
    randomize_ours_(pm, seed=4, name="b")
    for name in pm.adapters:
        merged = pm.merge(name)
        pm.set_adapter(name)
        assert close(out(merged), out(pm), 1e-4)


def test_deepcopy_is_an_independent_equal_model():
    _, pm = capped()
    twin = copy.deepcopy(pm)
    assert torch.equal(out(twin), out(pm))
    twin.add_adapter("b", peftc.LoRA(r=2, targets=["q_proj"], init=False))
    twin.set_adapter("b")
    assert differ(out(twin), out(pm)) and pm.adapters == ["default"] and pm.store.slots()[2] is None


# --- no recompiles within the capacity -----------------------------------------------------------------------------
@pytest.mark.slow       # long: runs in CI's slow pass
def test_load_and_delete_within_capacity_never_recompile(tmp_path):
    model, pm = capped(adapters=3, rank=8)
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    first = out(compiled)
    out(compiled, adapter_names=["default", BASE, "default"])    # the gathered form's first compile
    with no_recompiles():
        frozen_adapter(pm, tmp_path, "b", seed=5, r=8, targets=["q_proj", "v_proj"])
        frozen_adapter(pm, tmp_path, "c", seed=6, r=2, targets=["q_proj"])
        routed = out(compiled, adapter_names=["c", "b", BASE])
        pm.set_adapter("b")
        as_b = out(compiled)
        pm.set_adapter("default")
        pm.delete_adapter("b")
        frozen_adapter(pm, tmp_path, "d", seed=7, r=4, targets=["v_proj"])
        pm.set_adapter("d")
        as_d = out(compiled)
        pm.set_adapter("default")
        again = out(compiled)
    assert pm.store.slots() == [BASE, "default", "d", "c"]
    assert close(again, first)
    twin = uncapped_twin(model, pm)
    pm_rows = {k: v[:1] for k, v in X.items()}
    assert close(routed[:1], out(twin, pm_rows, adapter_names=["c"]))
    twin.set_adapter("d")
    assert close(as_d, out(twin)) and differ(as_d, first) and differ(as_b, first)


def test_adding_a_trainable_adapter_compiles_once_then_trains():
    """Without autograd a trainable adapter looks like any other (its tensors go in detached): no recompile. Its
    first training call compiles the grad-mode graph once; then it trains."""
    _, pm = capped(adapters=3)
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    out(compiled)
    before = graphs()
    with no_recompiles():
        pm.add_adapter("b", peftc.LoRA(r=4, targets=["q_proj"], init=False))
        pm.set_adapter("b")
        out(compiled)
    assert graphs() == before
    pm.train()
    w = pm.store["b"].sites["model-layers-0-self_attn-q_proj"]
    main_output(compiled(**X)).square().mean().backward()
    assert graphs() == before + 1 and w.B.grad.abs().sum() > 0


# --- past the capacity -------------------------------------------------------------------------------------------
def test_adding_past_the_capacity_is_refused_and_nothing_changes():
    _, pm = capped(adapters=2)
    pm.add_adapter("b", peftc.LoRA(r=4, targets=["q_proj"]))
    before = out(pm)
    with pytest.raises(peftc.InputError, match=r"capacity of 2 adapter.*full.*delete_adapter.*reserve"):
        pm.add_adapter("c", peftc.LoRA(r=4, targets=["q_proj"]))
    assert pm.adapters == ["default", "b"] and torch.equal(out(pm), before)
    randomize_ours_(pm, seed=9, name="b")
    pm.set_adapter("b")
    assert differ(out(pm), before)                              # the others still route
    pm.set_adapter("default")
    pm.delete_adapter("b")
    pm.add_adapter("c", peftc.LoRA(r=4, targets=["q_proj"]))   # room again
    assert pm.store.slots() == [BASE, "default", "c"]


def test_rank_past_the_capacity_is_refused():
    _, pm = capped(rank=8)
    before = out(pm)
    with pytest.raises(peftc.InputError, match=r"r=16, above the declared capacity's rank 8.*reserve\(rank=16\)"):
        pm.add_adapter("big", peftc.LoRA(r=16, targets=["q_proj"]))
    assert pm.adapters == ["default"] and torch.equal(out(pm), before)


@pytest.mark.parametrize("kw, match", [
    (dict(adapters=0, rank=8), "adapters must be a positive integer"),
    (dict(adapters=2, rank=2), r"does not fit adapter 'default': it has rank r=4, above the declared capacity's rank 2.*rank=4"),
])
def test_bad_reserve_is_refused_and_nothing_changes(kw, match):
    _, pm = capped(adapters=2)
    pm.add_adapter("b", peftc.LoRA(r=4, targets=["q_proj"]))
    before = out(pm)
    with pytest.raises((peftc.InputError, peftc.SpecError), match=match):
        pm.reserve(**kw)
    with pytest.raises(peftc.InputError, match=r"below the 2 adapters present"):
        pm.reserve(adapters=1, rank=8)
    assert pm.capacity == peftc.Capacity(2, 8) and torch.equal(out(pm), before)


def test_reserve_with_unknown_targets_is_refused_and_nothing_changes():
    _, pm = capped(adapters=2)
    before = out(pm)
    with pytest.raises(peftc.TargetNotFound, match="nope"):
        pm.reserve(adapters=4, rank=8, targets=["nope"])
    assert pm.capacity == peftc.Capacity(2, 8) and torch.equal(out(pm), before)


def test_reserve_that_fails_while_rewriting_leaves_the_model_as_it_was(monkeypatch):
    _, pm = capped(adapters=2)
    pm.add_adapter("b", peftc.LoRA(r=4, targets=["q_proj"]))
    randomize_ours_(pm, seed=5, name="b")
    before = out(pm, adapter_names=["b", "default", BASE])
    sites_before = {k: w for k, w in pm.store["b"].sites.items()}
    lora = peftc.METHODS[peftc.LoRA]
    real, calls = lora.rewrite, []

    def fail_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setitem(peftc.METHODS, peftc.LoRA, dataclasses.replace(lora, rewrite=fail_once))
    with pytest.raises(peftc.PassError, match="boom"):
        pm.reserve(adapters=4, rank=16)
    assert pm.capacity == peftc.Capacity(2, 8) and pm.store.slots() == [BASE, "default", "b"]
    assert all(pm.store["b"].sites[k] is w for k, w in sites_before.items())
    assert torch.equal(out(pm, adapter_names=["b", "default", BASE]), before)


def test_reserve_grows_with_one_rebuild_and_keeps_weights():
    model, pm = capped(adapters=1, rank=4)
    before = out(pm)
    pm.reserve(adapters=3, rank=16, targets=["k_proj"])
    assert pm.capacity == peftc.Capacity(3, 16, ["k_proj"]) and close(out(pm), before)
    graph = pm.graph_module.graph
    pm.add_adapter("k", peftc.LoRA(r=16, targets=["k_proj"], init=False))    # a reserved site: no new graph
    assert pm.graph_module.graph is graph


def test_new_targets_or_modules_to_save_rebuild_the_graph():
    _, pm = capped(adapters=3)
    graph, code = pm.graph_module.graph, pm._codes["single"]
    pm.add_adapter("same", peftc.LoRA(r=2, targets=["v_proj"]))
    assert pm.graph_module.graph is graph and pm._codes["single"] is code
    pm.add_adapter("wider", peftc.LoRA(r=2, targets=["up_proj"], init=False))
    assert pm.graph_module.graph is not graph and pm._codes["single"] is not code
    pm.set_adapter("wider")
    with pm.disable_adapters():
        base = out(pm)
    assert differ(out(pm), base)


# --- properties ----------------------------------------------------------------------------------------------------
OPS = st.lists(st.tuples(st.sampled_from(["add", "delete"]), st.integers(1, 8)), min_size=1, max_size=6)


@pytest.mark.slow       # long: runs in CI's slow pass
@settings(max_examples=8, deadline=None)
@given(ops=OPS, routing=st.lists(st.integers(0, 3), min_size=3, max_size=3))
def test_any_add_delete_sequence_matches_an_uncapped_model(ops, routing):
    """Whatever adapters come and go within the capacity, each routed row equals the same adapters without one."""
    model = _MODEL
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["q_proj", "v_proj"]), capacity=peftc.Capacity(3, 8)).eval()
    randomize_ours_(pm, seed=1)
    made = 0
    for op, r in ops:
        extra = [a for a in pm.adapters if a != "default"]
        if op == "add" and len(pm.adapters) < 3:
            made += 1
            name = f"a{made}"
            pm.add_adapter(name, peftc.LoRA(r=r, targets=["q_proj", "v_proj"][: 1 + r % 2]))
            randomize_ours_(pm, seed=100 + made, name=name)
        elif op == "delete" and extra:
            pm.delete_adapter(extra[r % len(extra)])
    slots = pm.store.slots()
    names = [slots[i] if i < len(slots) and slots[i] is not None else BASE for i in routing]
    twin = uncapped_twin(model, pm)
    assert close(out(pm, adapter_names=names), out(twin, adapter_names=names))


_MODEL = make("llama")
