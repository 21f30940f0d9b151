"""Built-in tiny configs of real architectures (`tiny:<arch>` on the command line): random weights, no download."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

VOCAB = 128


def _decoder(config_cls: str, model_cls: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers as tf

        cfg = getattr(tf, config_cls)(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=128)
        return getattr(tf, model_cls)(cfg)
    return make


def _gpt2() -> nn.Module:
    import transformers as tf

    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                            bos_token_id=0, eos_token_id=0))


def _bert() -> nn.Module:
    import transformers as tf

    return tf.BertForSequenceClassification(tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=128, vocab_size=VOCAB, num_labels=3))


def _vit() -> nn.Module:
    import transformers as tf

    return tf.ViTForImageClassification(tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, image_size=32, patch_size=8, num_labels=5))


# arch -> builder; each is 2 layers, hidden 64 (the same shapes as the parity tests use)
TINY: dict[str, Callable[[], nn.Module]] = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM"),
    "gpt2": _gpt2,
    "bert": _bert,
    "vit": _vit,
}


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A random-init model of `arch` (one of TINY) in eval mode."""
    if arch not in TINY:
        raise ValueError(f"unknown tiny architecture {arch!r}; built in: {', '.join(TINY)}")
    torch.manual_seed(seed)
    return TINY[arch]().eval()
