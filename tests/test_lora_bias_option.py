"""LoRA's `bias` option ("none", "all", "lora_only"), in parity with HF PEFT both ways, trained, merged and exported.

PEFT's rules (peft 0.21.2), which peftc must follow:
- training (peft/tuners/tuners_utils.py, BaseTuner._mark_only_adapters_as_trainable): "all" makes every parameter
  named `bias` (n == "bias" or n.endswith(".bias")) of the whole model trainable; "lora_only" the `bias` of each
  LoRA layer (its base layer's). PEFT trains the model's own parameters in place; peftc trains copies in the adapter
  store and leaves the model unchanged.
- saving (same file, BaseTuner._get_learnable_bias_state_dict): "all" saves every state-dict key ending in ".bias",
  so an adapted layer's bias is <path>.base_layer.bias, any other <path>.bias, and a modules_to_save module's bias
  comes three times: <m>.bias (the copy, from the wrapper), <m>.modules_to_save.bias and <m>.original_module.bias.
  "lora_only" saves <path>.base_layer.bias of each LoRA layer that has a bias (no quirk in this version: the key
  exists). Loading is strict=False: a bias key that is missing leaves the bias alone.
"""
from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peftc
from peftc.checkpoint import adapter_config
from peftc.errors import InputError, SpecError
from peftc.passes.lora.spec import lora_from_config
from tests.models import make
from tests.parity import (MOVED, TOL, assert_loads_and_merges, assert_parity, max_diff, parity_inputs,
                          randomize_ours_, randomize_peft_)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
TASK = {"bert": "SEQ_CLS"}      # bert: the classifier is a modules_to_save module as well (its bias is saved thrice)
ARCHS = ("llama", "gpt2", "bert")
BIASES = ("all", "lora_only")
TOL_ = TOL[peftc.LoRA]
HF_CLASS = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification}


def _spec(arch: str, bias: str, **kw) -> peftc.LoRA:
    return peftc.LoRA(r=4, alpha=8, targets=TARGETS[arch], bias=bias, task_type=TASK.get(arch), **kw)


