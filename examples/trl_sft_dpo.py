"""Example: TRL's SFTTrainer (chat template, new special tokens trained as embedding rows) then DPOTrainer on a peftc
PeftModule, all offline on a tiny random Llama (10-25 s on a shared 2-core CPU).

    python examples/trl_sft_dpo.py [--seed 0]

Everything is built here: a byte-level BPE tokenizer trained on the shipped corpus (examples/data/corpus.txt), a
ChatML chat template whose <|im_start|> / <|im_end|> are NEW special tokens (the model's embedding is resized for
them), and a LlamaForCausalLM with random weights. LoRA r=16 goes on every linear layer, the output head trains as a
modules_to_save copy (a random base learns little through low-rank updates alone), and the new tokens' embedding
rows train through trainable_token_indices. SFT runs on examples/data/chat.jsonl (16 conversations), then
DPO on examples/data/preference.jsonl (16 prompt/chosen/rejected rows) with the reference TRL takes for a PEFT model
it is given: a frozen copy of the SFT-trained adapter, run by the same module (peftc.trl.DPOTrainer; no copy of the
base weights). Prints the losses; checks that the
base weights are bitwise unchanged, that only the new tokens' embedding rows moved, and that DPO's chosen reward
beats the rejected one by the end. Exits non-zero if a check fails. The base knows nothing, so this shows the
mechanics (tests/test_trl.py checks the same runs against TRL on PEFT), not a useful model.
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
CHAT_TEMPLATE = (   # ChatML; {% generation %} marks what the assistant says (TRL's assistant_only_loss)
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
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


def trainer_args(cls, out: str, seed: int, **kw):
    """TRL config for a CPU run: no reports, no checkpoints, float32 (TRL's bf16 default is autocast)."""
    return cls(output_dir=out, report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
               save_strategy="no", logging_steps=1, seed=seed, bf16=False, **kw)


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    import trl

    import peftc
    import peftc.trl
    from peftc.demo import auto_threads

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-steps", type=int, default=24)
    p.add_argument("--dpo-steps", type=int, default=16)
    a = p.parse_args(argv)
    torch.set_num_threads(auto_threads())   # 1 thread when other jobs keep the cores busy
    t0 = time.perf_counter()

    tok = chat_tokenizer()
    new = tok.convert_tokens_to_ids(SPECIAL)                        # [VOCAB, VOCAB + 1]: rows the base never had
    model = chat_model(tok, a.seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftc.compile(model, peftc.LoRA(r=16, alpha=32, targets="all-linear", modules_to_save=["lm_head"],
                                         trainable_token_indices=new))
    out = tempfile.mkdtemp(prefix="peftc_trl_")

    # SFT: TRL applies the chat template; the loss is on the assistant's tokens only (the template's generation
    # markers); the new tokens' embedding rows train with the LoRA weights
    sft = trl.SFTTrainer(model=pm, processing_class=tok, train_dataset=dataset("chat.jsonl"),
                         args=trainer_args(trl.SFTConfig, out, a.seed, max_steps=a.sft_steps, learning_rate=1e-2,
                                           per_device_train_batch_size=4, assistant_only_loss=True))
    sft.train()
    sft_losses = [h["loss"] for h in sft.state.log_history if "loss" in h]
    print("SFT loss  " + " ".join(f"{x:.3f}" for x in sft_losses))

    # DPO: peftc.trl.DPOTrainer gives the reference TRL gives a PEFT model: a frozen copy of the (SFT-trained)
    # adapter, run by the same module (rows routed to it); the base weights are shared, never copied
    dpo = peftc.trl.DPOTrainer(model=pm, processing_class=tok, train_dataset=dataset("preference.jsonl"),
                               args=trainer_args(trl.DPOConfig, out, a.seed, max_steps=a.dpo_steps,
                                                 learning_rate=5e-3, per_device_train_batch_size=8, beta=0.1))
    dpo.train()
    logs = [h for h in dpo.state.log_history if "loss" in h]
    print("DPO loss  " + " ".join(f"{h['loss']:.3f}" for h in logs))
    print("DPO margin " + " ".join(f"{h['rewards/margins']:.3f}" for h in logs))

    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        effective = next(iter(pm.store["default"].tokens.values())).value(weight)   # what the graph embeds
        others = [i for i in range(len(tok)) if i not in new]
        r = {
            "sft_losses": sft_losses, "dpo_losses": [h["loss"] for h in logs],
            "dpo_margins": [h["rewards/margins"] for h in logs], "adapters": pm.adapters,
            "base_unchanged": all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()),
            "other_rows_unchanged": torch.equal(effective[others], weight[others]),
            "new_rows_moved": bool((effective[new] - weight[new]).abs().amax(-1).min() > 0),
            "reference_holds_no_weights": not list(dpo.ref_model.parameters()),
            "seconds": time.perf_counter() - t0,
        }
    print(f"adapters {r['adapters']}; base unchanged: {r['base_unchanged']}; new token rows moved: "
          f"{r['new_rows_moved']}, other rows unchanged: {r['other_rows_unchanged']} ({r['seconds']:.1f} s)")
    return r


def failures(r: dict) -> list[str]:
    bad = [k for k in ("base_unchanged", "other_rows_unchanged", "new_rows_moved", "reference_holds_no_weights")
           if not r[k]]
    if not r["sft_losses"][-1] < 0.8 * r["sft_losses"][0]:
        bad.append(f"SFT loss did not fall by 20%: {r['sft_losses'][0]:.3f} -> {r['sft_losses'][-1]:.3f}")
    if not sum(r["dpo_margins"][-4:]) > 0:
        bad.append(f"DPO: the chosen reward does not beat the rejected one at the end: {r['dpo_margins'][-4:]}")
    return bad


if __name__ == "__main__":
    result = main()
    problems = failures(result)
    for f in problems:
        print("FAILED:", f)
    sys.exit(1 if problems else 0)
