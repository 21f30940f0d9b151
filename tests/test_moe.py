"""LoRA on parameters (target_parameters), notably the stacked expert weights of transformers 5 MoE layers: parity
with PEFT both ways, merging, all-linear's targets on MoE models, the mixed-batch refusal and bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

import peftc
from peftc.errors import InputError, SpecError, TargetNotFound
from tests.models import MOE, inputs, make, make_moe

# the first MoE model in the default suite, the others under slow (CI runs both)
MOE_CASES = [MOE[0], *[pytest.param(a, marks=pytest.mark.slow) for a in MOE[1:]]]
from tests.parity import assert_loads_and_merges, assert_parity, max_diff, parity_inputs, randomize_ours_, \
    randomize_peft_

TOL = 1e-5
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def base(arch, impl="grouped_mm"):
    """make(arch)'s model (seed 0) with its experts run by `impl`."""
    torch.manual_seed(0)
    return make_moe(arch, impl=impl)


def ours_on(arch, impl="grouped_mm", **kw):
    return peftc.compile(base(arch, impl), peftc.LoRA(**kw))


def peft_on(arch, impl="grouped_mm", **kw):
    return get_peft_model(base(arch, impl), LoraConfig(**kw)).eval()


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", MOE_CASES)
def test_peftc_saved_adapter_loads_in_peft(arch, impl, tmp_path):
    pm = ours_on(arch, impl, r=4, alpha=8, targets=[], target_parameters=EXPERTS)
    randomize_ours_(pm, seed=1)
    pm.save_adapter(tmp_path)
    theirs = peft_on(arch, impl, r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)
    # PEFT's own keys and shapes: A [r E, in], B [out, r E]; gate_up_proj (registered first) nested innermost
    assert shapes(load_file(tmp_path / "adapter_model.safetensors")) == shapes(get_peft_model_state_dict(theirs))
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in get_peft_model_state_dict(theirs)
    ref = PeftModel.from_pretrained(base(arch, impl), tmp_path)
    for x in parity_inputs(arch):
        assert max_diff(pm, pm.base_model, x) > 100 * TOL, "the adapter left the output unchanged"
        assert_parity(pm, ref.eval(), x, TOL)
        assert_parity(pm.merge(), pm, x, TOL)


@pytest.mark.parametrize("arch", MOE_CASES)
def test_peft_saved_adapter_loads_in_peftc(arch, tmp_path):
    theirs = peft_on(arch, r=4, lora_alpha=16, target_modules=["q_proj"], target_parameters=EXPERTS)
    randomize_peft_(theirs, seed=2)
    theirs.save_pretrained(tmp_path)
    ours = assert_loads_and_merges(theirs, tmp_path, arch, tol=TOL)     # same tensors; unmerged and merged outputs
    assert set(ours.store["default"].spec.target_parameters) == set(EXPERTS)


def test_one_parameter_of_a_module_is_not_nested(tmp_path):
    """down_proj alone: PEFT's key is the module's own (no base_layer)."""
    theirs = peft_on("mixtral", r=2, lora_alpha=2, target_modules=[], target_parameters=["down_proj"])
    randomize_peft_(theirs, seed=3)
    theirs.save_pretrained(tmp_path)
    assert "base_model.model.model.layers.1.mlp.experts.lora_B.weight" in load_file(tmp_path / "adapter_model.safetensors")
    assert_loads_and_merges(theirs, tmp_path, "mixtral", tol=TOL)


def test_forward_applies_factors_to_activations():
    """No full-size delta: the expert weights are read as the model reads them (one transpose each) and the update
    is two skinny grouped products per site on the experts' activations."""
    pm = ours_on("mixtral", r=4, targets=[], target_parameters=EXPERTS)
    g = pm.graph_module.graph
    updates = [n for n in g.nodes if n.op == "call_module" and n.target.startswith("peftc_single.e")]
    assert len(updates) == 4                                       # gate_up_proj and down_proj, 2 layers
    weight_shapes = {tuple(map(str, p.shape)) for p in pm.graph_module.parameters() if p.dim() == 3}
    full = [n.name for n in g.nodes if n.op == "call_function" and hasattr(n.meta.get("val"), "shape")
            and tuple(map(str, n.meta["val"].shape)) in weight_shapes and n.target is not torch.ops.aten.transpose.int]
    assert not full, f"full-size expert tensors computed in the graph: {full}"


