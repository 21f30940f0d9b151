"""Benchmark: inference overhead of unmerged LoRA, peftc vs HF PEFT vs the bare model, timed interleaved in one process.

    python benchmarks/lora_overhead.py [--rounds 30] [--threads N] [--warmup 3]

Setup (harness.py): a Llama-shaped LlamaForCausalLM (random init; hidden 512, 4 layers, 8 heads, intermediate 1376,
vocab 1024), LoRA r=16, alpha=32 on all seven projections (q, k, v, o, gate, up, down), batch 4 x 128 tokens, fp32,
eval mode under torch.inference_mode(). The base model, peftc and PEFT each run on their own copy of the weights;
both adapters get the same A and the same random non-zero B, and their outputs are checked against each other (and
against the base: they must differ) before anything is timed. No contestant builds a KV cache.

The floor for any unmerged LoRA is 1 + (adapter FLOPs / base FLOPs), printed as "ideal".
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import harness as H  # noqa: E402

PAIRS = [("peftc", "base"), ("PEFT", "base"), ("peftc", "PEFT")]


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of every nn.Linear, the lm_head included."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def flop_share(model: torch.nn.Module, tokens: int, seq: int, r: int = H.R, proj=H.PROJ) -> tuple[float, float]:
    """(base, adapter) multiply-add FLOPs of one forward: linears + attention scores for the base; B A x per site."""
    shapes = linear_shapes(model)
    base = sum(2 * tokens * i * o for i, o in shapes.values())
    cfg = model.config
    base += cfg.num_hidden_layers * 2 * (2 * tokens * seq * cfg.hidden_size)   # Q K^T and P V, full (no causal skip)
    adapter = sum(2 * tokens * r * (i + o) for n, (i, o) in shapes.items() if n.rsplit(".", 1)[-1] in proj)
    return base, adapter


def ideal_ratio(base) -> float:
    flops_base, flops_adapter = flop_share(base, H.BATCH * H.SEQ, H.SEQ)
    print(f"adapter FLOP share: {flops_adapter / flops_base:.2%} of base ({flops_adapter / 1e9:.2f} of "
          f"{flops_base / 1e9:.2f} GFLOP) -> ideal overhead ratio {1 + flops_adapter / flops_base:.3f}")
    return 1 + flops_adapter / flops_base


def main(argv: list[str] | None = None) -> dict:
    args = H.parse(H.bench_parser(__doc__), argv)
    H.setup(args)
    base = H.build_base().to(args.device)
    ours, theirs = H.build_lora_pair(base)
    cs = [H.Contestant("base", H.own_copy(base)), H.Contestant("PEFT", theirs), H.Contestant("peftc", ours)]
    inputs = H.example_inputs(base.config.vocab_size, device=args.device)
    H.check(cs, inputs, torch.inference_mode, agree=[("peftc", "PEFT", 1e-4)], differ=[("peftc", "base", 1e-4)])

    ideal = ideal_ratio(base)
    times = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, torch.inference_mode)
    out = H.report(times, PAIRS, H.header(args, extra=f"; ideal {ideal:.3f}"))
    return dict(out, ideal=ideal)


if __name__ == "__main__":
    main()
