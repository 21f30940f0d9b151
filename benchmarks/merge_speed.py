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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import peftc  # noqa: E402
from lora_overhead import (ALPHA, BATCH, PROJ, R, SEQ, bench_parser, build_base, example_ids, report,  # noqa: E402
                           setup, time_interleaved)

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
    args = bench_parser(__doc__).parse_args(argv)
    setup(args)
    base = build_base().to(args.device)
    contestants = build_contestants(base)
    ids = example_ids(base, BATCH, SEQ, args.device)                          # (B, T)
    check_outputs(contestants, ids)

    times = time_interleaved(contestants, ids, args.rounds, args.warmup)
    out = report(times, [("merged", "base"), ("unmerged", "base")],
                 f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {BATCH}x{SEQ}, "
                 f"fp32, {args.rounds} rounds (+{args.warmup} warm-up)")
    r = out["ratios"]["merged / base"]
    out["ok"] = r <= LIMIT
    print(f"merged / base {r:.3f}: {'ok' if out['ok'] else 'ABOVE'} (goal 1.00, limit {LIMIT:.2f})")
    return out

if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