def test_training_gradients_equal_peft():
    ids = inputs("mixtral", batch=2, seq=9)
    kw = dict(r=4, targets=[], target_parameters=EXPERTS)
    pm = ours_on("mixtral", alpha=8, **kw)
    randomize_ours_(pm, seed=4)
    theirs = peft_on("mixtral", r=4, lora_alpha=8, target_modules=[], target_parameters=EXPERTS)
    with torch.no_grad():
        for k, p in get_peft_model_state_dict(theirs).items():      # PEFT gets our tensors
            p.copy_(pm.store.peft_state_dict("default")[k])
    pm.train()
    theirs.train()
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    pm(**ids, labels=labels).loss.backward()
    theirs(**ids, labels=labels).loss.backward()
    ours = dict(pm.store.peft_parameters("default"))
    ref = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours) == set(ref)
    for k, p in ours.items():
        assert p.grad is not None and p.grad.abs().max() > 0, k
        torch.testing.assert_close(p.grad, ref[k].grad, rtol=1e-4, atol=1e-6)


# --- all-linear: PEFT adapts the router and the experts of the MoE layers transformers 5 fused ------------------
@pytest.mark.parametrize("arch", MOE_CASES)
def test_all_linear_adapts_what_peft_adapts(arch, tmp_path):
    # Qwen2-MoE's shared_expert_gate has one output: peftc refuses r above min(in, out) for a layer target
    rp = {"shared_expert_gate": 1} if arch == "qwen2_moe" else {}
    pm = ours_on(arch, r=4, alpha=8, targets="all-linear", rank_pattern=rp)
    theirs = peft_on(arch, r=4, lora_alpha=8, target_modules="all-linear", rank_pattern=dict(rp))
    assert shapes(pm.store.peft_state_dict("default")) == shapes(get_peft_model_state_dict(theirs))
    pm.save_adapter(tmp_path)
    cfg, ref_cfg = json.loads((tmp_path / "adapter_config.json").read_text()), theirs.peft_config["default"]
    assert sorted(cfg["target_parameters"] or []) == sorted(ref_cfg.target_parameters or [])
    assert cfg["rank_pattern"] == ref_cfg.rank_pattern and cfg["alpha_pattern"] == ref_cfg.alpha_pattern
    if arch != "qwen2_moe":    # PEFT 0.21.2 converts Qwen3-MoE and Mixtral, not Qwen2-MoE itself
        assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 8}
        assert any(k.endswith("layers.0.mlp.gate.lora_A.weight") for k in pm.store.peft_state_dict("default"))


def test_all_linear_round_trip_with_peft(tmp_path):
    pm = ours_on("qwen3_moe", r=4, alpha=8, targets="all-linear")
    randomize_ours_(pm, seed=5)
    pm.save_adapter(tmp_path)
    ref = PeftModel.from_pretrained(make("qwen3_moe"), tmp_path).eval()
    for x in parity_inputs("qwen3_moe"):
        assert_parity(pm, ref, x, TOL)
    again = peftc.load_adapter(make("qwen3_moe"), tmp_path)
    assert again.store["default"].targets == pm.store["default"].targets
    assert_parity(again, pm, parity_inputs("qwen3_moe")[0], 0.0)


# --- mixed batches, combinations, bad input: one traced model, adapters added and refused on it -------------------
@pytest.fixture(scope="module")
def pm():
    """Mixtral with "default" = LoRA on q_proj and the experts' down_proj (tests leave it as they found it)."""
    return ours_on("mixtral", r=2, targets=["q_proj"], target_parameters=["down_proj"])


