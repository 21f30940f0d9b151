"""One error type per kind of mistake, the same wherever it is made; every error peftc raises on purpose is a
PeftcError that says what was expected, what was found and what to do."""
from __future__ import annotations

import inspect

import pytest
import torch

import peftc
from peftc import errors
from tests.models import inputs, make


@pytest.fixture(scope="module")
def pm():
    pm = peftc.compile(make("llama"), peftc.LoRA(r=2, targets=["q_proj", "v_proj"]))
    pm.add_adapter("b", peftc.LoRA(r=2, targets=["q_proj"]))
    return pm


def unknown_uses(pm, tmp):
    x = inputs("llama")
    return {
        "set_adapter": lambda: pm.set_adapter("nope"),
        "delete_adapter": lambda: pm.delete_adapter("nope"),
        "trainable_parameters": lambda: pm.trainable_parameters("nope"),
        "save_adapter": lambda: pm.save_adapter(tmp / "s", "nope"),
        "save_pretrained": lambda: pm.save_pretrained(tmp / "p", selected_adapters=["nope"]),
        "merge": lambda: pm.merge("nope"),
        "merge_and_unload": lambda: pm.merge_and_unload(["nope"]),
        "export_merged": lambda: peftc.export_merged(pm, tmp / "e", adapter_name="nope"),
        "adapter_names": lambda: pm(**x, adapter_names=["default", "nope", "b"]),
        "adapter_index_of": lambda: pm.adapter_index(["nope", "b"]),
        "generate": lambda: pm.generate(**x, adapter_names=["nope", "b", "b"], max_new_tokens=2),
        "add_weighted_adapter": lambda: pm.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "w"),
        "loftq": lambda: peftc.replace_lora_weights_loftq(pm, adapter_name="nope"),
    }


def test_an_unknown_adapter_is_the_same_error_everywhere(pm, tmp_path):
    before = {k: v.clone() for k, v in pm.store.peft_state_dict("default").items()}
    uses = unknown_uses(pm, tmp_path)
    for where, use in uses.items():
        with pytest.raises(peftc.UnknownAdapter) as e:
            use()
        msg = str(e.value)
        assert "'nope'" in msg and "adapters: ['default', 'b'" in msg, (where, msg)
        assert "add_adapter" in msg, (where, msg)                     # and what to do
        assert isinstance(e.value, KeyError) and isinstance(e.value, peftc.PeftcError), where
    assert pm.adapters == ["default", "b"] and pm.active_adapter == "default"
    assert all(torch.equal(before[k], v) for k, v in pm.store.peft_state_dict("default").items())
    assert not any(tmp_path.iterdir()), "a refused call wrote files"


def test_every_error_class_is_a_peftc_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if c.__module__ == errors.__name__ and issubclass(c, Exception)]
    assert len(classes) >= 10
    assert all(issubclass(c, peftc.PeftcError) for c in classes)
    assert all(getattr(peftc, c.__name__) is c for c in classes)       # each one importable from peftc
