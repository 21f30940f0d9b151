"""End-to-end parity with HF PEFT: same layers, same parameter counts, same outputs and losses, checkpoints both ways."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

import peftc
from tests.models import ARCHS, DECODERS, make
from tests.parity import (MOVED, TOL, assert_parity, lora_config, max_diff, parity_inputs, peft_targets,
                          randomize_ours_, randomize_peft_)

# PEFT warns about GPT-2's Conv1D (fan_in_fan_out) and similar; they say nothing about parity.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_DEC_LIST = ["k_proj", "mlp.down_proj", "model.layers.0.self_attn.o_proj"]  # a tail, two tails, an exact path
LIST_TARGETS = {
    "llama": _DEC_LIST, "qwen2": _DEC_LIST, "mistral": _DEC_LIST,
    "gpt2": ["c_proj", "transformer.h.1.attn.c_attn"],                       # c_proj: attention and MLP
    "bert": ["key", "output.dense", "bert.encoder.layer.1.intermediate.dense"],
    "vit": ["query", "output.dense", "vit.encoder.layer.0.intermediate.dense"],
    "minilm": ["key", "encoder.layer.5.output.dense"],
}
REGEX_TARGETS = {
    "llama": r".*\.(q_proj|up_proj)", "qwen2": r".*\.(q_proj|up_proj)", "mistral": r".*\.(q_proj|up_proj)",
    "gpt2": r"transformer\.h\.\d+\.mlp\.c_fc",
    "bert": r"bert\.encoder\.layer\.0\..*(query|value|dense)",
    "vit": r".*\.layer\.1\.attention\.attention\.(key|value)",
    "minilm": r"encoder\.layer\.[0-2]\.attention\.self\.(query|value)",
}

# case -> (archs it runs on, keyword arguments of peftc.LoRA for an arch). Every arch runs "default" and
# "all-linear"; the other cases are spread over the archs to keep the file fast.
CASES = {
    "default": (ARCHS, lambda a: {}),
    "rslora": (("llama", "gpt2", "bert", "vit"), lambda a: dict(r=4, alpha=16.0, use_rslora=True)),
    "all-linear": (ARCHS, lambda a: dict(targets="all-linear")),
    "list": (("qwen2", "mistral", "gpt2", "bert", "vit"), lambda a: dict(targets=LIST_TARGETS[a])),
    "regex": (("llama", "gpt2", "bert", "vit", "minilm"), lambda a: dict(targets=REGEX_TARGETS[a])),
    "modules_to_save": (("bert", "vit"), lambda a: dict(modules_to_save=["classifier"])),
    "seq_cls": (("bert",), lambda a: dict(task_type="SEQ_CLS")),
    "seq_cls-all-linear": (("bert",), lambda a: dict(task_type="SEQ_CLS", targets="all-linear")),
}
MATRIX = [pytest.param(arch, case, id=f"{arch}-{case}") for case, (archs, _) in CASES.items() for arch in archs]


def spec_kwargs(arch: str, case: str) -> dict:
    return CASES[case][1](arch)


def labelled(arch: str) -> bool:
    return arch != "minilm"  # a bare BertModel has no loss


@pytest.mark.parametrize("arch,case", MATRIX)
def test_compile_matches_get_peft_model(arch, case, capsys):
    """compile(LoRA(...)) adapts the layers get_peft_model(LoraConfig(...)) adapts, counts the same trainable
    parameters, and with the same fresh weights gives the base model's outputs, as PEFT does."""
    kw = spec_kwargs(arch, case)
    base = make(arch)
    ours = peftc.compile(base, peftc.LoRA(**kw))
    ref = get_peft_model(make(arch), lora_config(arch, **kw)).eval()

    assert sorted(ours.store["default"].targets) == sorted(peft_targets(ref))
    loaded = set_peft_model_state_dict(ref, ours.store.peft_state_dict("default"))
    assert not loaded.unexpected_keys, f"PEFT does not know peftc's keys {loaded.unexpected_keys[:3]}"
    tol = TOL[peftc.LoRA]
    for x in parity_inputs(arch, labels=labelled(arch)):
        assert_parity(ours, ref, x, tol)
        assert max_diff(ours, base, x) <= tol, "a fresh adapter changed the base model's output"

    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    ref.print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.splitlines()
    assert mine == theirs


@pytest.mark.parametrize("arch,case", MATRIX)
def test_peftc_checkpoint_loads_in_peft(arch, case, tmp_path):
    """peftc saves a random adapter; PeftModel.from_pretrained on a fresh copy of the base gives the same outputs."""
    base = make(arch)
    ours = peftc.compile(base, peftc.LoRA(**spec_kwargs(arch, case)))
    randomize_ours_(ours, seed=3)
    xs = parity_inputs(arch, labels=labelled(arch))
    tol = TOL[peftc.LoRA]
    assert max_diff(ours, base, xs[0]) > MOVED * tol, "the random adapter left the output unchanged"

    ours.save_adapter(tmp_path)
    ref = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    assert sorted(peft_targets(ref)) == sorted(ours.store["default"].targets)
    for x in xs:
        assert_parity(ours, ref, x, tol)


@pytest.mark.parametrize("arch,case", MATRIX)
def test_peft_checkpoint_loads_in_peftc(arch, case, tmp_path):
    """PEFT saves a random adapter (random lora_B, perturbed modules_to_save); peftc.load_adapter gives its outputs."""
    ref = get_peft_model(make(arch), lora_config(arch, **spec_kwargs(arch, case)))
    randomize_peft_(ref, seed=4)
    ref.eval()
    ref.save_pretrained(tmp_path)

    base = make(arch)
    ours = peftc.load_adapter(base, tmp_path)
    xs = parity_inputs(arch, labels=labelled(arch))
    tol = TOL[peftc.LoRA]
    assert max_diff(ours, base, xs[0]) > MOVED * tol, "the loaded adapter left the output unchanged"
    assert sorted(ours.store["default"].targets) == sorted(peft_targets(ref))
    for x in xs:
        assert_parity(ours, ref, x, tol)