def test_mixed_batch_refuses_parameter_targets_by_name(pm):
    pm.add_adapter("plain", peftc.LoRA(r=2, targets=["q_proj"], init=False))
    x = inputs("mixtral", batch=2)
    try:
        with pytest.raises(InputError, match=r"'default'.*target_parameters.*experts\.down_proj"):
            pm(**x, adapter_names=["default", "plain"])
        with torch.no_grad():      # the other adapters still share batches
            mixed = pm(**x, adapter_names=["plain", "__base__"]).logits
            one = pm(**{k: v[:1] for k, v in x.items()}, adapter_names=["plain"]).logits
        torch.testing.assert_close(mixed[:1], one, rtol=0, atol=TOL)
    finally:
        pm.delete_adapter("plain")
    with pytest.raises(SpecError, match="target_parameters"):
        pm.add_weighted_adapter(["default"], [1.0], "w")
    assert pm.adapters == ["default"]


@pytest.mark.parametrize("spec, error, match", [
    (dict(target_parameters=["gate_up_prj"]), TargetNotFound, r"'gate_up_prj'.*closest.*gate_up_proj"),
    (dict(target_parameters=["down_proj"], dropout=0.1), SpecError, "dropout.*target_parameters"),
    (dict(target_parameters=["down_proj"], use_dora=True), SpecError, "use_dora.*target_parameters"),
    (dict(target_parameters=["down_proj"], init="pissa"), SpecError, "init='pissa'.*target_parameters"),
    (dict(targets=["gate"], target_parameters=["gate.weight"]), SpecError, r"mlp\.gate.*both"),
    (dict(target_parameters=["embed_tokens.weight"]), SpecError, r"embed_tokens.*embedding"),
], ids=["unmatched", "dropout", "dora", "pissa", "both-ways", "embedding"])
def test_bad_parameter_targets_are_refused_by_name(pm, spec, error, match):
    before = dict(pm.store.peft_state_dict("default"))
    with pytest.raises(error, match=match):
        pm.add_adapter("bad", peftc.LoRA(r=2, **{"targets": [], **spec}))
    assert pm.adapters == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in pm.store.peft_state_dict("default").items())


def test_refused_compile_leaves_the_model_unchanged():
    model = make("mixtral")
    before = {k: (v.clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(TargetNotFound, match="gate_up_proj"):
        peftc.compile(model, peftc.LoRA(targets=[], target_parameters=["experts.gate_up"]))
    after = model.state_dict(keep_vars=True)
    assert all(torch.equal(after[k], v) and after[k].requires_grad == g for k, (v, g) in before.items())


def test_router_weight_is_a_linear_parameter_target(tmp_path):
    theirs = peft_on("mixtral", r=2, lora_alpha=4, target_modules=[], target_parameters=["gate.weight"])
    randomize_peft_(theirs, seed=6)
    theirs.save_pretrained(tmp_path)
    ours = assert_loads_and_merges(theirs, tmp_path, "mixtral", tol=TOL)
    assert ours.store["default"].targets == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_config_reads_and_writes_target_parameters():
    from peftc.methods import spec_from_config, spec_to_config
    spec = peftc.LoRA(targets=[], target_parameters=["a.b", "c"])
    cfg = spec_to_config(spec, target_modules=[], base_model_name_or_path=None, task_type=None, modules_to_save=None)
    assert cfg["target_parameters"] == ["a.b", "c"] and cfg["target_modules"] == []
    assert spec_from_config(cfg).target_parameters == ("a.b", "c")
    assert spec_from_config({**cfg, "target_parameters": [], "target_modules": ["q"]}).target_parameters is None
    with pytest.raises(SpecError, match="target_parameters must be a list"):
        peftc.LoRA(target_parameters="gate_up_proj")
    with pytest.raises(SpecError, match="empty list"):
        peftc.LoRA(targets=[])
