"""PeftModel's surface on PeftModule, against PEFT on the same two-adapter model (saved by peftc, loaded by both)."""
from __future__ import annotations

import dataclasses
import enum

import pytest
import torch
from peft import PeftModel

import peftc
from peftc.errors import MergeError
from peftc.methods import METHODS
from tests.models import inputs, main_output, make
from tests.parity import TOL, assert_parity, assert_same_weights, max_diff, parity_inputs, randomize_ours_

TARGETS = {"default": ["q_proj", "v_proj"], "other": ["q_proj", "k_proj"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two random LoRA adapters saved by peftc: "default" (q, v; r=4) in the directory, "other" (q, k; r=2) in
    directory/other."""
    d = tmp_path_factory.mktemp("surface")
    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, alpha=8, targets=TARGETS["default"], init=False))
    pm.add_adapter("other", peftc.LoRA(r=2, alpha=4, targets=TARGETS["other"], init=False))
    randomize_ours_(pm, seed=1)
    randomize_ours_(pm, seed=2, name="other")
    pm.save_pretrained(d)
    return d


def load_both(saved):
    """(ours, PEFT's twin): "default" trainable, "other" loaded frozen, on fresh models."""
    ref = PeftModel.from_pretrained(make("llama"), saved, is_trainable=True)
    ref.load_adapter(saved / "other", "other")
    ours = peftc.PeftModule.from_pretrained(make("llama"), saved, is_trainable=True)
    ours.load_adapter(saved / "other", "other")
    return ours, ref


@pytest.fixture(scope="module")
def pair(saved):
    return load_both(saved)


def plain(v):
    """A PEFT config value as JSON would hold it (sets sorted, enums by value)."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def test_from_pretrained_is_load_adapter_and_matches_peft(saved, pair):
    ours, ref = pair
    other = peftc.load_adapter(make("llama"), saved, is_trainable=True)
    assert type(ours) is peftc.PeftModule and ours.training == other.training
    a, b = ours.store.peft_state_dict("default"), other.store.peft_state_dict("default")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.requires_grad for p in ours.trainable_parameters()] == [True] * 8
    assert_same_weights(ours, ref)
    assert_same_weights(ours, ref, "other")
    for x in parity_inputs("llama"):
        assert_parity(ours, ref, x, TOL[peftc.LoRA])


def test_peft_config_matches_peft(pair):
    ours, ref = pair
    assert sorted(ours.peft_config) == sorted(ref.peft_config) == ["default", "other"]
    for name in ("default", "other"):
        mine, theirs = ours.peft_config[name], plain(ref.peft_config[name].to_dict())
        shared = sorted(mine.keys() & theirs.keys())
        assert len(shared) >= 30 and {"r", "lora_alpha", "target_modules", "peft_type", "inference_mode"} <= set(shared)
        differ = {k: (mine[k], theirs[k]) for k in shared if mine[k] != theirs[k]}
        assert not differ, f"{name}: peftc vs PEFT: {differ}"
    assert ours.peft_config["other"]["inference_mode"] is True and ours.peft_config["default"]["inference_mode"] is False
    ours.peft_config["default"]["r"] = 99                         # a copy: the adapter is not changed
    assert ours.peft_config["default"]["r"] == 4


def status_dicts(model):
    return [dataclasses.asdict(s) for s in model.get_layer_status()]


def test_layer_and_model_status_match_peft(pair):
    ours, ref = pair
    assert status_dicts(ours) == status_dicts(ref)
    assert len(status_dicts(ours)) == 6
    mine, theirs = dataclasses.asdict(ours.get_model_status()), dataclasses.asdict(ref.get_model_status())
    assert mine.pop("adapter_model_type") == "PeftModule" and theirs.pop("adapter_model_type") == "LoraModel"
    assert mine == theirs
    assert mine["requires_grad"] == {"default": True, "other": False}
    with ours.disable_adapter(), ref.disable_adapter():
        # PEFT also freezes every adapter while disabled; peftc leaves requires_grad alone
        mine, theirs = status_dicts(ours), status_dicts(ref)
        assert [s.pop("requires_grad") for s in theirs] == [{a: False for a in s["available_adapters"]} for s in theirs]
        assert [s.pop("requires_grad") for s in mine][0] == {"default": True, "other": False}
        assert mine == theirs and all(s["enabled"] is False for s in mine)
        assert ours.get_model_status().enabled is False is ref.get_model_status().enabled


def test_active_adapters_and_disable_adapter(pair):
    ours, ref = pair
    x = inputs("llama")
    base = make("llama")
    try:
        for name in ("other", "default"):
            ours.set_adapter(name)
            ref.set_adapter(name)
            assert ours.active_adapters == ref.active_adapters == [name]
            assert_parity(ours, ref, x, TOL[peftc.LoRA])
            with ours.disable_adapter(), ref.disable_adapter():
                assert_parity(ours, base, x, 0.0)
                assert_parity(ours, ref, x, TOL[peftc.LoRA])
    finally:
        ours.set_adapter("default")
        ref.set_adapter("default")
        ref.base_model.set_adapter("default", inference_mode=False)    # PEFT's set_adapter froze the others


def test_get_base_model_and_unload_are_the_untouched_model(pair):
    ours, ref = pair
    x = inputs("llama")
    assert ours.get_base_model() is ours.base_model is ours.unload()
    assert_parity(ours.unload(), make("llama"), x, 0.0)        # no adapter in it
    assert max_diff(ours, ours.unload(), x) > 10 * TOL[peftc.LoRA]   # and self keeps its adapters


def test_merge_and_unload_is_a_new_module_equal_to_peft(saved):
    ours, _ = load_both(saved)
    x = inputs("llama")
    with torch.no_grad():
        before = main_output(ours(**x))
    for names in (None, ["other"]):
        merged = ours.merge_and_unload(adapter_names=names, safe_merge=True, progressbar=True)
        ref = PeftModel.from_pretrained(make("llama"), saved)
        ref.load_adapter(saved / "other", "other")
        peft_merged = ref.merge_and_unload(adapter_names=names)
        assert isinstance(merged, peftc.MergedModule) and merged is not ours
        assert_parity(merged, peft_merged, x, TOL[peftc.LoRA])
    with torch.no_grad():
        torch.testing.assert_close(main_output(ours(**x)), before, rtol=0, atol=0)   # self untouched
    assert ours.adapters == ["default", "other"]
    with pytest.raises(MergeError, match="one adapter.*add_weighted_adapter"):
        ours.merge_and_unload(adapter_names=["default", "other"])


def test_merge_and_unload_refuses_a_method_without_a_fold_rule(pair, monkeypatch):
    ours, _ = pair
    monkeypatch.setitem(METHODS, peftc.LoRA, dataclasses.replace(METHODS[peftc.LoRA], fold=None))
    with pytest.raises(MergeError, match="method LoRA does not declare the 'merge' capability"):
        ours.merge_and_unload()


def test_in_place_merge_names_point_to_merge(pair):
    ours, _ = pair
    with pytest.raises(MergeError, match=r"pm\.merge\(adapter_name\)"):
        ours.merge_adapter()
    with pytest.raises(MergeError, match="never merged in place"):
        ours.unmerge_adapter()


def grads(pm, x) -> list[torch.Tensor]:
    pm.zero_grad()
    main_output(pm(**x)).square().mean().backward()
    return [p.grad.clone() for p in pm.trainable_parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, targets=["q_proj", "v_proj"], init=False)).train()
    x = inputs("llama")
    runs = [0]
    for b in pm.blocks().values():
        b.register_forward_pre_hook(lambda m, a: runs.__setitem__(0, runs[0] + 1))
    want = grads(pm, x)
    assert runs[0] == 2 and not pm.is_gradient_checkpointing
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert pm.is_gradient_checkpointing
    got = grads(pm, x)
    assert runs[0] == 2 + 4                             # each block ran again in backward
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    pm.gradient_checkpointing_disable()
    assert not pm.is_gradient_checkpointing and all(type(b).__name__ == "Block" for b in pm.graph_module.modules()
                                                    if type(b).__name__ in ("Block", "CheckpointWrapper"))
    for a, b in zip(want, grads(pm, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_enable_input_require_grads_lets_reentrant_checkpointing_reach_the_adapters():
    """With frozen embeddings, reentrant checkpointing of a mixed batch (per-row adapters, whose weights the blocks
    read from the store) sees no block input needing grad: without the hook nothing reaches the adapters (as with HF);
    with it the gradients are the plain ones. (A single-adapter call passes the adapter's weights into the blocks,
    so it needs no hook.)"""
    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, targets=["q_proj", "v_proj"], init=False)).train()
    pm.add_adapter("other", peftc.LoRA(r=2, targets=["q_proj", "v_proj"], init=False))
    x = dict(inputs("llama"), adapter_names=["default", "other", "default"])

    def all_grads():
        pm.zero_grad()
        main_output(pm(**x)).square().mean().backward()
        return [p.grad.clone() for a in pm.adapters for p in pm.trainable_parameters(a)]

    want = all_grads()
    pm.gradient_checkpointing_enable({"use_reentrant": True})
    pm.disable_input_require_grads()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        loss = main_output(pm(**x)).square().mean()
    assert not loss.requires_grad            # no block input needed grad: backward would reach no adapter
    pm.enable_input_require_grads()
    got = all_grads()
    assert len(got) == 16
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    pm.add_adapter("more", peftc.LoRA(r=2, targets=["k_proj"]))     # a rebuild keeps the wrappers and the hook
    assert pm.is_gradient_checkpointing
    for a, b in zip(want, all_grads()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_generation_config_and_can_generate_are_the_models_as_in_peft(pair):
    ours, ref = pair
    assert ours.can_generate() and ref.can_generate()
    assert ours.generation_config.to_dict() == ref.generation_config.to_dict()
    bert = make("bert")
    ours_bert = peftc.compile(bert, peftc.LoRA(r=2))
    assert ours_bert.can_generate() == bert.can_generate() is False
    assert isinstance(ours.get_layer_status()[0], peftc.LayerStatus)
    assert isinstance(ours.get_model_status(), peftc.ModelStatus)


def test_save_pretrained_takes_peft_arguments_and_layout(pair, tmp_path):
    ours, ref = pair
    for sel in (None, ["other"], ["default"]):
        ours.save_pretrained(tmp_path / f"ours{sel}", selected_adapters=sel)
        ref.save_pretrained(tmp_path / f"peft{sel}", selected_adapters=sel)
        layout = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.suffix in (".json", ".safetensors"))
        assert layout(tmp_path / f"ours{sel}") == [x for x in layout(tmp_path / f"peft{sel}") if "README" not in x]
    ours.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(peftc.InputError, match="pickle"):
        ours.save_pretrained(tmp_path / "pkl", safe_serialization=False)
    with pytest.raises(peftc.InputError, match=r"unsupported argument\(s\) \['convert_pissa_to_lora'\]"):
        ours.save_pretrained(tmp_path / "conv", convert_pissa_to_lora="x")
    assert not (tmp_path / "pkl").exists() and not (tmp_path / "conv").exists()


def test_active_config_requires_grad_and_modules_to_save_as_peft(saved):
    ours, ref = load_both(saved)
    mine, theirs = ours.active_peft_config, plain(ref.active_peft_config.to_dict())
    assert mine == ours.peft_config["default"] and len(mine.keys() & theirs.keys()) >= 30
    assert all(mine[k] == theirs[k] for k in mine.keys() & theirs.keys())
    assert ours.modules_to_save == ref.modules_to_save
    assert ours.base_model_torch_dtype == ref.base_model_torch_dtype
    assert ours.has_active_enabled_adapter == ref.has_active_enabled_adapter is True
    with ours.disable_adapter(), ref.disable_adapter():
        assert ours.has_active_enabled_adapter == ref.has_active_enabled_adapter is False
    for names, flag in (("other", True), (["default", "other"], False)):
        ours.set_requires_grad(names, flag), ref.set_requires_grad(names, flag)
        want = sorted(n.replace(".default", "").replace(".other", "") + ("@o" if ".other" in n else "")
                      for n, p in ref.named_parameters() if p.requires_grad)
        got = {a: sum(p.requires_grad for p in ours.store[a].parameters()) for a in ours.adapters}
        assert sum(got.values()) == len(want)
        assert got["other"] == (len(list(ours.store["other"].parameters())) if flag else 0)
    with pytest.raises(peftc.UnknownAdapter):
        ours.set_requires_grad("nope")
    with pytest.raises(peftc.InputError, match="upload_folder"):
        ours.push_to_hub("me/repo")
