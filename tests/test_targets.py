"""Targets: PEFT's forms (names, regex, "all-linear", None) resolved against the traced graph's linear sites."""
from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf
from torch import nn

import peftc
from peftc import LoRA
from peftc.errors import SpecError, TargetNotFound
from peftc.passes.match import find_sites
from peftc.targets import check_rank, name_matches, output_head_paths, peft_target_modules, resolve_targets
from peftc.trace import trace
from tests.models import make


@functools.lru_cache(maxsize=None)
def resolved(arch: str, task_type=None):
    """(sites, output heads) of a tiny HF model, traced once."""
    model = make(arch)
    gm = trace(model).gm
    sites = find_sites(gm)
    return sites, output_head_paths(model, task_type)


def select(arch: str, targets, task_type=None) -> list[str]:
    sites, heads = resolved(arch, task_type)
    return resolve_targets(targets, sites, heads)


LLAMA_LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]


def llama(*names: str, layers=(0, 1)) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in layers for n in names]


def test_name_matches_whole_components():
    assert name_matches("model.layers.0.self_attn.q_proj", "q_proj")
    assert name_matches("model.layers.0.self_attn.q_proj", "self_attn.q_proj")
    assert name_matches("lm_head", "lm_head")
    assert not name_matches("model.layers.0.self_attn.q_proj", "attn.q_proj")    # not a component boundary
    assert not name_matches("model.layers.0.self_attn.q_proj", "proj")
    assert not name_matches("model.layers.0.self_attn.q_proj", "q_proj.weight")


def test_list_of_names_exact_and_trailing():
    assert select("llama", ["q_proj", "v_proj"]) == llama("self_attn.q_proj", "self_attn.v_proj")
    assert select("llama", ["layers.1.mlp.down_proj", "lm_head"]) == llama("mlp.down_proj", layers=(1,)) + ["lm_head"]
    assert select("llama", ["model.layers.0.self_attn.o_proj"]) == llama("self_attn.o_proj", layers=(0,))
    assert select("llama", ("up_proj", "up_proj")) == llama("mlp.up_proj")       # duplicates are harmless


def test_regex_must_match_the_whole_path():
    assert select("llama", r".*\.(q_proj|v_proj)") == llama("self_attn.q_proj", "self_attn.v_proj")
    assert select("llama", r"model\.layers\.1\..*_proj") == llama(*LLAMA_LAYER, layers=(1,))
    with pytest.raises(TargetNotFound, match=r"regex 'q_proj' fully matched no linear layer path.*whole path"):
        select("llama", "q_proj")                               # search() would match; fullmatch does not


def test_invalid_regex_is_a_spec_error():
    with pytest.raises(SpecError, match=r"targets='q_proj\(' is not a valid regular expression"):
        select("llama", "q_proj(")


@pytest.mark.parametrize("arch, head, n_linear, task_type", [
    ("llama", "lm_head", 2 * 7, None),
    ("gpt2", "lm_head", 2 * 4, None),
    ("bert", "classifier", 2 * 6 + 1, "SEQ_CLS"),               # the pooler is kept, the classifier is not
    ("vit", "classifier", 2 * 6, "SEQ_CLS"),
])
def test_all_linear_excludes_the_output_head(arch, head, n_linear, task_type):
    sites, _ = resolved(arch, task_type)
    chosen = select(arch, "all-linear", task_type)
    assert head not in chosen and head in sites
    assert chosen == [f for f, s in sites.items() if f != head and s.linear_like]   # PEFT's: no embeddings, convs
    assert len(chosen) == n_linear
    assert select(arch, "ALL-LINEAR", task_type) == chosen


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_all_linear_keeps_a_classification_head_without_seq_cls(arch):
    """As PEFT: without task_type="SEQ_CLS" the classifier of a model with no output embeddings is a linear layer
    like the others."""
    assert "classifier" in select(arch, "all-linear")


def test_all_linear_head_rules():
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=64)
    assert output_head_paths(tf.BertModel(cfg), None) == set()                      # bare encoder: nothing
    seq_cls = tf.BertForSequenceClassification(cfg)
    assert output_head_paths(seq_cls, "SEQ_CLS") == {"classifier"}
    assert output_head_paths(seq_cls, None) == set()                                # as PEFT without a task type
    lm = tf.BertForMaskedLM(cfg)
    assert output_head_paths(lm, None) == {"cls.predictions.decoder"}               # the output embeddings
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    assert output_head_paths(mlp, None) == set()                # plain module: PEFT keeps its final layer too
    assert output_head_paths(mlp, "SEQ_CLS") == set()           # no classifier / score attribute


