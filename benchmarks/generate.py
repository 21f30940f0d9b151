"""Benchmark: greedy text generation with a KV cache, peftc's generate vs HF PEFT's, interleaved in one process.

    python benchmarks/generate.py [--rounds 10] [--threads 2] [--warmup 3] [--no-compiled] [--profile] [--size tiny]

Setup: a Llama-shaped LlamaForCausalLM from a config with random weights (hidden 256, 4 layers, 8 heads, 8 kv heads,
intermediate 688, vocab 1024), LoRA r=16, alpha=32 on q_proj and v_proj (peftc init="gaussian", then a random
non-zero B: harness.randomize_b_), fp32, 2 threads. Greedy decoding of exactly 48 new tokens (max_new_tokens =
min_new_tokens = 48: the model's EOS is masked until then, so every contestant generates 48) for a batch of 4 prompts
of 16 tokens; the mixed-adapter contestants take a batch of 8 prompts, one adapter per row (8 adapters a0..a7).

PEFT loads peftc's saved adapters (pm.save_adapter; PeftModel.from_pretrained + load_adapter), so both libraries
compute with the same tensors. Every contestant model owns its weights (harness.own_copy; checked by
harness.check_storage), and every call runs under torch.inference_mode() (transformers' generate enters no_grad inside
it, peftc's loop inference_mode: one grad mode for all).

Contestants:
  base            the base HF model's own generate (DynamicCache, transformers' default), for reference
  PEFT            PeftModel.generate on one adapter: the reference
  peftc           pm.generate (eager: the prefill and decode graphs over peftc's static KV cache)
  peftc merged    copy.deepcopy(pm).merge().generate (the adapter folded into the weights)
  peftc compiled  peftc.CompiledPeftModule(pm).generate (the same pm: its prefill and decode graphs under
                  torch.compile, inductor); compiled by its first call, before timing; --no-compiled leaves it out
  PEFT 8          PEFT's generate(adapter_names=[a0..a7]) on the 8-row batch (its own PeftModel with 8 adapters)
  peftc 8         pm8.generate(adapter_names=[a0..a7]) on the same batch (its own PeftModule with 8 adapters)

The harness's no-KV-cache rule is for forward benchmarks: here every contestant generates with its cache as a user
gets it (transformers' DynamicCache for base and PEFT, peftc's static cache). Checked before anything is timed: every
contestant returns [B, 16 + 48] tokens, each equal to PEFT's (PEFT 8's for peftc 8), token for token; each row of
peftc 8 equals that row generated alone on its adapter (by PEFT, so that peftc traces no graph the timing does not
use); the adapter changes the tokens (PEFT's differ from the base's, and the 8-row batch on a0 alone differs from the
mixed one).

Report (harness.report: ratios of medians, of minimums and the median per-round ratio of the whole generate call;
every round runs each contestant once, in rotated order, after a warm-up), the per-token latency (the median call
over 48: ms per decoding step, which makes one token per row), and verdicts for peftc / PEFT, peftc merged / PEFT,
peftc compiled / PEFT and peftc 8 / PEFT 8: requirement <= 0.90, goal <= 0.50 (medians).

--profile: torch.profiler over one generate call of peftc and of PEFT, 48 tokens and 1 token (the prefill alone);
their difference over 47 is one decode step, split into the self time of aten ops and the rest (Python, dispatch,
the profiler's own cost per op), with the op count per step and the top ops.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import harness as H  # noqa: E402

PROJ = ("q_proj", "v_proj")
R, ALPHA = 16, 32
N_ADAPTERS = 8
REQUIRED, GOAL = 0.90, 0.50
SIZES = {   # model, batch, prompt length, new tokens
    "reference": (dict(hidden=256, layers=4, heads=8, intermediate=688), 4, 16, 48),
    "tiny": (dict(hidden=64, layers=1, heads=4, intermediate=128), 4, 8, 8),
}
TARGETED = (("peftc", "PEFT"), ("peftc merged", "PEFT"), ("peftc compiled", "PEFT"), ("peftc 8", "PEFT 8"))
REFERENCE = (("PEFT", "base"), ("peftc", "base"), ("peftc merged", "base"), ("peftc compiled", "peftc"),
             ("peftc merged", "peftc"))


def build_peftc(base, n_adapters: int, seed: int = 1):
    """A PeftModule on its own copy of `base` with adapters a0..a{n-1} (a0 active), each with a random non-zero B."""
    import peftc

    spec = peftc.LoRA(r=R, alpha=ALPHA, targets=list(PROJ), init="gaussian")
    pm = peftc.compile(H.own_copy(base), spec, adapter_name="a0").eval()
    for i in range(1, n_adapters):
        pm.add_adapter(f"a{i}", spec)
    for i, name in enumerate(pm.adapters):
        H.randomize_b_(pm, seed + i, adapter=name)
    return pm


def load_peft(base, pm):
    """PEFT on its own copy of `base`, loading every adapter of `pm` from pm.save_adapter's files (a0 active)."""
    from peft import PeftModel

    names = list(pm.adapters)
    with tempfile.TemporaryDirectory(prefix="generate-bench-") as d:
        pm.save_adapter(d)
        theirs = PeftModel.from_pretrained(H.own_copy(base), os.path.join(d, names[0]), adapter_name=names[0])
        for n in names[1:]:
            theirs.load_adapter(os.path.join(d, n), adapter_name=n)
    theirs.set_adapter(names[0])
    return theirs.eval()


