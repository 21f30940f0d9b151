"""Benchmark: what calling the model's blocks as modules (peftc.blocks) costs against the flat graph, interleaved.

    python benchmarks/blocks.py [--rounds 20] [--threads N] [--warmup 3]

Setup as lora_overhead.py (Llama-shaped, hidden 512, 4 layers; LoRA r=16, alpha=32 on all seven projections;
batch 4 x 128, fp32). Two contestants run the same adapted graph on the same weights: "blocks" is the PeftModule's
call (its generated top-level code calls model.layers.0 ... as peftc.Block modules) and "flat" calls the same
form's flat GraphModule directly with the same route. Their outputs are checked equal before timing. Modes:
no_grad and inference (eval forward) and train (train mode, forward + backward of the logits' mean).
The target is a ratio of 1.00 (the structure must cost nothing measurable).
"""
from __future__ import annotations

import contextlib

import torch

from lora_overhead import ALPHA, BATCH, PROJ, R, SEQ, bench_parser, build_base, example_ids, report, setup
from lora_modes import time_calls

import peftc


def contestants(pm, ids):
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}

    def blocks():
        return pm(**inputs).logits

    def flat():
        route = pm._route_of(pm.graph_module, pm.active_adapter)
        return pm.graph_module(**pm._complete(dict(inputs)), peftc_route=route).logits

    return {"blocks": blocks, "flat": flat}


def main(argv=None) -> dict:
    args = bench_parser(__doc__, rounds=20).parse_args(argv)
    setup(args)
    base = build_base()
    pm = peftc.compile(base, peftc.LoRA(r=R, alpha=ALPHA, targets=list(PROJ), init=False))
    ids = example_ids(base, BATCH, SEQ, torch.device("cpu"))
    calls = contestants(pm.eval(), ids)
    with torch.no_grad():
        a, b = calls["blocks"](), calls["flat"]()
    assert torch.equal(a, b), f"blocks and flat differ by {(a - b).abs().max()}"
    assert len(pm.blocks()) == base.config.num_hidden_layers
    out = {}
    for mode, ctx in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        t = time_calls(calls, args.rounds, args.warmup, torch.device("cpu"), ctx)
        out[mode] = report(t, [("blocks", "flat")], f"eval forward, {mode}")
    pm.train()
    train = {n: (lambda f=f: f().float().mean().backward()) for n, f in contestants(pm, ids).items()}
    t = time_calls(train, args.rounds, args.warmup, torch.device("cpu"), contextlib.nullcontext)
    out["train"] = report(t, [("blocks", "flat")], "training step (forward + backward)")
    return out


if __name__ == "__main__":
    main()
