"""Benchmark: inference overhead of unmerged IA3 (default targets), peftc vs HF PEFT vs the bare model, interleaved.

    python benchmarks/ia3.py [--rounds 30] [--threads N] [--warmup 3] [--modes no_grad,inference]

Setup (harness.py's reference model): a Llama-shaped LlamaForCausalLM (random init; hidden 512, 4 layers, 8 heads,
intermediate 1376, vocab 1024), batch 4 x 128 tokens, fp32, eval mode. IA3 with its default targets: k_proj and
v_proj outputs scaled, down_proj's input scaled (`peftc.IA3()`; PEFT's `IA3Config()`, the same layers for Llama).
The base model, peftc and PEFT each run on their own copy of the weights; both adapters get the same random vectors
(N(1, 0.1^2), peftc's copied into PEFT's ia3_l by module path), and their outputs are checked against each other (and
against the base: they must differ) before anything is timed. No contestant builds a KV cache.

IA3 adds one elementwise multiply per site (12 here) and no GEMM, so the floor is about 1.00x the base; the goal is
peftc / base <= 1.03 by medians in each mode.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import harness as H  # noqa: E402

MODES = ("no_grad", "inference")
GOAL = 1.03
PAIRS = [("peftc", "base"), ("PEFT", "base"), ("peftc", "PEFT")]


def build_ia3_pair(base, seed: int = 1):
    """(peftc PeftModule, PEFT PeftModel) with IA3's default targets, each on its own copy of `base`, with the same
    random vectors."""
    import peftc
    from peft import IA3Config, get_peft_model

    ours = peftc.compile(H.own_copy(base), peftc.IA3()).eval()
    theirs = get_peft_model(H.own_copy(base), IA3Config()).eval()
    g = torch.Generator().manual_seed(seed)
    ad = ours.store[ours.active_adapter]
    with torch.no_grad():
        for path in ad.targets:
            w = ad.sites[path.replace(".", "-")].l
            w.copy_((1 + 0.1 * torch.randn(w.shape, generator=g)).to(w.device))
            theirs.base_model.model.get_submodule(path).ia3_l["default"].copy_(w)
    return ours, theirs


def main(argv: list[str] | None = None) -> dict:
    args = H.parse(H.bench_parser(__doc__, modes=MODES), argv, MODES)
    H.setup(args)
    base = H.build_base().to(args.device)
    ours, theirs = build_ia3_pair(base)
    cs = [H.Contestant("base", H.own_copy(base)), H.Contestant("PEFT", theirs), H.Contestant("peftc", ours)]
    inputs = H.example_inputs(base.config.vocab_size, device=args.device)
    results: dict = {}
    for mode, ctx in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        if mode not in args.modes:
            continue
        H.check(cs, inputs, ctx, agree=[("peftc", "PEFT", 1e-4)], differ=[("peftc", "base", 1e-4)])
        t = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, ctx)
        results[mode] = H.report(t, PAIRS, f"eval forward, torch.{mode}(): {H.header(args)}")
    print()
    key = " / ".join(PAIRS[0])
    for mode, res in results.items():
        got = res["ratios"][key]
        print(f"{mode:9s} {key}: {got:.3f} by medians, {res['min_ratios'][key]:.3f} by minimums, "
              f"{res['paired_ratios'][key]:.3f} per round; goal <= {GOAL:.2f}: "
              f"{'met' if got <= GOAL else 'NOT met'} (by medians)")
    return results


if __name__ == "__main__":
    main()
