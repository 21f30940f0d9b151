"""Benchmark: peftc under torch.compile (inductor) vs eager peftc and vs torch.compile(PEFT), timed interleaved.

    python benchmarks/compile_speed.py [--rounds 15] [--threads N] [--warmup 3] [--device cpu] [--compile-base]

Setup (harness.py): the reference config (Llama-shaped, hidden 512, 4 layers, intermediate 1376, vocab 1024; LoRA
r=16, alpha=32 on all seven projections, the same A and random non-zero B in peftc and PEFT), batch 4 x 128 tokens,
fp32, eval mode under torch.inference_mode(); the base model, peftc and PEFT each on their own copy of the weights,
every HF model called with use_cache=False (harness rules).

Contestants: the base HF model and both libraries in eager mode; peftc compiled as users get it,
`peftc.CompiledPeftModule(pm, backend="inductor")` (what `peftc.compile(model, spec, backend="inductor")` returns,
wrapping the same PeftModule: the same module in two modes); PEFT compiled with `torch.compile(peft_model)`
(inductor); with --compile-base also `torch.compile(base)`, the floor for a compiled unmerged LoRA. Each compiled
contestant is compiled by its first call (the time is printed) and its outputs checked against its eager form before
anything is timed; the first compile takes 30-60 s on a 2-core CPU.

Required: compiled peftc <= 0.9 x eager peftc, and no slower than compiled PEFT. Exits 1 when either fails.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import peftc  # noqa: E402
import harness as H  # noqa: E402

LIMIT_VS_EAGER = 0.9
LIMIT_VS_PEFT = 1.0
TOL = 1e-3  # inductor reorders float sums; logits here are O(1)


def main(argv: list[str] | None = None) -> dict:
    ap = H.bench_parser(__doc__, rounds=15)
    ap.add_argument("--compile-base", action="store_true", help="also time torch.compile(base) (one more compile)")
    args = H.parse(ap, argv)
    H.setup(args)
    base = H.build_base().to(args.device)
    ours, theirs = H.build_lora_pair(base)
    own_base = H.own_copy(base)
    cs = [H.Contestant("base", own_base), H.Contestant("PEFT", theirs), H.Contestant("peftc", ours),
          H.Contestant("peftc compiled", peftc.CompiledPeftModule(ours, backend="inductor")),
          H.Contestant("PEFT compiled", torch.compile(theirs))]
    agree = [("peftc", "PEFT", 1e-4), ("peftc compiled", "peftc", TOL), ("PEFT compiled", "PEFT", TOL)]
    if args.compile_base:
        cs.append(H.Contestant("base compiled", torch.compile(own_base)))
        agree.append(("base compiled", "base", TOL))
    inputs = H.example_inputs(base.config.vocab_size, device=args.device)
    t0 = time.perf_counter()
    H.check(cs, inputs, torch.inference_mode, agree=agree, differ=[("peftc", "base", 1e-3)])
    print(f"first calls (compiling) in {time.perf_counter() - t0:.1f} s")

    times = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, torch.inference_mode)
    pairs = [("peftc compiled", "peftc"), ("peftc compiled", "PEFT compiled"), ("PEFT compiled", "PEFT"),
             ("peftc", "PEFT"), ("peftc", "base")]
    if args.compile_base:
        pairs += [("peftc compiled", "base compiled"), ("base compiled", "base")]
    out = H.report(times, pairs, H.header(args))
    vs_eager, vs_peft = out["ratios"]["peftc compiled / peftc"], out["ratios"]["peftc compiled / PEFT compiled"]
    out["ok"] = vs_eager <= LIMIT_VS_EAGER and vs_peft <= LIMIT_VS_PEFT
    print(f"\ncompiled / eager peftc = {vs_eager:.3f} (required <= {LIMIT_VS_EAGER}); compiled peftc / compiled PEFT = "
          f"{vs_peft:.3f} (required <= {LIMIT_VS_PEFT}): {'ok' if out['ok'] else 'FAILS'}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
