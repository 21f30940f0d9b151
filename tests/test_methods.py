"""The method registry: one typed table; look-ups that fail list what is registered; duplicates are refused."""
from __future__ import annotations

import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import peftc
from peftc.inspection import format_plan, plan_sites
from peftc import AdapterSpec, LoRA, Method, SpecError
from peftc.methods import METHODS, method_of, spec_from_config, spec_to_config, unregister_method

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_method.py"


@dataclass(frozen=True)
class Gate(AdapterSpec):
    """A per-channel gate on a layer's output: y -> g * y (a method defined outside the package)."""

    peft_type: ClassVar[str] = "PEFTC_GATE"
    targets: tuple = ()


def _gate_from_config(cfg: dict, source: str) -> Gate:
    return Gate(targets=tuple(cfg.get("target_modules") or ()))


def _gate_to_config(spec: Gate, **context) -> dict:
    return {"peft_type": "PEFTC_GATE", "target_modules": list(spec.targets)}


@pytest.fixture
def gate():
    method = peftc.register_method(Method(Gate, "PEFTC_GATE", _gate_from_config, _gate_to_config))
    yield method
    unregister_method(Gate)


def test_lora_is_registered_with_its_fold_rule():
    m = method_of(LoRA(r=2))
    assert m.peft_type == "LORA" and m.fold is not None and "linear" in m.site_kinds
    assert METHODS[LoRA] is m


def test_custom_method_round_trips_its_config(gate):
    spec = spec_from_config({"peft_type": "peftc_gate", "target_modules": ["q_proj"]})
    assert spec == Gate(targets=("q_proj",))
    assert spec_from_config(spec_to_config(spec)) == spec
    assert gate.fold is None


def test_registering_twice_is_refused(gate):
    with pytest.raises(SpecError, match="Gate is registered already"):
        peftc.register_method(Method(Gate, "OTHER", _gate_from_config, _gate_to_config))
    with pytest.raises(SpecError, match="peft_type 'lora' is registered already by LoRA"):
        peftc.register_method(Method(type("Other", (AdapterSpec,), {}), "lora", _gate_from_config, _gate_to_config))
    assert METHODS[Gate] is gate                      # the table is unchanged


def test_failed_lookups_list_the_registered_methods():
    with pytest.raises(SpecError, match=r"Gate is not a registered method; registered: \['LoRA \(LORA\)', "
                                        r"'TrainableTokens \(TRAINABLE_TOKENS\)', 'IA3 \(IA3\)'\]"):
        method_of(Gate())
    with pytest.raises(SpecError, match=r"peft_type='PEFTC_GATE' is not supported yet; "
                                        r"supported: \['LORA', 'TRAINABLE_TOKENS', 'IA3'\]"):
        spec_from_config({"peft_type": "PEFTC_GATE"})
    with pytest.raises(SpecError, match="must be a subclass of peftc.AdapterSpec"):
        Method(dict, "X", _gate_from_config, _gate_to_config)


def test_a_registered_method_without_a_rewrite_is_refused_by_compile(gate):
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(SpecError, match=r"method Gate is registered without build and rewrite .* "
                                        r"compile: \['LoRA', 'TrainableTokens', 'IA3'\]"):
        peftc.compile(model, Gate(targets=("0",)), example_inputs=(torch.randn(2, 4),))


# --- a complete method from outside the package (examples/custom_method.py), beside LoRA on one model --------------
@pytest.fixture
def custom():
    example = runpy.run_path(str(EXAMPLE))
    peftc.register_method(example["METHOD"])
    yield example
    unregister_method(example["Gate"])


@pytest.mark.slow
def test_adapters_of_two_methods_share_one_model(custom, tmp_path):
    """A LoRA adapter and a custom method's adapter on one PeftModule: each call equals that adapter alone, each
    merges through its own fold rule, both save and reload, and a mixed batch with the custom one (no per-row form)
    is refused naming it."""
    Gate, llama = custom["Gate"], custom["small_llama"]
    pm = peftc.compile(llama(), LoRA(r=4, targets=["q_proj"], init=False))
    pm.add_adapter("g", Gate(targets=("down_proj", "q_proj"), init=1.5))
    assert set(pm.base_passes) >= {"dropout", "gated"} and pm.store["g"].targets[0].endswith("q_proj")
    x = torch.randint(0, 128, (2, 7))
    alone_lora = peftc.compile(llama(), LoRA(r=4, targets=["q_proj"]))
    alone_lora.store["default"].load_state_dict(pm.store["default"].state_dict())
    alone_gate = peftc.compile(llama(), Gate(targets=("down_proj", "q_proj"), init=1.5))
    with torch.no_grad():
        lora_out = pm(input_ids=x).logits
        pm.set_adapter("g")
        gate_out = pm(input_ids=x).logits
        assert torch.equal(lora_out, alone_lora(input_ids=x).logits)
        assert torch.equal(gate_out, alone_gate(input_ids=x).logits)
        assert (gate_out - lora_out).abs().max() > 1e-2
        torch.testing.assert_close(pm.merge("g")(input_ids=x).logits, gate_out, rtol=0, atol=1e-5)
        torch.testing.assert_close(pm.merge("default")(input_ids=x).logits, lora_out, rtol=0, atol=1e-5)
        with pytest.raises(peftc.InputError, match="adapter 'g' cannot share a batch .* Gate has no per-row form"):
            pm(input_ids=x, adapter_names=["g", "default"])
    pm.save_adapter(tmp_path)
    again = peftc.load_adapter(llama(), tmp_path)
    again.load_adapter(tmp_path / "g", "g")
    again.set_adapter("g")
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, gate_out)
    with pytest.raises(SpecError, match=r"Gate cannot serve model.embed_tokens \(Embedding: the aten.embedding"):
        peftc.compile(llama(), Gate(targets=("embed_tokens",)))
    plan = plan_sites(llama(), Gate(targets=("down_proj",)))     # no param_count: counted from what its build makes
    assert plan.ok and plan.counts == {f"model.layers.{i}.mlp.down_proj": 64 for i in range(2)}
    assert "Gate params" in format_plan(plan)
