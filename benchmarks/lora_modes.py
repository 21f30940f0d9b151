"""Benchmark: unmerged LoRA in every mode users run, peftc vs HF PEFT vs the bare model, interleaved in one process.

    python benchmarks/lora_modes.py [--rounds 20] [--threads N] [--modes no_grad,inference,train,saved,compiled]

Setup as lora_overhead.py (Llama-shaped, hidden 512, 4 layers, LoRA r=16 on all seven projections, batch 4 x 128,
fp32), with every contestant doing the same work: the base model and PEFT are called with use_cache=False, so no one
builds a KV cache that the others do not (peftc's graph is traced without one).

Modes:
  no_grad     eval forward under torch.no_grad() (HF generate, Trainer.evaluate and most eval loops)
  inference   eval forward under torch.inference_mode()
  train       one training step in train mode: forward with labels (the model's loss) + backward (peftc, PEFT)
  saved       bytes autograd saves for backward in one training forward: distinct non-parameter storages seen by
              torch.autograd.graph.saved_tensors_hooks (peftc, PEFT)
  compiled    eval forward under no_grad of torch.compile(...) (inductor) of each contestant (slow to compile)
Each timed mode reports ratios of medians, of minimums and the median per-round ratio (see lora_overhead.report).
"""
from __future__ import annotations

import contextlib
import time

import torch

from lora_overhead import (BATCH, SEQ, bench_parser, build_base, build_contestants, example_ids, flop_share, report,
                           setup, _sync)

MODES = ("no_grad", "inference", "train", "saved", "compiled")


def callers(contestants: dict, ids: torch.Tensor, labels: bool = False) -> dict:
    """name -> zero-argument call; the HF models without a KV cache, as peftc's graph. "peftc off" is peftc with
    its adapters disabled: its own base graph, the floor its adapted call is measured against."""
    kw = {"labels": ids} if labels else {}
    out = {}
    for name, model in contestants.items():
        if name == "peftc off":
            def off(m=model):
                with m.disable_adapters():
                    return m(input_ids=ids, **kw)
            out[name] = off
            continue
        extra = {} if name.startswith("peftc") else {"use_cache": False}
        out[name] = (lambda m=model, e=extra: m(input_ids=ids, **e, **kw))
    return out


def time_calls(calls: dict, rounds: int, warmup: int, device, ctx=contextlib.nullcontext) -> dict[str, list[float]]:
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    with ctx():
        for _ in range(warmup):
            for n in names:
                calls[n]()
        for i in range(rounds):
            for n in names[i % len(names):] + names[:i % len(names)]:   # rotate the order each round
                _sync(device)
                t0 = time.perf_counter()
                calls[n]()
                _sync(device)
                times[n].append(time.perf_counter() - t0)
    return times


def train_steps(contestants: dict, ids: torch.Tensor) -> dict:
    """name -> one training step (zero grads, forward with labels, backward) of the adapters."""
    calls = callers(contestants, ids, labels=True)

    def step(model, call):
        def run():
            model.zero_grad(set_to_none=True)
            call().loss.backward()
        return run
    return {n: step(contestants[n], calls[n]) for n in calls}


def saved_bytes(model: torch.nn.Module, call) -> tuple[int, int]:
    """(bytes, count) of the distinct non-parameter storages autograd saves during one forward of `call`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    return sum(seen.values()), len(seen)


def parse_modes(doc: str, argv, known: tuple[str, ...], default: str, note: str = ""):
    """(args, modes): bench_parser's flags plus --modes, a comma-separated subset of `known`."""
    ap = bench_parser(doc, rounds=20)
    ap.add_argument("--modes", default=default, help=f"comma-separated, of {', '.join(known)}{note}")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(known))
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {', '.join(known)}")
    return args, modes


def main(argv: list[str] | None = None) -> dict:
    args, modes = parse_modes(__doc__, argv, MODES, "no_grad,inference,train,saved",
                              " (compiled takes minutes on a CPU)")
    setup(args)
    base = build_base().to(args.device)
    ours, theirs = build_contestants(base)
    contestants = {"base": base, "PEFT": theirs, "peftc": ours}
    ids = example_ids(base, BATCH, SEQ, args.device)
    with torch.no_grad():
        out = {k: f().logits for k, f in callers(contestants, ids).items()}
    d_peft, d_base = (out["peftc"] - out["PEFT"]).abs().max().item(), (out["peftc"] - out["base"]).abs().max().item()
    print(f"check: max |peftc - PEFT| = {d_peft:.2e}; max |peftc - base| = {d_base:.2e} (B != 0, must differ)")
    if not d_peft < 1e-4 or not d_base > 1e-4:
        raise SystemExit("outputs disagree; not timing")
    flops_base, flops_adapter = flop_share(base, BATCH * SEQ, SEQ)
    ideal = 1 + flops_adapter / flops_base
    head = (f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {BATCH}x{SEQ}, fp32, "
            f"{args.rounds} rounds (+{args.warmup} warm-up); ideal eval ratio {ideal:.3f}")
    results: dict = {"ideal": ideal}
    pairs = [("peftc", "base"), ("PEFT", "base"), ("peftc", "PEFT"), ("peftc", "peftc off"), ("peftc off", "base")]
    evals = dict(contestants, **{"peftc off": ours})
    if "no_grad" in modes:
        t = time_calls(callers(evals, ids), args.rounds, args.warmup, ids.device, torch.no_grad)
        results["no_grad"] = report(t, pairs, f"eval forward, torch.no_grad(): {head}")
    if "inference" in modes:
        t = time_calls(callers(evals, ids), args.rounds, args.warmup, ids.device, torch.inference_mode)
        results["inference"] = report(t, pairs, f"eval forward, torch.inference_mode(): {head}")
    trainees = {"PEFT": theirs, "peftc": ours}
    if "train" in modes or "saved" in modes:
        theirs.train()
        ours.train()
    if "train" in modes:
        t = time_calls(train_steps(trainees, ids), args.rounds, args.warmup, ids.device)
        results["train"] = report(t, [("peftc", "PEFT")], f"training step (forward + backward): {head}")
    if "saved" in modes:
        calls = callers(trainees, ids, labels=True)
        got = {k: saved_bytes(trainees[k], calls[k]) for k in calls}
        print("\nactivations saved for backward (one training forward, distinct non-parameter storages)")
        for k, (b, n) in got.items():
            print(f"  {k:6s} {b / 2**20:9.2f} MiB in {n} storages")
        ratio = got["peftc"][0] / got["PEFT"][0]
        print(f"  peftc / PEFT: {ratio:.3f}")
        results["saved"] = {"bytes": {k: v[0] for k, v in got.items()}, "ratio": ratio}
    theirs.eval()
    ours.eval()
    if "compiled" in modes:
        compiled = {k: torch.compile(m) for k, m in contestants.items()}
        compiled["peftc off"] = compiled["peftc"]      # the same compiled module; its base form compiles once
        calls = callers(compiled, ids)
        with torch.no_grad():
            for k, f in calls.items():
                t0 = time.perf_counter()
                f()
                print(f"compiled {k} in {time.perf_counter() - t0:.1f} s")
        t = time_calls(calls, args.rounds, args.warmup, ids.device, torch.no_grad)
        results["compiled"] = report(t, pairs, f"torch.compile (inductor), eval forward, torch.no_grad(): {head}")
    print("\n'peftc off': peftc with disable_adapters(), its own base graph (what the adapter's cost is measured on)")
    return results


if __name__ == "__main__":
    main()
