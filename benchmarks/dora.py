"""Benchmark: what DoRA costs over plain LoRA, in peftc and in HF PEFT, timed interleaved in one process.

    python benchmarks/dora.py [--rounds 20] [--threads N] [--warmup 3] [--modes no_grad,inference,train]

Setup as lora_overhead.py (Llama-shaped LlamaForCausalLM, random init, hidden 512, 4 layers, intermediate 1376,
vocab 1024; r=16, alpha=32 on all seven projections; batch 4 x 128, fp32). Four contestants: peftc LoRA, peftc DoRA
(`peftc.LoRA(..., use_dora=True)`), PEFT LoRA and PEFT DoRA (`LoraConfig(..., use_dora=True)`), each on its own
copy of the base model (harness rules). All four carry the same A and the same random non-zero B
(harness.build_lora_pair, then copied into the DoRA pair); the DoRA pair also gets the same randomised magnitudes
(peftc's, copied into PEFT's `lora_magnitude_vector`). Before anything is timed the script checks that peftc DoRA and
PEFT DoRA agree on the logits (max |diff| < 1e-4), as do peftc LoRA and PEFT LoRA, and that DoRA differs from the base
model; it refuses to time otherwise.

Like for like (harness.py): no contestant builds a KV cache (every HF model is called with use_cache=False); in the
training step every contestant is in train mode, is called with labels=ids (the model's own loss) and runs backward, its gradients set to None before each step.

Modes:
  no_grad     eval forward under torch.no_grad()
  inference   eval forward under torch.inference_mode()
  train       one training step: zero grads, forward with labels, backward
Each reports, as ratios of medians, of minimums and the median per-round ratio (harness.report):
peftc DoRA / peftc LoRA (the cost of DoRA in peftc; targets: eval <= 1.05, training step <= 1.15),
PEFT DoRA / PEFT LoRA (the same in PEFT, for reference) and peftc DoRA / PEFT DoRA.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import peftc  # noqa: E402
import harness as H  # noqa: E402

MODES = ("no_grad", "inference", "train")
TARGETS = {"no_grad": 1.05, "inference": 1.05, "train": 1.15}   # peftc DoRA / peftc LoRA
PAIRS = [("peftc DoRA", "peftc LoRA"), ("PEFT DoRA", "PEFT LoRA"), ("peftc DoRA", "PEFT DoRA")]


def build_dora(base, lora_ours, seed: int = 3):
    """peftc DoRA and PEFT DoRA, each on its own copy of `base`, with lora_ours's A and B at every site and the same
    randomised magnitudes in both (peftc's starting norms ||W + s B A|| scaled per channel by 1 + 0.2 N(0, 1))."""
    from peft import LoraConfig, get_peft_model

    ours = peftc.compile(H.own_copy(base), peftc.LoRA(r=H.R, alpha=H.ALPHA, targets=list(H.PROJ), use_dora=True)).eval()
    theirs = get_peft_model(H.own_copy(base),
                            LoraConfig(r=H.R, lora_alpha=H.ALPHA, target_modules=list(H.PROJ), use_dora=True)).eval()
    g = torch.Generator().manual_seed(seed)
    src = lora_ours.store[lora_ours.active_adapter]
    dst = ours.store[ours.active_adapter]
    assert set(src.targets) == set(dst.targets)
    with torch.no_grad():
        for path in dst.targets:
            key = path.replace(".", "-")
            w = dst.sites[key]
            w.A.copy_(src.sites[key].A)
            w.B.copy_(src.sites[key].B)
            w.magnitude.mul_(1 + 0.2 * torch.randn(w.magnitude.shape, generator=g).to(w.magnitude.device))
            layer = theirs.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(w.A)
            layer.lora_B["default"].weight.copy_(w.B)
            layer.lora_magnitude_vector["default"].weight.copy_(w.magnitude)
    return ours, theirs


def main(argv: list[str] | None = None) -> dict:
    args = H.parse(H.bench_parser(__doc__, rounds=20, modes=MODES), argv, MODES)
    H.setup(args)
    base = H.build_base().to(args.device)
    lora_ours, lora_theirs = H.build_lora_pair(base)
    dora_ours, dora_theirs = build_dora(base, lora_ours)
    cs = [H.Contestant("peftc LoRA", lora_ours), H.Contestant("peftc DoRA", dora_ours),
          H.Contestant("PEFT LoRA", lora_theirs), H.Contestant("PEFT DoRA", dora_theirs)]
    inputs = H.example_inputs(base.config.vocab_size, device=args.device)
    H.check([*cs, H.Contestant("base", H.own_copy(base))], inputs, torch.no_grad,
            agree=[("peftc DoRA", "PEFT DoRA", 1e-4), ("peftc LoRA", "PEFT LoRA", 1e-4)],
            differ=[("peftc DoRA", "base", 1e-4), ("peftc DoRA", "peftc LoRA", 1e-4)])

    head = H.header(args)
    results: dict = {}
    for mode, ctx in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        if mode in args.modes:
            H.check(cs, inputs, ctx)
            t = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, ctx)
            results[mode] = H.report(t, PAIRS, f"eval forward, torch.{mode}(): {head}")
    if "train" in args.modes:
        for c in cs:
            c.model.train()
        labelled = dict(inputs, labels=inputs["input_ids"])              # the same tensors, the ids as labels
        H.check(cs, labelled, train=True, agree=[("peftc DoRA", "PEFT DoRA", 1e-4)])
        t = H.time_contestants(cs, labelled, args.rounds, args.warmup, args.device, train=True)
        results["train"] = H.report(t, PAIRS, f"training step (forward with labels + backward): {head}")
        for c in cs:
            c.model.eval()
    print()
    key = " / ".join(PAIRS[0])
    for mode, res in results.items():
        got = res["ratios"][key]
        print(f"{mode:9s} {key}: {got:.3f} by medians, {res['min_ratios'][key]:.3f} by minimums, "
              f"{res['paired_ratios'][key]:.3f} per round; target <= {TARGETS[mode]:.2f}: "
              f"{'met' if got <= TARGETS[mode] else 'NOT met'} (by medians)")
    return results


if __name__ == "__main__":
    main()
