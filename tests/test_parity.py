"""End-to-end parity with HF PEFT: same layers, parameter counts, outputs and losses; checkpoints both ways."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

import peftc
from tests.models import ARCHS, make
from tests.parity import (MOVED, TOL, assert_parity, assert_same_weights, lora_config, max_diff, parity_inputs,
                          peft_targets, randomize_ours_, randomize_peft_)

# PEFT warns about GPT-2's Conv1D (fan_in_fan_out) and similar; they say nothing about parity.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast, while two OpenMP threads on a busy 2-core machine run ~100x
    slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_DEC_LIST = ["k_proj", "mlp.down_proj", "model.layers.0.self_attn.o_proj"]  # a tail, two tails, an exact path
LIST_TARGETS = {
    "llama": _DEC_LIST, "qwen2": _DEC_LIST, "mistral": _DEC_LIST,
    "gpt2": ["c_proj", "transformer.h.1.attn.c_attn"],                       # c_proj: attention and MLP
    "bert": ["key", "output.dense", "bert.encoder.layer.1.intermediate.dense"],
    "vit": ["q_proj", "fc2", "vit.layers.0.mlp.fc1"],
    "minilm": ["key", "encoder.layer.5.output.dense"],
}
REGEX_TARGETS = {
    "llama": r".*\.(q_proj|up_proj)", "qwen2": r".*\.(q_proj|up_proj)", "mistral": r".*\.(q_proj|up_proj)",
    "gpt2": r"transformer\.h\.\d+\.mlp\.c_fc",
    "bert": r"bert\.encoder\.layer\.0\..*(query|value|dense)",
    "vit": r"vit\.layers\.1\.attention\.(k_proj|v_proj)",
    "minilm": r"encoder\.layer\.[0-2]\.attention\.self\.(query|value)",
}

# case -> (archs it runs on, keyword arguments of peftc.LoRA for an arch). Every arch runs "default"; the other
# cases are spread over the archs to keep the file fast.
CASES = {
    "default": (ARCHS, lambda a: {}),
    "rslora": (("llama", "gpt2", "bert", "vit"), lambda a: dict(r=4, alpha=16.0, use_rslora=True)),
    # the classification heads of bert (3 labels) and vit (5) are linear layers too: r must fit them
    "all-linear": (("llama", "qwen2", "gpt2", "bert", "vit", "minilm"),
                   lambda a: dict(targets="all-linear", r=2 if a in ("bert", "vit") else 8)),
    "list": (("qwen2", "mistral", "gpt2", "bert", "vit", "minilm"), lambda a: dict(targets=LIST_TARGETS[a])),
    "regex": (("llama", "gpt2", "bert", "vit"), lambda a: dict(targets=REGEX_TARGETS[a])),
    "modules_to_save": (("bert", "vit"), lambda a: dict(modules_to_save=["classifier"])),
    "seq_cls": (("bert",), lambda a: dict(task_type="SEQ_CLS")),
    "seq_cls-all-linear": (("bert",), lambda a: dict(task_type="SEQ_CLS", targets="all-linear")),
}
MATRIX = [pytest.param(arch, case, id=f"{arch}-{case}") for case, (archs, _) in CASES.items() for arch in archs]


def spec_kwargs(arch: str, case: str) -> dict:
    return CASES[case][1](arch)


@pytest.mark.parametrize("arch,case", MATRIX)
def test_compile_matches_peft(arch, case, tmp_path, capsys):
    """compile(LoRA(...)) builds what get_peft_model(LoraConfig(...)) builds: with the same fresh weights the same
    outputs (the base model's); saved with random weights, PeftModel.from_pretrained gives the same outputs; and it
    adapts the same layers and counts the same trainable parameters. (One test, to trace each model once.)"""
    kw = spec_kwargs(arch, case)
    base = make(arch)
    ours = peftc.compile(base, peftc.LoRA(**kw))
    fresh = get_peft_model(make(arch), lora_config(arch, **kw)).eval()
    xs = parity_inputs(arch)
    tol = TOL[peftc.LoRA]

    loaded = set_peft_model_state_dict(fresh, ours.store.peft_state_dict("default"))
    assert not loaded.unexpected_keys, f"PEFT does not know peftc's keys {loaded.unexpected_keys[:3]}"
    for x in xs:
        assert_parity(ours, fresh, x, tol)
        assert max_diff(ours, base, x) <= tol, "a fresh adapter changed the base model's output"

    randomize_ours_(ours, seed=3)
    assert max_diff(ours, base, xs[0]) > MOVED * tol, "the random adapter left the output unchanged"
    ours.save_adapter(tmp_path)
    ref = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    assert_same_weights(ours, ref)
    for x in xs:
        assert_parity(ours, ref, x, tol)

    mine, theirs = set(ours.store["default"].targets), peft_targets(fresh)
    assert mine == theirs, f"adapted layers: only peftc {sorted(mine - theirs)}, only PEFT {sorted(theirs - mine)}"
    assert ours.get_nb_trainable_parameters() == fresh.get_nb_trainable_parameters()
    capsys.readouterr()
    ours.print_trainable_parameters()
    fresh.print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.splitlines()
    assert mine == theirs


@pytest.mark.parametrize("arch,case", MATRIX)
def test_peft_checkpoint_loads_in_peftc(arch, case, tmp_path):
    """PEFT saves a random adapter (random lora_B, perturbed modules_to_save); peftc.load_adapter gives its outputs."""
    ref = get_peft_model(make(arch), lora_config(arch, **spec_kwargs(arch, case)))
    randomize_peft_(ref, seed=4)
    ref.eval()
    ref.save_pretrained(tmp_path)

    base = make(arch)
    ours = peftc.load_adapter(base, tmp_path)
    xs = parity_inputs(arch)
    tol = TOL[peftc.LoRA]
    assert max_diff(ours, base, xs[0]) > MOVED * tol, "the loaded adapter left the output unchanged"
    assert_same_weights(ours, ref)
    for x in xs:
        assert_parity(ours, ref, x, tol)


# A labelled case per model with a loss (a bare BertModel has none): the token loss of causal LMs, the class loss
# of bert (with its SEQ_CLS head saved) and vit (with modules_to_save).
LOSS_CASES = {"llama": "default", "qwen2": "rslora", "mistral": "list", "gpt2": "default", "bert": "seq_cls",
              "vit": "modules_to_save"}


@pytest.mark.parametrize("arch", LOSS_CASES)
def test_loss_matches_peft(arch, tmp_path):
    """With labels, a random adapter's loss (and logits) equal PEFT's for the same checkpoint."""
    ours = peftc.compile(make(arch), peftc.LoRA(**spec_kwargs(arch, LOSS_CASES[arch])))
    randomize_ours_(ours, seed=5)
    ours.save_adapter(tmp_path)
    ref = PeftModel.from_pretrained(make(arch), tmp_path).eval()
    for x in parity_inputs(arch, labels=True):
        assert_parity(ours, ref, x, TOL[peftc.LoRA])


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_peft_checkpoint_with_rank_above_a_layer_width_loads(arch, tmp_path):
    """PEFT accepts r=8 on a 3- or 5-way classifier under "all-linear"; peftc refuses that rank for a new adapter
    (r > min(in, out) is a mistake there) but loads such a checkpoint, with PEFT's outputs."""
    ref = get_peft_model(make(arch), lora_config(arch, targets="all-linear"))
    assert "classifier" in peft_targets(ref)
    randomize_peft_(ref, seed=6)
    ref.eval()
    ref.save_pretrained(tmp_path)
    with pytest.raises(peftc.SpecError, match="classifier"):
        peftc.compile(make(arch), peftc.LoRA(targets="all-linear"))
    ours = peftc.load_adapter(make(arch), tmp_path)
    assert_same_weights(ours, ref)
    for x in parity_inputs(arch):
        assert_parity(ours, ref, x, TOL[peftc.LoRA])
