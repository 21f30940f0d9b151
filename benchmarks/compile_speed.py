"""Benchmark: peftc under torch.compile (inductor) vs eager peftc and vs torch.compile(PEFT), timed interleaved.

    python benchmarks/compile_speed.py [--rounds 15] [--threads N] [--warmup 3] [--device cpu] [--compile-base]

Setup: lora_overhead.py's reference config (its build_base and build_contestants: Llama-shaped, hidden 512, 4 layers,
intermediate 1376, vocab 1024; LoRA r=16, alpha=32 on all seven projections, the same A and random non-zero B in
peftc and PEFT), batch 4 x 128 tokens, fp32, eval mode under torch.inference_mode().

Contestants: the base HF model and both libraries in eager mode; peftc compiled as users get it,
`peftc.CompiledPeftModule(pm, backend="inductor")` (what `peftc.compile(model, spec, backend="inductor")` returns,
wrapping the same PeftModule, so the weights are shared); PEFT compiled with `torch.compile(peft_model)` (inductor);
with --compile-base also `torch.compile(base)`, the floor for a compiled unmerged LoRA. Each compiled contestant is
compiled (and its compile time printed) and its outputs checked against eager peftc before anything is timed; the
first compile takes 30-60 s on a 2-core CPU.

Required: compiled peftc <= 0.9 x eager peftc, and no slower than compiled PEFT. Exits 1 when either fails.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import peftc  # noqa: E402
from lora_overhead import (BATCH, SEQ, bench_parser, build_base, build_contestants, example_ids, report,  # noqa: E402
                           setup, time_interleaved)

LIMIT_VS_EAGER = 0.9
LIMIT_VS_PEFT = 1.0
TOL = 1e-3  # inductor reorders float sums; logits here are O(1)


def compile_and_check(contestants: dict, compiled: dict, ids: torch.Tensor) -> None:
    """Compile each of `compiled` (the first call) and compare its logits with eager peftc's."""
    with torch.inference_mode():
        ref = contestants["peftc"](input_ids=ids).logits
        base = contestants["base"](input_ids=ids).logits
        for name, f in compiled.items():
            t0 = time.perf_counter()
            out = f(input_ids=ids).logits
            dt = time.perf_counter() - t0
            want = base if name == "base compiled" else ref
            diff = (out - want).abs().max().item()
            print(f"{name}: first call (compile) {dt:.1f} s; max |logits - eager| = {diff:.2e}")
            if not diff < TOL:
                raise SystemExit(f"{name} disagrees with eager; not timing")
            contestants[name] = f
    moved = (ref - base).abs().max().item()
    print(f"check: max |peftc - base| = {moved:.2e} (B != 0, must differ)")
    if not moved > 1e-3:
        raise SystemExit("the adapter changes nothing; not timing")


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, rounds=15)
    ap.add_argument("--compile-base", action="store_true", help="also time torch.compile(base) (one more compile)")
    args = ap.parse_args(argv)
    setup(args)
    base = build_base().to(args.device)
    ours, theirs = build_contestants(base)
    contestants = {"base": base, "PEFT": theirs, "peftc": ours}
    compiled = {"peftc compiled": peftc.CompiledPeftModule(ours, backend="inductor"),
                "PEFT compiled": torch.compile(theirs)}
    if args.compile_base:
        compiled["base compiled"] = torch.compile(base)
    ids = example_ids(base, BATCH, SEQ, args.device)                          # (B, T)
    compile_and_check(contestants, compiled, ids)

    times = time_interleaved(contestants, ids, args.rounds, args.warmup)
    pairs = [("peftc compiled", "peftc"), ("peftc compiled", "PEFT compiled"), ("PEFT compiled", "PEFT"),
             ("peftc", "PEFT")]
    if args.compile_base:
        pairs.append(("peftc compiled", "base compiled"))
    out = report(times, pairs, f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
                               f"batch {BATCH}x{SEQ}, fp32, {args.rounds} rounds (+{args.warmup} warm-up)")
    vs_eager, vs_peft = out["ratios"]["peftc compiled / peftc"], out["ratios"]["peftc compiled / PEFT compiled"]
    out["ok"] = vs_eager <= LIMIT_VS_EAGER and vs_peft <= LIMIT_VS_PEFT
    print(f"\ncompiled / eager peftc = {vs_eager:.3f} (required <= {LIMIT_VS_EAGER}); compiled peftc / compiled PEFT = "
          f"{vs_peft:.3f} (required <= {LIMIT_VS_PEFT}): {'ok' if out['ok'] else 'FAILS'}")
    return out

if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
