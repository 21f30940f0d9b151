"""Benchmark: unmerged LoRA in every mode users run, peftc vs HF PEFT vs the bare model, interleaved in one process.

    python benchmarks/lora_modes.py [--rounds 20] [--threads N] [--modes no_grad,inference,train,saved,compiled]

Setup as lora_overhead.py, under the harness's rules (harness.py): no KV cache for anyone, every contestant on its own
copy of the weights, one dtype, the same inputs, outputs checked before timing. 'peftc off' is the same PeftModule
with its adapters disabled: peftc's own base graph.

Modes:
  no_grad     eval forward under torch.no_grad() (HF generate, Trainer.evaluate and most eval loops)
  inference   eval forward under torch.inference_mode()
  train       one training step in train mode: forward with labels (the model's loss) + backward, in two runs:
                adapter  the adapter's cost and the base-graph difference. Every contestant in this run gets the
                         same grad entry: the hidden state entering model.layers.0 is made a leaf that requires grad
                         (harness.GradEntry), so a contestant with nothing to train (peftc off, the bare model)
                         still backpropagates through every block, and the adapted ones do the same extra work.
                         peftc / peftc off and PEFT / base are the adapter's cost; peftc off / base is what peftc's
                         base-graph passes change, and 'peftc off -P' (compiled without base pass P) splits that
                         difference pass by pass.
                users    peftc / PEFT as users run them (no grad entry): the whole.
  saved       bytes autograd saves for backward in one training forward (distinct non-parameter storages seen by
              torch.autograd.graph.saved_tensors_hooks), for the same contestants and runs as train
  compiled    eval forward under no_grad of torch.compile(...) (inductor) of each contestant (slow to compile)
Each timed mode reports ratios of medians, of minimums and the median per-round ratio (harness.report).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import peftc  # noqa: E402
import peftc.pipeline  # noqa: E402
import harness as H  # noqa: E402
from lora_overhead import flop_share  # noqa: E402

MODES = ("no_grad", "inference", "train", "saved", "compiled")
EVAL_PAIRS = [("peftc", "base"), ("PEFT", "base"), ("peftc", "PEFT"), ("peftc", "peftc off"), ("peftc off", "base")]
# base passes left out, one contestant each ('peftc off -gated', ...): they split peftc off / base pass by pass
WITHOUT = (("gated",), ("sdpa_mask",), ("gated", "sdpa_mask"))
ADAPTER_PAIRS = [("peftc", "peftc off"), ("PEFT", "base"), ("peftc off", "base")]
ADAPTER_PAIRS += [("peftc off", f"peftc off -{' -'.join(w)}") for w in WITHOUT[:2]]
ADAPTER_PAIRS += [(f"peftc off -{' -'.join(WITHOUT[2])}", "base")]
USER_PAIRS = [("peftc", "PEFT")]


@contextlib.contextmanager
def base_passes_without(*names: str):
    """peftc.compile has no argument for the base passes; this swaps the pipeline's table (BASE_PASSES) for one
    without `names` while a model is compiled, and puts it back."""
    table = peftc.pipeline.BASE_PASSES
    unknown = set(names) - {n for n, _ in table}
    if unknown:
        raise ValueError(f"no base pass {sorted(unknown)}; the base passes are {[n for n, _ in table]}")
    peftc.pipeline.BASE_PASSES = tuple(p for p in table if p[0] not in names)
    try:
        yield
    finally:
        peftc.pipeline.BASE_PASSES = table


def base_graph_variants(base) -> list[H.Contestant]:
    """'peftc off -P ...': peftc compiled without base passes P on its own copy, adapters disabled, in train mode."""
    out = []
    for names in WITHOUT:
        with base_passes_without(*names):
            pm = peftc.compile(H.own_copy(base), peftc.LoRA(r=H.R, alpha=H.ALPHA, targets=list(H.PROJ)))
        assert not set(names) & set(pm.base_passes), pm.base_passes
        out.append(H.Contestant(f"peftc off -{' -'.join(names)}", pm.train(), contexts=(pm.disable_adapters,)))
    return out


def training_runs(base, ours, theirs, frozen_base) -> dict[str, list[H.Contestant]]:
    """{"adapter": contestants with the grad entry, "users": peftc and PEFT as users run them}."""
    hidden = base.config.hidden_size
    peftc_c, peft_c = H.Contestant("peftc", ours), H.Contestant("PEFT", theirs)
    base_c = H.Contestant("base", frozen_base)
    adapter = [peftc_c, peftc_c.variant("peftc off", ours.disable_adapters), peft_c, base_c]
    adapter += base_graph_variants(base)
    adapter = [c.variant(c.name, H.GradEntry(c.model, hidden)) for c in adapter]
    return {"adapter": adapter, "users": [peftc_c, peft_c]}


def check_training(runs: dict, inputs: dict) -> None:
    """One training step each (every grad entry must get its gradient); the adapted pair agrees, every base graph
    agrees with the bare model, and the adapter changes the output."""
    offs = [(c.name, "base", 1e-4) for c in runs["adapter"] if c.name.startswith("peftc off")]
    H.check(runs["adapter"], inputs, train=True, agree=[("peftc", "PEFT", 1e-4), *offs],
            differ=[("peftc", "peftc off", 1e-4)])
    H.check(runs["users"], inputs, train=True, agree=[("peftc", "PEFT", 1e-4)])


def main(argv: list[str] | None = None) -> dict:
    args = H.parse(H.bench_parser(__doc__, rounds=20, modes=MODES, default_modes="no_grad,inference,train,saved",
                                  note=" (compiled takes minutes on a CPU)"), argv, MODES)
    modes = args.modes
    H.setup(args)
    base = H.build_base().to(args.device)
    ours, theirs = H.build_lora_pair(base)
    frozen_base = H.own_copy(base, frozen=True)
    inputs = H.example_inputs(base.config.vocab_size, device=args.device)
    evals = [H.Contestant("base", frozen_base), H.Contestant("PEFT", theirs), H.Contestant("peftc", ours)]
    evals.append(evals[2].variant("peftc off", ours.disable_adapters))
    agree, differ = [("peftc", "PEFT", 1e-4), ("peftc off", "base", 1e-4)], [("peftc", "base", 1e-4)]
    H.check(evals, inputs, torch.no_grad, agree=agree, differ=differ)

    flops_base, flops_adapter = flop_share(base, H.BATCH * H.SEQ, H.SEQ)
    ideal = 1 + flops_adapter / flops_base
    head = H.header(args, extra=f"; ideal eval ratio {ideal:.3f}")
    results: dict = {"ideal": ideal}
    for mode, ctx in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        if mode in modes:
            H.check(evals, inputs, ctx)
            t = H.time_contestants(evals, inputs, args.rounds, args.warmup, args.device, ctx)
            results[mode] = H.report(t, EVAL_PAIRS, f"eval forward, torch.{mode}(): {head}")
    if "train" in modes or "saved" in modes:
        for m in (ours, theirs, frozen_base):
            m.train()
        runs = training_runs(base, ours, theirs, frozen_base)
        labelled = dict(inputs, labels=inputs["input_ids"])              # the same tensors, the ids as labels
        check_training(runs, labelled)
        if "train" in modes:
            t = H.time_contestants(runs["adapter"], labelled, args.rounds, args.warmup, args.device, train=True)
            results["train_adapter"] = H.report(t, ADAPTER_PAIRS, "training step, every contestant with the grad "
                                                f"entry at {H.FIRST_BLOCK}: {head}")
            t = H.time_contestants(runs["users"], labelled, args.rounds, args.warmup, args.device, train=True)
            results["train"] = H.report(t, USER_PAIRS, f"training step, as users run them: {head}")
        if "saved" in modes:
            results["saved_adapter"] = H.saved(runs["adapter"], labelled, ADAPTER_PAIRS,
                                             f"every contestant with the grad entry at {H.FIRST_BLOCK}")
            results["saved"] = H.saved(runs["users"], labelled, USER_PAIRS, "as users run them")
        for m in (ours, theirs, frozen_base):
            m.eval()
    if "compiled" in modes:
        comp = {c.name: torch.compile(c.model) for c in evals[:3]}
        compiled = [H.Contestant(n, m) for n, m in comp.items()]
        compiled.append(compiled[2].variant("peftc off", ours.disable_adapters))   # its base form compiles once
        t0 = time.perf_counter()
        H.check(compiled, inputs, torch.no_grad, agree=[(x, y, 1e-3) for x, y, _ in agree], differ=differ)
        print(f"compiled (first calls) in {time.perf_counter() - t0:.1f} s")
        t = H.time_contestants(compiled, inputs, args.rounds, args.warmup, args.device, torch.no_grad)
        results["compiled"] = H.report(t, EVAL_PAIRS,
                                       f"torch.compile (inductor), eval forward, torch.no_grad(): {head}")
    print("\n'peftc off': peftc with disable_adapters(), its own base graph (what the adapter's cost is measured on)")
    return results


if __name__ == "__main__":
    main()
