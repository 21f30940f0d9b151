"""Benchmark: what calling the model's blocks as modules (peftc.blocks) costs against the flat graph, interleaved.

    python benchmarks/blocks.py [--rounds 20] [--threads N] [--warmup 3]

Setup as lora_overhead.py (Llama-shaped, hidden 512, 4 layers; LoRA r=16, alpha=32 on all seven projections;
batch 4 x 128, fp32). Two contestants run the same adapted graph on the same weights (the same module in two modes):
"blocks" is the PeftModule's call (its generated top-level code calls model.layers.0 ... as peftc.Block modules) and
"flat" calls the same form's flat GraphModule directly with the same route. Their outputs are checked equal before
timing (harness.check). Modes: no_grad and inference (eval forward) and train (train mode, forward + backward of the
logits' mean). The target is a ratio of 1.00 (the structure must cost nothing measurable).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import peftc  # noqa: E402
import harness as H  # noqa: E402


def flat(pm, **inputs):
    """The same form's flat GraphModule called directly, with the route the PeftModule would pass."""
    route = pm._route_of(pm.graph_module, pm.active_adapter)
    return pm.graph_module(**pm._complete(dict(inputs)), peftc_route=route)


def main(argv=None) -> dict:
    args = H.parse(H.bench_parser(__doc__, rounds=20), argv)
    H.setup(args)
    base = H.build_base().to(args.device)
    pm = peftc.compile(H.own_copy(base), peftc.LoRA(r=H.R, alpha=H.ALPHA, targets=list(H.PROJ), init=False)).eval()
    assert len(pm.blocks()) == base.config.num_hidden_layers
    ids = H.example_inputs(base.config.vocab_size, device=args.device)["input_ids"]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cs = [H.Contestant("blocks", pm), H.Contestant("flat", pm, call=flat)]
    out = {}
    for mode, ctx in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        H.check(cs, inputs, ctx, agree=[("blocks", "flat", 0.0)])
        t = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, ctx)
        out[mode] = H.report(t, [("blocks", "flat")], f"eval forward, {mode}: {H.header(args)}")
    pm.train()
    H.check(cs, inputs, train=True, agree=[("blocks", "flat", 0.0)])
    t = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, train=True)
    out["train"] = H.report(t, [("blocks", "flat")], f"training step (forward + backward): {H.header(args)}")
    return out


if __name__ == "__main__":
    main()
