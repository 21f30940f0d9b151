"""Generation across decoder-only architectures: greedy tokens equal transformers' generate (left padding, sliding
windows shorter than the text, hybrid full/sliding layers), and models peftc cannot trace for generation, or that
changed after compile, are refused with what to do."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as tf

import peftc

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=128)
# architecture -> a tiny model of it; windows of 4 are shorter than prompt + new tokens, so the sliding mask matters
ARCHS = {
    "mistral_window": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=4)),
    "gemma2_hybrid": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=4)),
    "qwen2_hybrid": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                                              max_window_layers=1)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, pad_token_id=0)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=16)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**COMMON, head_dim=16)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128,
                                                               num_hidden_layers=2, num_attention_heads=4,
                                                               vocab_size=128, max_position_embeddings=128)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                  num_attention_heads=4, vocab_size=128, max_position_embeddings=128,
                                                  word_embed_proj_dim=64)),
    "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                                                     rotary_dim=8)),
    "starcoder2": lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**COMMON)),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)),
}
DEFAULT_SUITE = ("mistral_window",)     # the mask logic of one window (mixed layer types: gemma2_hybrid, slow)


def _prompt():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in DEFAULT_SUITE else pytest.mark.slow)
                                  for a in ARCHS])
def test_greedy_tokens_equal_transformers(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    pm = peftc.compile(model, peftc.LoRA(r=4, targets="all-linear", init="gaussian")).eval()
    ids, mask = _prompt()
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, **kw)             # B = 0: the adapter is the identity here
    assert torch.equal(pm.generate(ids, attention_mask=mask, **kw), ref)
    for p in pm.trainable_parameters():              # now the adapter matters: the merged model agrees with it
        torch.nn.init.normal_(p, std=0.5)
    adapted = pm.generate(ids, attention_mask=mask, **kw)
    assert not torch.equal(adapted, ref)
    assert torch.equal(pm.merge().generate(ids, attention_mask=mask, **kw), adapted)


def test_a_model_whose_forward_the_static_cache_trace_cannot_take_is_refused():
    model = tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)).eval()
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["query_key_value"]))
    ids = torch.randint(1, 128, (2, 5))
    with pytest.raises(peftc.GenerationError, match=r"BloomForCausalLM.*static KV cache.*export_merged"):
        pm.generate(ids, max_new_tokens=3)
    with torch.no_grad():                           # the forward still serves
        assert torch.allclose(pm(input_ids=ids).logits, model(input_ids=ids, use_cache=False).logits, atol=1e-5)


@pytest.mark.slow
def test_a_model_changed_after_compile_is_refused_naming_the_module():
    from tests.models import make

    model = make("llama")
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["q_proj"]))
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["v_proj"]))      # wraps v_proj in place
    with pytest.raises(peftc.GenerationError, match=r"changed after peftc\.compile.*v_proj.*copy"):
        pm.generate(torch.randint(1, 128, (2, 4)), max_new_tokens=2)
    fresh = peftc.compile(copy.deepcopy(make("llama")), peftc.LoRA(r=2, targets=["q_proj"]))
    assert fresh.generate(torch.randint(1, 128, (2, 4)), max_new_tokens=2).shape == (2, 6)
