"""The method registry: one typed table; look-ups that fail list what is registered; duplicates are refused."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

import peftc
from peftc import AdapterSpec, LoRA, Method, SpecError
from peftc.methods import METHODS, method_of, spec_from_config, spec_to_config, unregister_method


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
    with pytest.raises(SpecError, match=r"Gate is not a registered method; registered: \['LoRA \(LORA\)'\]"):
        method_of(Gate())
    with pytest.raises(SpecError, match=r"peft_type='PEFTC_GATE' is not supported yet; supported: \['LORA'\]"):
        spec_from_config({"peft_type": "PEFTC_GATE"})
    with pytest.raises(SpecError, match="must be a subclass of peftc.AdapterSpec"):
        Method(dict, "X", _gate_from_config, _gate_to_config)


def test_a_registered_method_without_a_rewrite_is_refused_by_compile(gate):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(SpecError, match="method Gate is registered .* build LoRA adapters only"):
        peftc.compile(model, Gate(targets=("0",)), example_inputs=(torch.randn(2, 4),))
