"""Example: LoRA fine-tune of the real all-MiniLM-L6-v2 as a 4-way topic classifier with peftc (about a minute on CPU).

    python examples/classify_minilm.py [--epochs 4] [--seed 0] [--out DIR]

Splits the shipped data set (peftc/data/topics.jsonl: 480 sentences, sports / food / technology / weather) into 360
train and 120 held-out, trains LoRA on the query/value projections plus a trainable copy of the new classifier head,
and checks: held-out accuracy >= 0.9, the base model's weights bitwise unchanged, and that the adapter saved in
PEFT's format reloads (peftc.load_adapter) to the same predictions. Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

import peftc  # noqa: E402
from peftc.demo import LABELS, accuracy, auto_threads, batches, encode, load_split, minilm_dir, predict  # noqa: E402

MIN_ACCURACY = 0.9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    hf_logging.set_verbosity_error()   # the classifier head is new; transformers would warn about it
    torch.set_num_threads(auto_threads())   # 1 thread when other jobs keep the cores busy
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    train_rows, test_rows = load_split(args.seed)
    train, test = encode(tokenizer, train_rows), encode(tokenizer, test_rows)
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(LABELS))
    base_snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    spec = peftc.LoRA(r=8, alpha=16, dropout=0.1, targets=["query", "value"], modules_to_save=["classifier"])
    pm = peftc.compile(model, spec)   # the model itself is not changed: pm shares its weights, frozen
    pm.print_trainable_parameters()
    acc_before = accuracy(predict(pm, test), test["labels"])
    print(f"held-out accuracy before: {acc_before:.3f}")

    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for epoch in range(1, args.epochs + 1):
        pm.train()
        total = 0.0
        for b in batches(train, args.batch_size, g):
            loss = pm(**b).loss          # the model's own loss, computed from its logits
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b["labels"])
        losses.append(total / len(train["labels"]))
        print(f"epoch {epoch}: train loss {losses[-1]:.4f}")

    logits = predict(pm, test)
    acc_after = accuracy(logits, test["labels"])
    seconds = time.perf_counter() - t0
    print(f"held-out accuracy after:  {acc_after:.3f}  ({seconds:.1f}s)")

    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base_snapshot[k])]
    print(f"base weights unchanged: {not changed}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        pm.save_adapter(out)                        # adapter_config.json + adapter_model.safetensors
        reloaded = peftc.load_adapter(model, out)   # PEFT's PeftModel.from_pretrained reads it too
        max_diff = (predict(reloaded, test) - logits).abs().max().item()
    print(f"adapter saved to {out}; reload max |logit diff| {max_diff:.2e}")
    return {"accuracy_before": acc_before, "accuracy_after": acc_after, "losses": losses,
            "base_unchanged": not changed, "reload_same": max_diff == 0.0, "reload_max_diff": max_diff,
            "seconds": seconds}


if __name__ == "__main__":
    r = main()
    failed = [msg for ok, msg in [
        (r["accuracy_after"] >= MIN_ACCURACY, f"held-out accuracy {r['accuracy_after']:.3f} < {MIN_ACCURACY}"),
        (r["base_unchanged"], "base model weights changed"),
        (r["reload_same"], f"reloaded adapter disagrees (max |logit diff| {r['reload_max_diff']:.2e})"),
    ] if not ok]
    for msg in failed:
        print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1 if failed else 0)
