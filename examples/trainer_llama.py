"""Example: HF Trainer (peftc.Trainer) fine-tunes LoRA on a tiny random Llama, byte-level, on the shipped corpus;
runs alone or data-parallel under accelerate (one process per device, or CPU processes over gloo).

    python examples/trainer_llama.py --out DIR [--steps 12] [--batch 8]
    accelerate launch --multi_gpu --num_processes 2 examples/trainer_llama.py --out DIR [--batch 8] [--fsdp]

(accelerate 1.16's `--cpu` alone starts a single process; with no GPU visible, `--multi_gpu --num_processes 2` starts
two CPU processes over gloo, since the script trains with use_cpu=True.)

--batch is the global batch: each of the N processes takes batch / N rows of it, so a run on 2 processes trains on
the same batches as one process. Writes, under DIR: the adapter in PEFT's format (trainer.save_model), the
checkpoints (checkpoint-N, adapters only), rank<r>.safetensors (each process's trained adapter tensors) and
losses.json (the logged losses, from process 0). Exits non-zero unless the loss went down.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

import peftc  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
SEQ = 32


def rows() -> list[dict]:
    """Non-overlapping SEQ-byte windows of the corpus; labels = input_ids (the model shifts them)."""
    data = torch.tensor(list(CORPUS.read_bytes()))
    x = data[: len(data) // SEQ * SEQ].view(-1, SEQ)     # (N, SEQ)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in x]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows per step over all processes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fsdp", action="store_true", help="Trainer's fsdp='full_shard' (under a multi-process launch)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if a.batch % world:
        raise SystemExit(f"--batch {a.batch} must be a multiple of the {world} processes")

    torch.manual_seed(a.seed)     # the same base model and initial adapter in every process
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=SEQ)).eval()
    pm = peftc.compile(model, peftc.LoRA(r=8, alpha=16, targets="all-linear"))
    args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=a.batch // world, max_steps=a.steps,
                             learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=a.steps // 2,
                             report_to=[], use_cpu=True, fsdp="full_shard" if a.fsdp else "", disable_tqdm=True,
                             seed=a.seed, dataloader_drop_last=True)
    trainer = peftc.Trainer(model=pm, args=args, train_dataset=rows())
    trainer.train()
    trainer.save_model(a.out)
    out = Path(a.out)
    save_file({k: v.contiguous() for k, v in pm.store.peft_state_dict("default").items()},
              out / f"rank{rank}.safetensors")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if rank == 0:
        (out / "losses.json").write_text(json.dumps({"world_size": world, "losses": losses}))
        print(f"world size {world}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"the loss did not go down: {losses}")


if __name__ == "__main__":
    main()
