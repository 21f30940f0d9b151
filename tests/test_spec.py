"""LoRA spec: checked on construction, read from adapter_config.json form, with alpha/r and rsLoRA scales."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from torch import nn

import peftc
from peftc import LoRA, SpecError
from peftc.methods import spec_from_config, spec_to_config


def test_defaults_and_scales():
    s = LoRA()
    assert (s.r, s.alpha, s.dropout, s.targets, s.use_rslora, s.modules_to_save, s.init, s.task_type) == (
        8, 8.0, 0.0, None, False, (), True, None)
    assert s.scale == 1.0
    assert LoRA(r=4, alpha=8).scale == 2.0                                   # alpha / r
    assert LoRA(r=4, alpha=8, use_rslora=True).scale == 4.0                  # alpha / sqrt(r)
    assert LoRA(r=3, alpha=1, use_rslora=True).scale == pytest.approx(1 / math.sqrt(3))
    assert LoRA(r=16, alpha=0).scale == 0.0


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoRA().r = 4


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 0}, "r=0"),
    ({"r": -2}, "r=-2"),
    ({"r": 4.0}, "r=4.0"),
    ({"r": "8"}, "r='8'"),
    ({"r": True}, "r=True"),                                                  # bool is an int, but not a rank
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"alpha": float("inf")}, "alpha=inf"),
    ({"alpha": True}, "alpha=True"),
    ({"alpha": "16"}, "alpha='16'"),
    ({"dropout": -0.1}, r"\[0, 1\), got dropout=-0.1"),
    ({"dropout": 1.0}, r"\[0, 1\), got dropout=1.0"),
    ({"dropout": "0.1"}, "dropout='0.1'"),
    ({"init": "pisa"}, "init 'pisa'; did you mean 'pissa'"),
    ({"init": 1}, "init=1"),
    ({"init": None}, "init=None"),
    ({"targets": 5}, "got 5"),
    ({"targets": []}, "empty list"),
    ({"targets": ["q_proj", 3]}, r"\['q_proj', 3\]"),
    ({"targets": [""]}, r"\[''\]"),
    ({"modules_to_save": "classifier"}, "list of module names, got 'classifier'"),
    ({"modules_to_save": ["classifier", None]}, "list of module names"),
    ({"task_type": "CLS"}, "task_type must be one of"),
])
def test_invalid_fields_raise_spec_error_naming_the_field(kwargs, message):
    with pytest.raises(SpecError, match=message):
        LoRA(**kwargs)


def test_valid_edge_values():
    assert LoRA(r=1, alpha=0.5, dropout=0.0).r == 1
    assert LoRA(dropout=0.999).dropout == 0.999
    assert LoRA(init="gaussian").init == "gaussian" and LoRA(init=False).init is False
    assert LoRA(alpha=-4).scale == -0.5                                        # PEFT allows a negative alpha


def test_targets_are_normalized_without_touching_the_argument():
    names = ["q_proj", "v_proj"]
    s = LoRA(targets=names)
    assert s.targets == ("q_proj", "v_proj") and names == ["q_proj", "v_proj"]
    assert LoRA(targets={"v_proj", "q_proj"}).targets == ("q_proj", "v_proj")
    assert LoRA(targets=r".*\.q_proj").targets == r".*\.q_proj"
    assert LoRA(targets="all-linear").targets == "all-linear"


def test_modules_to_save_and_seq_cls():
    assert LoRA(modules_to_save=["head", "head", "norm"]).modules_to_save == ("head", "norm")
    assert LoRA(task_type="SEQ_CLS").modules_to_save == ("classifier", "score")  # as PEFT adds them
    assert LoRA(task_type="SEQ_CLS", modules_to_save=["score"]).modules_to_save == ("score", "classifier")


ADAPTER_CONFIG = {
    "peft_type": "LORA", "r": 4, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
    "use_rslora": True, "modules_to_save": ["classifier"], "init_lora_weights": "gaussian", "task_type": "SEQ_CLS",
    "bias": "none", "use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
    "base_model_name_or_path": "some/model", "inference_mode": True, "revision": None,
}


def test_adapter_config_dict_to_spec():
    s = spec_from_config(dict(ADAPTER_CONFIG))
    assert s == LoRA(r=4, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"), use_rslora=True,
                     modules_to_save=("classifier",), init="gaussian", task_type="SEQ_CLS")
    assert s.extra == {"base_model_name_or_path": "some/model", "inference_mode": True, "revision": None}
    assert s.scale == 8.0
    assert spec_from_config({"peft_type": "lora", "r": 2}).alpha == 8              # PEFT's default lora_alpha
    assert spec_from_config({"peft_type": "LORA", "r": 2, "target_modules": "all-linear"}).targets == "all-linear"


def test_config_round_trip():
    s = spec_from_config(dict(ADAPTER_CONFIG))
    cfg = spec_to_config(s, target_modules=list(s.targets), base_model_name_or_path="some/model",
                         task_type=s.task_type, modules_to_save=s.modules_to_save)
    again = spec_from_config(json.loads(json.dumps(cfg)))
    assert again == s and again.extra.get("base_model_name_or_path") == "some/model"


def test_peft_written_config_to_spec(tmp_path):
    import peft

    cfg = peft.LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True)
    expected = LoRA(r=4, alpha=32, dropout=0.1, targets=("q_proj", "v_proj"), use_rslora=True)
    assert spec_from_config(cfg.to_dict()) == expected                           # PeftType enum, set of targets
    cfg.save_pretrained(tmp_path)                                                 # targets in set order
    s = spec_from_config(json.loads((tmp_path / "adapter_config.json").read_text()))
    assert dataclasses.replace(s, targets=tuple(sorted(s.targets))) == expected


@pytest.mark.parametrize("key, value", [
    ("use_qalora", True),
    ("velora_config", {"rank": 2}), ("kasa_config", {"k": 1}), ("monteclora_config", {"n": 2}),
])
def test_unsupported_peft_features_are_refused(key, value):
    with pytest.raises(SpecError, match=re.escape(f"{key}={value!r} is not supported by peftc yet")):
        spec_from_config({**ADAPTER_CONFIG, key: value})


@pytest.mark.parametrize("key, value", [("use_kasa", True), ("some_future_variant", {"on": 1}), ("lora_xyz", 3)])
def test_unknown_options_that_are_set_are_refused(key, value):
    """A variant without extra weights would otherwise load silently as plain LoRA."""
    with pytest.raises(SpecError, match=re.escape(f"{key}={value!r} is a LoRA option peftc does not know")):
        spec_from_config({**ADAPTER_CONFIG, key: value})
    assert spec_from_config({**ADAPTER_CONFIG, key: None}).r == 4         # unset: neutral, kept verbatim


def test_layer_options_round_trip():
    cfg = {**ADAPTER_CONFIG, "rank_pattern": {"q_proj": 2, "v_proj": 6}, "alpha_pattern": {r"layers\.0\..*": 3},
           "layers_to_transform": [0, 1], "layers_pattern": "layers", "exclude_modules": ["k_proj"]}
    s = spec_from_config(cfg)
    assert s.rank_at("model.layers.0.self_attn.q_proj") == 2 and s.rank_at("model.layers.0.self_attn.o_proj") == 4
    assert s.alpha_at("model.layers.0.self_attn.q_proj") == 3 and s.alpha_at("model.layers.1.mlp.up_proj") == 16
    assert s.max_rank == 6 and s.layers_pattern == ("layers",) and s.layers_to_transform == (0, 1)
    again = spec_from_config(json.loads(json.dumps(spec_to_config(
        s, target_modules=list(s.targets), base_model_name_or_path=None, task_type=s.task_type,
        modules_to_save=s.modules_to_save))))
    assert again == s


@pytest.mark.parametrize("kw, message", [
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
    ({"layers_to_transform": [-1]}, "layers_to_transform must be"),
    ({"layers_pattern": "layers"}, "needs layers_to_transform"),
    ({"exclude_modules": 3}, "exclude_modules must be"),
    ({"layers_to_transform": 0, "targets": "all-linear"}, "cannot be used with targets given as a string"),
])
def test_bad_layer_options(kw, message):
    with pytest.raises(SpecError, match=message):
        LoRA(r=4, **kw)


def test_neutral_alternatives_are_accepted():
    s = spec_from_config({**ADAPTER_CONFIG, "fan_in_fan_out": True, "loftq_config": None, "exclude_modules": []})
    assert s.r == 4


@pytest.mark.parametrize("cfg, message", [
    ([1, 2], "expected a JSON object, got list"),
    ({"r": 4}, "missing 'peft_type'"),
    ({"peft_type": "LOHA", "r": 4},
     r"peft_type='LOHA' is not supported yet; supported: \['LORA', 'TRAINABLE_TOKENS', 'IA3'\]"),
    ({"peft_type": "LORA"}, "missing required key 'r'"),
    ({"peft_type": "LORA", "r": 0}, r"adapter_config.json: LoRA rank r must be a positive integer, got r=0"),
    ({"peft_type": "LORA", "r": 4, "modules_to_save": "classifier"}, "modules_to_save must be a list"),
    ({"peft_type": "LORA", "r": 4, "lora_dropout": 1.5}, "dropout=1.5"),
])
def test_malformed_config(cfg, message):
    with pytest.raises(SpecError, match=message):
        spec_from_config(cfg)


def test_compile_takes_a_dict_and_refuses_other_specs():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = (torch.randn(2, 4),)
    pm = peftc.compile(mlp, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0"]}, example_inputs=x)
    assert pm.store["default"].spec == LoRA(r=2, alpha=4, targets=("0",))
    with pytest.raises(SpecError, match=r"spec dict: use_qalora=True is not supported"):
        peftc.compile(mlp, {"peft_type": "LORA", "r": 2, "use_qalora": True}, example_inputs=x)
    with pytest.raises(SpecError, match=r"spec must be a peftc spec .* got str"):
        peftc.compile(mlp, "lora", example_inputs=x)
    with pytest.raises(SpecError, match=r"adapter_name must be .* got 'a b'"):
        peftc.compile(mlp, LoRA(r=1, targets=["0"]), adapter_name="a b", example_inputs=x)