@pytest.mark.parametrize("arch, expected", [
    ("llama", llama("self_attn.q_proj", "self_attn.v_proj")),
    ("gpt2", [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]),                   # fused q, k, v
    ("bert", [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")]),
    ("vit", [f"vit.layers.{i}.attention.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]),
])
def test_none_selects_query_and_value_from_the_attention_pattern(arch, expected):
    assert select(arch, None) == expected


def test_none_without_attention_says_to_pass_targets():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetNotFound, match=r"no scaled_dot_product_attention.*pass targets explicitly.*"
                                             r"All linear names: 0, 2"):
        peftc.compile(mlp, peftc.LoRA(r=1), example_inputs=(torch.randn(2, 4),))


def test_model_without_linear_layers():
    with pytest.raises(TargetNotFound, match="no linear layer"):
        peftc.compile(nn.Sequential(nn.ReLU()), peftc.LoRA(r=1, targets="all-linear"),
                      example_inputs=(torch.randn(2, 4),))


ALL_NAMES = ("all linear names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head; other layers: "
             "embed_tokens (embedding)")


def test_unknown_target_lists_closest_and_all_names():
    with pytest.raises(TargetNotFound) as e:
        select("llama", ["q_prj"])
    msg = str(e.value)
    assert "targets ['q_prj'] matched no linear layer" in msg
    assert "closest q_proj (model.layers." in msg
    assert msg.endswith(ALL_NAMES)


def test_unknown_target_is_an_error_even_when_others_match():
    with pytest.raises(TargetNotFound) as e:
        select("llama", ["q_proj", "v_prj", "gate"])
    msg = str(e.value)
    assert "targets ['v_prj', 'gate'] matched no linear layer" in msg
    assert "'v_prj': closest v_proj" in msg and "'gate': closest gate_proj" in msg
    assert ALL_NAMES in msg


def test_unknown_regex_lists_closest_and_all_names():
    with pytest.raises(TargetNotFound, match=r"closest: .*; all linear names: c_attn, c_proj, c_fc, lm_head"):
        select("gpt2", r"transformer\.h\.0\.attn\.c_atn")


def test_rank_larger_than_a_targeted_layer_names_the_layer():
    sites, _ = resolved("llama")
    chosen = select("llama", ["q_proj", "k_proj"])
    check_rank(LoRA(r=32), sites, chosen)                       # k_proj is 64 -> 32: r = 32 still fits
    with pytest.raises(SpecError, match=r"r=33 is larger than min\(in, out\)=32 of layer "
                                        r"model\.layers\.0\.self_attn\.k_proj \(in=64, out=32\); use r <= 32"):
        check_rank(LoRA(r=33), sites, chosen)
    check_rank(LoRA(r=64), sites, select("llama", ["q_proj"]))  # only targeted layers count
    check_rank(LoRA(r=64, rank_pattern={"k_proj": 8}), sites, chosen)   # a per-layer rank is checked per layer
    with pytest.raises(SpecError, match=r"r=40 is larger .*k_proj"):
        check_rank(LoRA(r=8, rank_pattern={"k_proj": 40}), sites, chosen)


def test_rank_check_through_compile():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(SpecError, match=r"r=4 is larger than min\(in, out\)=3 of layer 2 "):
        peftc.compile(mlp, peftc.LoRA(r=4, targets=["0", "2"]),
                      example_inputs=(torch.randn(2, 8),))
    with pytest.raises(SpecError, match=r"r=4 is larger than min\(in, out\)=3 of layer 2 "):
        peftc.compile(mlp, peftc.LoRA(r=4, targets="all-linear"), example_inputs=(torch.randn(2, 8),))


def test_all_linear_on_a_custom_module_keeps_its_final_layer():
    """As PEFT: only a Hugging Face model's output embeddings (or, with SEQ_CLS, its classifier) are left out; a
    plain module's last linear layer is adapted like the others."""
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 8)
    pm = peftc.compile(mlp, peftc.LoRA(r=2, targets="all-linear"), example_inputs=(x,))
    assert pm.store["default"].targets == ["0", "2"]
    pm = peftc.compile(mlp, peftc.LoRA(r=2, targets="all-linear", task_type="SEQ_CLS"), example_inputs=(x,))
    assert pm.store["default"].targets == ["0", "2"]


def test_peft_target_modules_select_the_same_layers():
    sites, _ = resolved("llama")
    for targets in (None, "all-linear", ["v_proj", "q_proj"], r".*\.q_proj", ["layers.0.self_attn.q_proj"]):
        chosen = select("llama", targets)
        saved = peft_target_modules(targets, sites, chosen)
        again = select("llama", saved if isinstance(saved, str) else list(saved))
        assert again == chosen, (targets, saved)
    assert peft_target_modules(None, sites, select("llama", None)) == ["q_proj", "v_proj"]
    assert peft_target_modules("all-linear", sites, select("llama", "all-linear")) == sorted(
        n.rsplit(".", 1)[-1] for n in LLAMA_LAYER)
