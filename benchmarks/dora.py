"""Benchmark: what DoRA costs over plain LoRA, in peftc and in HF PEFT, timed interleaved in one process.

    python benchmarks/dora.py [--rounds 20] [--threads N] [--warmup 3] [--modes no_grad,inference,train]

Setup as lora_overhead.py (Llama-shaped LlamaForCausalLM, random init, hidden 512, 4 layers, intermediate 1376,
vocab 1024; r=16, alpha=32 on all seven projections; batch 4 x 128, fp32). Four contestants: peftc LoRA, peftc DoRA
(`peftc.LoRA(..., use_dora=True)`), PEFT LoRA and PEFT DoRA (`LoraConfig(..., use_dora=True)`), each PEFT model on
its own deepcopy of the base model. All four carry the same A and the same random non-zero B (lora_overhead's
build_contestants, then copied into the DoRA pair); the DoRA pair also gets the same randomised magnitudes (peftc's,
copied into PEFT's `lora_magnitude_vector`). Before anything is timed the script checks that peftc DoRA and PEFT DoRA
agree on the logits (max |diff| < 1e-4), as do peftc LoRA and PEFT LoRA, and that DoRA differs from the base model;
it refuses to time otherwise.

Like for like: the HF models (PEFT's, and the base used in the check) are called with use_cache=False, since peftc's
graph is traced without a KV cache; in the training step every contestant is in train mode, is called with
labels=ids (the model's own loss) and runs backward, its gradients set to None before each step.

Modes:
  no_grad     eval forward under torch.no_grad()
  inference   eval forward under torch.inference_mode()
  train       one training step: zero grads, forward with labels, backward
Each reports, as ratios of medians, of minimums and the median per-round ratio (lora_overhead.report):
peftc DoRA / peftc LoRA (the cost of DoRA in peftc; targets: eval <= 1.05, training step <= 1.15),
PEFT DoRA / PEFT LoRA (the same in PEFT, for reference) and peftc DoRA / PEFT DoRA.
"""
from __future__ import annotations

import copy

import torch

from lora_overhead import (ALPHA, BATCH, PROJ, R, SEQ, build_base, build_contestants, example_ids,
                           report, setup)
from lora_modes import callers, parse_modes, time_calls, train_steps

import peftc

MODES = ("no_grad", "inference", "train")
TARGETS = {"no_grad": 1.05, "inference": 1.05, "train": 1.15}   # peftc DoRA / peftc LoRA
PAIRS = [("peftc DoRA", "peftc LoRA"), ("PEFT DoRA", "PEFT LoRA"), ("peftc DoRA", "PEFT DoRA")]


def build_dora(base, lora_ours, seed: int = 3):
    """peftc DoRA and PEFT DoRA over `base`, with lora_ours's A and B at every site and the same randomised
    magnitudes in both (peftc's starting norms ||W + s B A|| scaled per channel by 1 + 0.2 N(0, 1), copied to PEFT)."""
    from peft import LoraConfig, get_peft_model

    ours = peftc.compile(base, peftc.LoRA(r=R, alpha=ALPHA, targets=list(PROJ), use_dora=True)).eval()
    theirs = get_peft_model(copy.deepcopy(base),
                            LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(PROJ), use_dora=True)).eval()
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


def check_agree(contestants: dict, base, ids: torch.Tensor) -> None:
    """peftc and PEFT agree, DoRA and LoRA alike, and DoRA differs from the base and from LoRA; else no timing."""
    with torch.no_grad():
        out = {k: f().logits for k, f in callers(dict(contestants, base=base), ids).items()}
    d = lambda a, b: (out[a] - out[b]).abs().max().item()   # noqa: E731
    d_dora, d_lora = d("peftc DoRA", "PEFT DoRA"), d("peftc LoRA", "PEFT LoRA")
    d_base, d_vs_lora = d("peftc DoRA", "base"), d("peftc DoRA", "peftc LoRA")
    print(f"check: max |peftc DoRA - PEFT DoRA| = {d_dora:.2e}; max |peftc LoRA - PEFT LoRA| = {d_lora:.2e}; "
          f"max |peftc DoRA - base| = {d_base:.2e}, |peftc DoRA - peftc LoRA| = {d_vs_lora:.2e} (must differ)")
    if not d_dora < 1e-4 or not d_lora < 1e-4 or not d_base > 1e-4 or not d_vs_lora > 1e-4:
        raise SystemExit("outputs disagree; not timing")


def main(argv: list[str] | None = None) -> dict:
    args, modes = parse_modes(__doc__, argv, MODES, ",".join(MODES))
    setup(args)
    base = build_base().to(args.device)
    lora_ours, lora_theirs = build_contestants(base)
    dora_ours, dora_theirs = build_dora(base, lora_ours)
    contestants = {"peftc LoRA": lora_ours, "peftc DoRA": dora_ours, "PEFT LoRA": lora_theirs, "PEFT DoRA": dora_theirs}
    ids = example_ids(base, BATCH, SEQ, args.device)
    check_agree(contestants, base, ids)

    head = (f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {BATCH}x{SEQ}, fp32, "
            f"{args.rounds} rounds (+{args.warmup} warm-up)")
    results: dict = {}
    if "no_grad" in modes:
        t = time_calls(callers(contestants, ids), args.rounds, args.warmup, ids.device, torch.no_grad)
        results["no_grad"] = report(t, PAIRS, f"eval forward, torch.no_grad(): {head}")
    if "inference" in modes:
        t = time_calls(callers(contestants, ids), args.rounds, args.warmup, ids.device, torch.inference_mode)
        results["inference"] = report(t, PAIRS, f"eval forward, torch.inference_mode(): {head}")
    if "train" in modes:
        for m in contestants.values():
            m.train()
        t = time_calls(train_steps(contestants, ids), args.rounds, args.warmup, ids.device)
        results["train"] = report(t, PAIRS, f"training step (forward with labels + backward): {head}")
        for m in contestants.values():
            m.eval()
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
