"""Benchmark: inference cost of a merged LoRA model (pm.merge()) vs the bare HF model, timed interleaved in one process.

    python benchmarks/merge_speed.py [--rounds 30] [--threads N] [--warmup 3] [--device cpu]

Setup: lora_overhead.py's reference config (Llama-shaped, hidden 512, 4 layers, intermediate 1376, vocab 1024; batch
4 x 128 tokens, fp32, eval mode under torch.inference_mode()), LoRA r=16, alpha=32 on all seven projections with
random non-zero B. Contestants: the base HF model, the merged module, and the unmerged PeftModule for reference. The
merged module's outputs are checked against the unmerged one's (and against the base's: they must differ) before
anything is timed.

A merge folds s B A into W, so the merged graph runs the base model's ops: the goal is merged / base = 1.00; the
check is merged / base <= 1.05.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

import peftc  # noqa: E402
from lora_overhead import ALPHA, BATCH, PROJ, R, SEQ, build_base, time_interleaved  # noqa: E402

LIMIT = 1.05


def build_contestants(base, seed: int = 1) -> dict:
    """{"base": the HF model, "merged": pm.merge(), "unmerged": pm}, pm with random non-zero B (std 0.02)."""
    pm = peftc.compile(base, peftc.LoRA(r=R, alpha=ALPHA, targets=list(PROJ))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in pm.store[pm.active_adapter].sites.values():
            w.B.copy_((torch.randn(w.B.shape, generator=g) * 0.02).to(w.B.device))
    merged = pm.merge().eval()
    return {"base": base, "merged": merged, "unmerged": pm}


def check_outputs(contestants: dict, ids: torch.Tensor) -> None:
    with torch.inference_mode():
        out = {k: f(input_ids=ids).logits for k, f in contestants.items()}
    scale = out["unmerged"].abs().max().item()
    diff = (out["merged"] - out["unmerged"]).abs().max().item()
    moved = (out["merged"] - out["base"]).abs().max().item()
    print(f"check: max |merged - unmerged| = {diff:.2e} ({diff / scale:.1e} of max |logit|); "
          f"max |merged - base| = {moved:.2e} (B != 0, must differ)")
    if not diff <= 1e-3 * scale or not moved > 1e-3:
        raise SystemExit("outputs disagree; not timing")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as torch starts)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings are synchronized)")
    args = ap.parse_args(argv)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = build_base().to(args.device)
    contestants = build_contestants(base)
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))  # (B, T)
    ids = ids.to(args.device)
    check_outputs(contestants, ids)

    times = time_interleaved(contestants, ids, args.rounds, args.warmup)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"\ntorch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {BATCH}x{SEQ}, fp32, "
          f"{args.rounds} rounds (+{args.warmup} warm-up)")
    print(f"{'':9s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'/ base':>8s}")
    for n in contestants:
        t = times[n]
        print(f"{n:9s} {1e3 * med[n]:10.2f} {1e3 * min(t):8.2f} {1e3 * max(t):8.2f} {med[n] / med['base']:8.3f}")
    ratios = {"merged/base": med["merged"] / med["base"], "unmerged/base": med["unmerged"] / med["base"]}
    mins = {f"{n}/base": min(times[n]) / min(times["base"]) for n in ("merged", "unmerged")}
    paired = {f"{n}/base": statistics.median(x / y for x, y in zip(times[n], times["base"]))
              for n in ("merged", "unmerged")}
    print("\nratios of medians: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("ratios of minimums: " + ", ".join(f"{k} {v:.3f}" for k, v in mins.items()))
    print("median per-round ratio: " + ", ".join(f"{k} {v:.3f}" for k, v in paired.items()))
    ok = ratios["merged/base"] <= LIMIT
    print(f"merged/base {ratios['merged/base']:.3f}: {'ok' if ok else 'ABOVE'} (goal 1.00, limit {LIMIT:.2f})")
    return {"medians_s": med, "ratios": ratios, "min_ratios": mins, "paired_ratios": paired, "ok": ok}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
