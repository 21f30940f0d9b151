"""Example: TRL's SFTTrainer (chat template, new special tokens trained as embedding rows) then DPOTrainer on a peftc
PeftModule, all offline on a tiny random Llama (about 30 s on a 2-core CPU).

    python examples/trl_sft_dpo.py [--seed 0]

Everything is built here: a byte-level BPE tokenizer trained on the shipped corpus (examples/data/corpus.txt), a
ChatML chat template whose <|im_start|> / <|im_end|> are NEW special tokens (the model's embedding is resized for
them), and a LlamaForCausalLM with random weights. LoRA r=8 goes on the attention projections and the new tokens'
embedding rows train through trainable_token_indices. SFT runs on examples/data/chat.jsonl (16 conversations), then
DPO on examples/data/preference.jsonl (16 prompt/chosen/rejected rows) with the reference taken as the same module
with its adapter off (peftc.trl.reference_model: no copy of the base weights). Prints the losses; checks that the
base weights are bitwise unchanged, that only the new tokens' embedding rows moved, and that DPO's chosen reward
beats the rejected one by the end. Exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
SPECIAL = ["<|im_start|>", "<|im_end|>"]
EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
VOCAB = 320          # the base tokenizer's size (the 256 bytes, merges, <|endoftext|>)


def base_tokenizer():
    """A byte-level BPE tokenizer trained here on the shipped corpus (deterministic, no download): VOCAB tokens,
    <|endoftext|> as eos and pad, no chat template yet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(DATA / "corpus.txt").read_text()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def chat_tokenizer():
    """base_tokenizer() plus the ChatML template and its two NEW special tokens (ids VOCAB, VOCAB + 1)."""
    tok = base_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def base_model(seed: int = 0, vocab: int = VOCAB):
    """A tiny LlamaForCausalLM with random weights from `seed` (the "pretrained" base), in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, eos_token_id=0,
                      pad_token_id=0, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def chat_model(tok, seed: int = 0):
    """base_model(seed) with its embedding and head resized for the chat tokens (new rows: transformers' mean
    resizing, drawn from the seed)."""
    model = base_model(seed)
    torch.manual_seed(seed + 1)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return model


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def dataset(name: str):
    from datasets import Dataset

    return Dataset.from_list(jsonl(name))


def text_dataset():
    """The corpus as one paragraph per row (for packing)."""
    from datasets import Dataset

    paras = [p.replace("\n", " ").strip() for p in (DATA / "corpus.txt").read_text().split("\n\n") if p.strip()]
    return Dataset.from_list([{"text": p} for p in paras])