def _peft(arch: str, bias: str, seed: int = 3, **kw):
    """A PEFT model whose LoRA weights, modules_to_save copies and trainable biases are all random (trained-like)."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], bias=bias, task_type=TASK.get(arch), **kw)
    ref = get_peft_model(make(arch), cfg).eval()
    randomize_peft_(ref, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad and n.endswith(".bias") and ".lora_" not in n and ".modules_to_save." not in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return ref


def _bias_paths(pm, name: str = "default") -> list[str]:
    ad = pm.store[name]
    return [p for p in ad.saved_modules if not ad.saved[p.replace(".", "-")].whole]


def _assert_same_files(a, b) -> None:
    """Two adapter directories hold the same tensors under the same keys, bit for bit."""
    x, y = load_file(f"{a}/adapter_model.safetensors"), load_file(f"{b}/adapter_model.safetensors")
    assert sorted(x) == sorted(y), f"keys differ: only {a}: {sorted(set(x) - set(y))[:3]}, " \
                                   f"only {b}: {sorted(set(y) - set(x))[:3]}"
    unequal = [k for k in x if not torch.equal(x[k], y[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[0]}"


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_saved_adapter_loads_merges_and_resaves(arch, bias, tmp_path):
    ref = _peft(arch, bias)
    ref.save_pretrained(tmp_path / "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    biases = [k for k in keys if k.endswith(".bias") and ".lora_" not in k]
    assert bool(biases) == (arch != "llama"), f"PEFT saved biases {biases[:3]}"   # llama's linears have none
    if arch == "bert" or arch == "llama":   # bert: PEFT's modules_to_save aliases (see the docstring) ride along
        ours = peftc.load_adapter(make(arch), tmp_path / "peft")
        merged = ours.merge()
        assert max_diff(ours, make(arch), parity_inputs(arch)[0]) > MOVED * TOL_
        for x in parity_inputs(arch, labels=True):
            assert_parity(ours, ref, x, TOL_)
            assert_parity(merged, ref, x, TOL_)
    else:
        ours = assert_loads_and_merges(ref, tmp_path / "peft", arch)
    assert ours.store["default"].spec.bias == bias
    ours.save_adapter(tmp_path / "ours")
    _assert_same_files(tmp_path / "peft", tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == bias

    # the merged Hugging Face directory carries the trained biases
    peftc.export_merged(ours, tmp_path / "merged", progress=False)
    hf = HF_CLASS[arch].from_pretrained(tmp_path / "merged").eval()
    for x in parity_inputs(arch):
        assert_parity(hf, ref, x, TOL_)


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_peftc_saved_adapter_loads_in_peft(arch, bias, tmp_path):
    base = make(arch)
    ours = peftc.compile(base, _spec(arch, bias))
    randomize_ours_(ours, seed=5)          # random B, and perturbed copies: modules_to_save and the biases
    assert arch == "llama" or max_diff(ours, base, parity_inputs(arch)[0]) > MOVED * TOL_
    ours.save_adapter(tmp_path / "ours")
    ref = PeftModel.from_pretrained(make(arch), tmp_path / "ours").eval()
    assert ref.peft_config["default"].bias == bias
    for x in parity_inputs(arch, labels=True):
        assert_parity(ours, ref, x, TOL_)
    ref.save_pretrained(tmp_path / "peft")          # what PEFT loaded is what PEFT writes back
    _assert_same_files(tmp_path / "ours", tmp_path / "peft")


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("arch", ("gpt2", "bert"))
def test_trainable_biases_are_the_adapters_copies(arch, bias):
    ref = get_peft_model(make(arch), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], bias=bias,
                                                task_type=TASK.get(arch)))
    model = make(arch)
    pm = peftc.compile(model, _spec(arch, bias))
    trained = {n.removeprefix("base_model.model.") for n, p in ref.named_parameters()
               if p.requires_grad and ".lora_" not in n and ".modules_to_save." not in n}
    mine = {p + (".base_layer.bias" if p in pm.store["default"].targets else ".bias") for p in _bias_paths(pm)}
    assert mine == trained, f"only peftc {sorted(mine - trained)[:3]}, only PEFT {sorted(trained - mine)[:3]}"
    assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()     # (trainable, all)
    ids = {id(p) for p in pm.trainable_parameters()}
    copies = [p for path in _bias_paths(pm) for p in pm.store["default"].saved[path.replace(".", "-")].parameters()]
    assert copies and all(id(p) in ids for p in copies)
    assert not any(p.requires_grad for p in model.parameters() if id(p) in ids)    # no model tensor is trained


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("arch", ("gpt2", "bert"))
def test_training_changes_only_the_adapter(arch, bias, tmp_path):
    model = make(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    pm = peftc.compile(model, _spec(arch, bias))
    y = parity_inputs(arch)
    with pm.disable_adapters(), torch.no_grad():
        base_out = [pm(**xi).logits for xi in y]
    pm.train()
    store0 = {n: p.detach().clone() for n, p in pm.store.named_parameters()}
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-2)
    x = parity_inputs(arch, labels=True)[0]
    for _ in range(3):
        opt.zero_grad()
        pm(**x).loss.backward()
        opt.step()
    pm.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    moved = {n for n, p in pm.store.named_parameters() if not torch.equal(p, store0[n])}
    trainable = {f"adapters.default.{n}" for n, p in pm.store["default"].named_parameters() if p.requires_grad}
    assert moved <= trainable
    for path in _bias_paths(pm):
        assert f"adapters.default.saved.{path.replace('.', '-')}.bias" in moved, f"{path}'s bias was not trained"
    assert any(".sites." in n for n in moved), "the LoRA weights were not trained"
    with pm.disable_adapters(), torch.no_grad():
        for xi, out in zip(y, base_out):
            assert torch.equal(pm(**xi).logits, out), "disabled adapters read trained biases"
        assert max_diff(pm, model, y[0]) <= 1e-5
    merged = pm.merge()
    for xi in y:
        assert_parity(merged, pm, xi, 1e-5)
    peftc.export_merged(pm, tmp_path / "merged", progress=False)
    hf = HF_CLASS[arch].from_pretrained(tmp_path / "merged").eval()
    for xi in y:
        assert_parity(hf, pm, xi, 1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "merging changed the user's model"


def test_other_adapters_read_the_original_biases_and_mixed_batches_are_refused():
    model = make("bert")
    pm = peftc.compile(model, _spec("bert", "all"))
    randomize_ours_(pm, seed=7)
    pm.add_adapter("plain", peftc.LoRA(r=4, targets=TARGETS["bert"]))          # fresh: the model's own outputs
    x = parity_inputs("bert")[0]
    with pm.disable_adapters(), torch.no_grad():
        base = pm(**x).logits
    assert max_diff(pm, model, x) > MOVED * TOL_
    pm.set_adapter("plain")
    with torch.no_grad():
        assert (pm(**x).logits - base).abs().max() <= 1e-6, "another adapter read the trained biases"
    rows = x["input_ids"].shape[0]
    with pytest.raises(InputError, match="trained biases"):
        pm(**x, adapter_names=["default", "plain"] + ["default"] * (rows - 2))
    one = pm(**x, adapter_names=["default"] * rows).logits                       # one adapter: the plain form
    pm.set_adapter("default")
    assert torch.equal(one, pm(**x).logits)


def test_bias_with_lora_bias_merges_into_the_trained_bias(tmp_path):
    """lora_bias's fold adds s b_B to the layer's bias: the adapter's trained copy of it, not the model's."""
    model = make("gpt2")
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["c_attn", "c_fc"], bias="lora_only", lora_bias=True))
    randomize_ours_(pm, seed=9)
    with torch.no_grad():
        for w in pm.store["default"].sites.values():
            w.B_bias.normal_()
    merged = pm.merge()
    peftc.export_merged(pm, tmp_path / "merged", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for x in parity_inputs("gpt2"):
        assert_parity(merged, pm, x, 1e-5)
        assert_parity(hf, pm, x, 1e-5)
    pm.save_adapter(tmp_path / "ours")
    ref = PeftModel.from_pretrained(make("gpt2"), tmp_path / "ours").eval()
    for x in parity_inputs("gpt2"):
        assert_parity(pm, ref, x, TOL_)


def test_dora_reads_the_trained_bias(tmp_path):
    """DoRA takes the layer's bias out before rescaling and puts it back: it must read the same (trained) copy."""
    ref = _peft("bert", "lora_only", use_dora=True)
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(make("bert"), tmp_path)
    merged = ours.merge()
    for x in parity_inputs("bert"):
        assert_parity(ours, ref, x, TOL_)
        assert_parity(merged, ref, x, TOL_)


