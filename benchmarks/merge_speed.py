"""Benchmark: inference cost of a merged LoRA model (pm.merge()) vs the bare HF model, timed interleaved in one process.

    python benchmarks/merge_speed.py [--rounds 30] [--threads N] [--warmup 3] [--device cpu]

Setup (harness.py): the reference config (Llama-shaped, hidden 512, 4 layers, intermediate 1376, vocab 1024; batch
4 x 128 tokens, fp32, eval mode under torch.inference_mode()), LoRA r=16, alpha=32 on all seven projections with
random non-zero B. Contestants, each on its own copy of the weights: the base HF model (called with use_cache=False,
like every HF model in the harness), the merged module (the merge of a copy of the PeftModule) and the unmerged
PeftModule for reference. The merged module's outputs are checked against the unmerged one's (and against the
base's: they must differ) before anything is timed.

A merge folds s B A into W, so the merged graph runs the base model's ops: the goal is merged / base = 1.00; the
check is merged / base <= 1.05.
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import peftc  # noqa: E402
import harness as H  # noqa: E402

LIMIT = 1.05
PAIRS = [("merged", "base"), ("unmerged", "base")]


def build_contestants(base, seed: int = 1) -> list[H.Contestant]:
    """base (its own copy), merged (the merge of a copy of pm) and unmerged (pm), pm with random non-zero B."""
    pm = peftc.compile(H.own_copy(base), peftc.LoRA(r=H.R, alpha=H.ALPHA, targets=list(H.PROJ))).eval()
    H.randomize_b_(pm, seed)
    merged = copy.deepcopy(pm).merge().eval()
    return [H.Contestant("base", H.own_copy(base)), H.Contestant("merged", merged), H.Contestant("unmerged", pm)]


def main(argv: list[str] | None = None) -> dict:
    args = H.parse(H.bench_parser(__doc__), argv)
    H.setup(args)
    base = H.build_base().to(args.device)
    cs = build_contestants(base)
    inputs = H.example_inputs(base.config.vocab_size, device=args.device)
    out = H.check(cs, inputs, torch.inference_mode, differ=[("merged", "base", 1e-3)])
    scale = out["unmerged"].abs().max().item()
    H.check_outputs(out, agree=[("merged", "unmerged", 1e-3 * scale)])

    times = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, torch.inference_mode)
    res = H.report(times, PAIRS, H.header(args))
    r = res["ratios"]["merged / base"]
    res["ok"] = r <= LIMIT
    print(f"merged / base {r:.3f}: {'ok' if res['ok'] else 'ABOVE'} (goal 1.00, limit {LIMIT:.2f})")
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