def gen_kwargs(new: int, pad: int | None) -> dict:
    """Greedy, exactly `new` tokens: EOS is masked (min_new_tokens) until the last one."""
    return dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)


def prompts(vocab: int, batch: int, seq: int) -> dict:
    ids = H.example_inputs(vocab, batch, seq)["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def caller(model, inputs: dict, kw: dict, **extra):
    """A zero-argument call: model.generate(**inputs, **kw, **extra)."""
    return lambda: model.generate(**inputs, **kw, **extra)


def check_tokens(got: dict[str, torch.Tensor], ref: dict[str, str], shape: dict[str, tuple]) -> None:
    """SystemExit unless each contestant's tokens have its shape and equal its reference's, naming the first
    differing row and position."""
    bad = []
    for name, out in got.items():
        if tuple(out.shape) != shape[name]:
            bad.append(f"{name!r} returned tokens of shape {tuple(out.shape)}, expected {shape[name]} (every "
                       "contestant must generate exactly the new-token count)")
        elif name in ref and not torch.equal(out, got[ref[name]]):
            row, pos = (out != got[ref[name]]).nonzero()[0].tolist()
            bad.append(f"{name!r} and {ref[name]!r} generate different tokens: first at row {row}, position {pos} "
                       f"({int(out[row, pos])} vs {int(got[ref[name]][row, pos])})")
    if bad:
        raise SystemExit("tokens checked before timing: " + "; ".join(bad) + "; not timing")
    print("check: " + ", ".join(f"{n} == {r}" for n, r in ref.items()) + " (every token)")


def check_mixed(theirs8, inputs: dict, kw: dict, mixed: list[str], got: torch.Tensor) -> None:
    """SystemExit unless each row of the mixed batch (peftc 8's tokens, equal to PEFT 8's) equals that row generated
    alone by PEFT on its adapter, and the batch on a0 alone differs from the mixed one (the adapters differ). PEFT
    is the reference here, so that peftc traces no more graphs than the timed calls use."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.inference_mode():
        for i, n in enumerate(mixed):
            theirs8.set_adapter(n)
            alone = theirs8.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)
            if not torch.equal(alone[0], got[i]):
                raise SystemExit(f"row {i} of 'peftc 8' differs from that row generated alone on adapter {n!r} "
                                 "(PEFT); not timing")
        theirs8.set_adapter(mixed[0])
        one = theirs8.generate(**inputs, **kw)
    if torch.equal(one, got):
        raise SystemExit(f"the {len(mixed)}-row batch on {mixed[0]} alone generates the mixed batch's tokens: the "
                         "adapters change nothing; not timing")
    print(f"check: each row of 'peftc 8' equals that row alone on its adapter (PEFT); on {mixed[0]} alone "
          f"{int((one != got).any(1).sum())} of {len(mixed)} rows differ")


def verdicts(results: dict) -> dict[str, str]:
    """peftc / PEFT (whole generate call, medians) against the requirement <= 0.90 and the goal <= 0.50."""
    out = {}
    for a, b in TARGETED:
        key = f"{a} / {b}"
        r = results["ratios"].get(key)
        if r is not None:
            out[key] = (f"{r:.3f}: requirement <= {REQUIRED:.2f} {'met' if r <= REQUIRED else 'NOT MET'}, "
                        f"goal <= {GOAL:.2f} {'met' if r <= GOAL else 'not met'}")
    return out


# --- the profile of one decode step -----------------------------------------------------------------------------------
def profile_call(fn) -> dict:
    """Wall ms, aten ops' self CPU ms and op count of one call of `fn` under torch.profiler, and its aten ops' self
    time by op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    ops: dict[str, list[float]] = {}
    for e in prof.events():
        if e.name.startswith("aten::"):
            ops.setdefault(e.name, []).append(e.self_cpu_time_total / 1e3)
    return {"wall_ms": 1e3 * wall, "aten_ms": sum(sum(v) for v in ops.values()),
            "aten_calls": sum(len(v) for v in ops.values()), "ops": {k: (sum(v), len(v)) for k, v in ops.items()}}


def profile_decode_step(calls: dict, new: int, repeats: int = 3) -> dict:
    """name -> one decode step (profile of `new` tokens minus the profile of 1 token, over new - 1; the median of
    `repeats` pairs): wall ms, aten self ms, the rest, aten calls per step and the top ops by self time."""
    out = {}
    for name, (full, first) in calls.items():
        runs = []
        for _ in range(repeats):
            with torch.inference_mode():
                runs.append((profile_call(full), profile_call(first)))
        per = lambda f: statistics.median(f(a) - f(b) for a, b in runs) / (new - 1)   # noqa: E731
        op = lambda k, i: per(lambda r: r["ops"].get(k, (0.0, 0))[i])                 # noqa: E731
        top = sorted(((k, op(k, 0), op(k, 1)) for k in {k for a, _ in runs for k in a["ops"]}), key=lambda x: -x[1])
        wall, aten = per(lambda r: r["wall_ms"]), per(lambda r: r["aten_ms"])
        out[name] = {"wall_ms": wall, "aten_ms": aten, "other_ms": wall - aten,
                     "aten_calls": per(lambda r: r["aten_calls"]), "top": top[:8]}
    print(f"\none decode step under torch.profiler (a {new}-token call minus a 1-token call, over {new - 1}; median "
          f"of {repeats}; the profiler adds its own cost per op to 'rest')")
    for name, p in out.items():
        print(f"  {name:8s} {p['wall_ms']:7.2f} ms: aten ops (self) {p['aten_ms']:6.2f} ms, rest (Python, dispatch, "
              f"profiler) {p['other_ms']:6.2f} ms; {p['aten_calls']:.0f} aten calls")
        top = ", ".join(f"{k.removeprefix('aten::')} {ms:.2f} ms x{n:.0f}" for k, ms, n in p["top"])
        print(f"           top: {top}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = H.bench_parser(__doc__, rounds=10)
    ap.set_defaults(threads=2)
    ap.add_argument("--no-compiled", action="store_true", help="leave out 'peftc compiled' (no torch.compile)")
    ap.add_argument("--profile", action="store_true", help="profile one decode step of peftc and PEFT after timing")
    ap.add_argument("--size", default="reference", choices=tuple(SIZES),
                    help="tiny: hidden 64, 1 layer, 8 + 8 tokens (a smoke test; its figures mean nothing)")
    args = H.parse(ap, argv)
    if args.device != "cpu":
        raise SystemExit("generate.py runs on the CPU (its figures are the CPU's; the GPU is not part of its setup)")
    H.setup(args)
    import peftc

    dims, batch, seq, new = SIZES[args.size]
    base = H.build_base(**dims)
    pad = base.generation_config.eos_token_id
    kw = gen_kwargs(new, pad)
    pm, pm8 = build_peftc(base, 1), build_peftc(base, N_ADAPTERS)
    theirs, theirs8 = load_peft(base, pm), load_peft(base, pm8)
    merged = copy.deepcopy(pm).merge().eval()
    compiled = None if args.no_compiled else peftc.CompiledPeftModule(pm, backend="inductor")
    own_base = H.own_copy(base)
    mixed = list(pm8.adapters)
    inputs, inputs8 = prompts(base.config.vocab_size, batch, seq), prompts(base.config.vocab_size, N_ADAPTERS, seq)

    models = {"base": own_base, "PEFT": theirs, "peftc": pm, "peftc merged": merged, "peftc compiled": compiled,
              "PEFT 8": theirs8, "peftc 8": pm8}
    calls = {"base": caller(own_base, inputs, kw), "PEFT": caller(theirs, inputs, kw), "peftc": caller(pm, inputs, kw),
             "peftc merged": caller(merged, inputs, kw), "peftc compiled": caller(compiled, inputs, kw),
             "PEFT 8": caller(theirs8, inputs8, kw, adapter_names=mixed),
             "peftc 8": caller(pm8, inputs8, kw, adapter_names=mixed)}
    if compiled is None:
        del models["peftc compiled"], calls["peftc compiled"]
    contestants = [H.Contestant(n, m) for n, m in models.items()]
    H.check_storage(contestants)
    H.check_dtype(contestants)

    first, got = {}, {}
    with torch.inference_mode():
        for name, call in calls.items():        # the first call traces (peftc) or compiles (peftc compiled)
            t0 = time.perf_counter()
            got[name] = call()
            first[name] = time.perf_counter() - t0
    print("first calls (tracing, compiling): " + ", ".join(f"{n} {s:.2f} s" for n, s in first.items()))
    ref = {n: ("PEFT 8" if n.endswith(" 8") else "PEFT") for n in calls if n not in ("PEFT", "PEFT 8", "base")}
    shape = {n: ((N_ADAPTERS if n.endswith(" 8") else batch), seq + new) for n in calls}
    check_tokens(got, ref, shape)
    if torch.equal(got["PEFT"], got["base"]):
        raise SystemExit("PEFT generates the base model's tokens: the adapter changes nothing; not timing")
    print(f"check: PEFT and base differ in {int((got['PEFT'] != got['base']).any(1).sum())} of {batch} rows")
    check_mixed(theirs8, inputs8, kw, mixed, got["peftc 8"])

    times = H.time_calls(calls, args.rounds, args.warmup, args.device, torch.inference_mode)
    head = H.header(args, batch, seq, extra=f"; greedy, {new} new tokens (mixed: batch {N_ADAPTERS}x{seq}, "
                                            f"{N_ADAPTERS} adapters, one per row); LoRA r={R} alpha={ALPHA} on "
                                            f"{', '.join(PROJ)}; torch.inference_mode()")
    pairs = [p for p in TARGETED + REFERENCE if p[0] in calls and p[1] in calls]
    res = H.report(times, pairs, f"generate, the whole call: {head}")
    res["ms_per_token"] = {n: 1e3 * m / new for n, m in res["medians_s"].items()}
    print(f"\nper-token latency (median call / {new}: one decoding step, one token per row)")
    for n, ms in res["ms_per_token"].items():
        print(f"  {n:15s} {ms:7.2f} ms per new token (batch {shape[n][0]})")
    res.update(header=head, first_call_s=first, new_tokens=new, batch=batch, prompt=seq,
               batches={n: s[0] for n, s in shape.items()})
    res["verdicts"] = verdicts(res)
    print()
    for k, v in res["verdicts"].items():
        print(f"{k}: {v}")
    if args.profile:
        one = gen_kwargs(1, pad)
        res["profile"] = profile_decode_step({"peftc": (calls["peftc"], caller(pm, inputs, one)),
                                              "PEFT": (calls["PEFT"], caller(theirs, inputs, one))}, new)
    return res


if __name__ == "__main__":
    main()