def test_missing_bias_keys_load_as_peft_does(tmp_path, caplog):
    """A checkpoint without the bias keys (strict=False in PEFT) keeps the model's biases, with a warning."""
    ref = _peft("gpt2", "lora_only")
    ref.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("base_layer.bias")}, path)
    with caplog.at_level("WARNING"):
        ours = peftc.load_adapter(make("gpt2"), tmp_path)
    assert "trained bias" in caplog.text
    back = PeftModel.from_pretrained(make("gpt2"), tmp_path).eval()
    for x in parity_inputs("gpt2"):
        assert_parity(ours, back, x, TOL_)


def test_config_round_trip_and_refusals():
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "lora_only"}
    spec = lora_from_config(cfg)
    assert spec.bias == "lora_only"
    pm = peftc.compile(make("llama"), spec)
    assert adapter_config(pm.checkpoint_data, "default")["bias"] == "lora_only"
    assert LoraConfig(**{k: v for k, v in adapter_config(pm.checkpoint_data, "default").items()
                         if k in LoraConfig.__dataclass_fields__}).bias == "lora_only"
    with pytest.raises(SpecError, match="bias must be one of"):
        peftc.LoRA(bias="some")
    with pytest.raises(SpecError, match="bias must be one of"):
        lora_from_config({**cfg, "bias": "everything"})


def test_several_adapters_each_train_their_own_biases():
    """PEFT allows one adapter with bias != "none"; peftc's copies are per adapter, so each adapter has its own."""
    model = make("gpt2")
    pm = peftc.compile(model, _spec("gpt2", "all"))
    pm.add_adapter("b", _spec("gpt2", "lora_only"))
    randomize_ours_(pm, seed=11)
    randomize_ours_(pm, seed=12, name="b")
    x = parity_inputs("gpt2")[0]
    for name in ("default", "b"):
        alone = peftc.compile(make("gpt2"), pm.store[name].spec)
        alone.store["default"].load_state_dict(pm.store[name].state_dict())
        pm.set_adapter(name)
        assert_parity(pm, alone, x, 1e-6)
        assert_parity(pm.merge(), alone, x, 1e-5)


def test_biases_inside_a_nested_modules_to_save_module_round_trip(tmp_path):
    """bias="all" with modules_to_save=["pooler"] (bert.pooler.dense.bias inside it): PEFT keeps the adapter name
    in that alias (<m>.modules_to_save.default.dense.bias); both directions give the same files and outputs."""
    ref = _peft("bert", "all", modules_to_save=["pooler"])
    ref.save_pretrained(tmp_path / "peft")
    assert "base_model.model.bert.pooler.modules_to_save.default.dense.bias" in \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = peftc.load_adapter(make("bert"), tmp_path / "peft")
    for x in parity_inputs("bert"):
        assert_parity(ours, ref, x, TOL_)
    ours.save_adapter(tmp_path / "ours")
    _assert_same_files(tmp_path / "peft", tmp_path / "ours")
    back = PeftModel.from_pretrained(make("bert"), tmp_path / "ours").eval()
    for x in parity_inputs("bert"):
        assert_parity(ours, back, x, TOL_)
