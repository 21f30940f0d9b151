"""Benchmark: a batch whose rows use 8 different LoRA adapters vs the same batch on one adapter, peftc vs HF PEFT.

    python benchmarks/mixed_batch.py [--rounds 30] [--threads N] [--warmup 3] [--device cpu] [--capacity N]

Setup: a Llama-shaped LlamaForCausalLM (random init; hidden 256, 4 layers, 4 heads, intermediate 688, vocab 1024),
8 LoRA adapters (r=16, alpha=32 on q, k, v, o; each with its own A and random non-zero B), batch 8 x 128 tokens, fp32,
eval mode under torch.inference_mode(). PEFT (get_peft_model + add_adapter x 7) and peftc each run on their own
copy of the base model, as does the base contestant (harness rules: no KV cache, own weights, same inputs), and get
the same weights, adapter by adapter.

Contestants: the base model; each library with every row on one adapter (the active adapter, the ordinary call) and
with adapter_names naming 8 different adapters, one per row; and peftc with adapter_names naming one adapter 8 times
(the per-row path with nothing to mix). Before timing, the script checks that peftc and PEFT agree on both calls, that
each row of the mixed batch equals that row run on its adapter alone, and that the adapters differ from the base.

The report is ratios of medians (interleaved rounds, rotated order, after a warm-up); the key figure is mixed / single
per library. Goal for peftc: <= 1.05 (required: <= 1.15). With --capacity N, a copy of the peftc model with a
declared capacity of N adapters (pm.reserve(N, 16): every one of the N slots is in the graph) runs both calls too,
to show what the room costs.
"""
from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import peftc  # noqa: E402
import harness as H  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
R, ALPHA = 16, 32
N_ADAPTERS = 8
BATCH, SEQ = 8, 128
REQUIRED, GOAL = 1.15, 1.05


def build_base(seed: int = 0):
    return H.build_base(seed, hidden=256, layers=4, heads=4, intermediate=688)


def build_pair(base, seed: int = 1):
    """(peftc PeftModule, PEFT PeftModel), each on its own copy of `base`, both with adapters a0..a7 holding the
    same weights; a0 active."""
    from peft import LoraConfig, get_peft_model

    names = [f"a{i}" for i in range(N_ADAPTERS)]
    spec = peftc.LoRA(r=R, alpha=ALPHA, targets=list(PROJ))
    ours = peftc.compile(H.own_copy(base), spec, adapter_name=names[0]).eval()
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(PROJ))
    theirs = get_peft_model(H.own_copy(base), cfg, adapter_name=names[0]).eval()
    for n in names[1:]:
        ours.add_adapter(n, spec)
        theirs.add_adapter(n, cfg)
    theirs.set_adapter(names[0])
    theirs.eval()
    for i, n in enumerate(names):
        H.randomize_b_(ours, seed + i, adapter=n)
        H.copy_lora_to_peft_(ours, theirs, adapter=n, ours=n)
    return ours, theirs, names


def per_row(ours, ids: torch.Tensor, mixed: list[str]) -> torch.Tensor:
    """(B, T, vocab): each row run alone on its adapter."""
    rows = []
    with torch.inference_mode():
        for i, n in enumerate(mixed):
            ours.set_adapter(n)
            rows.append(ours(input_ids=ids[i:i + 1]).logits[0])
    ours.set_adapter(mixed[0])
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = H.bench_parser(__doc__)
    ap.add_argument("--capacity", type=int, default=0, help="also time a copy with room for N adapters")
    args = H.parse(ap, argv)
    H.setup(args)
    base = build_base().to(args.device)
    ours, theirs, names = build_pair(base)
    mixed = [names[i % N_ADAPTERS] for i in range(BATCH)]                    # 8 rows, 8 different adapters
    same = [names[0]] * BATCH
    inputs = H.example_inputs(base.config.vocab_size, BATCH, SEQ, args.device)

    p1, t1 = H.Contestant("peftc 1", ours), H.Contestant("PEFT 1", theirs)
    cs = [H.Contestant("base", H.own_copy(base)), p1, p1.variant("peftc 8", adapter_names=mixed),
          p1.variant("peftc 1x8", adapter_names=same), t1, t1.variant("PEFT 8", adapter_names=mixed)]
    pairs = [("peftc 8", "peftc 1"), ("PEFT 8", "PEFT 1"), ("peftc 1", "base"), ("peftc 1x8", "peftc 1"),
             ("peftc 8", "PEFT 8")]
    agree = [("peftc 1", "PEFT 1", 1e-4), ("peftc 8", "PEFT 8", 1e-4), ("peftc 8", "rows alone", 1e-4)]
    if args.capacity:
        roomy = copy.deepcopy(ours)
        roomy.reserve(args.capacity, R)
        c = H.Contestant("peftc cap 1", roomy)
        cs += [c, c.variant("peftc cap 8", adapter_names=mixed)]
        pairs += [("peftc cap 1", "peftc 1"), ("peftc cap 8", "peftc 8")]
        agree.append(("peftc cap 8", "peftc 8", 1e-4))
    out = H.check(cs, inputs, torch.inference_mode)
    out["rows alone"] = per_row(ours, inputs["input_ids"], mixed)
    H.check_outputs(out, agree)
    moved = min((out["peftc 8"][i] - out["base"][i]).abs().max().item() for i in range(BATCH))
    print(f"check: min over rows of max |peftc 8 - base| = {moved:.2e} (B != 0, must differ)")
    if not moved > 1e-3:
        raise SystemExit("outputs checked before timing: a row of 'peftc 8' equals 'base' (the adapter changes "
                         f"nothing: {moved:.3e}); not timing")

    times = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, torch.inference_mode)
    print("'1': every row on the active adapter; '8': adapter_names with 8 different adapters; "
          "'1x8': adapter_names naming one adapter 8 times")
    res = H.report(times, pairs, H.header(args, BATCH, SEQ, f"; {N_ADAPTERS} adapters r={R} on "
                                                             f"{'/'.join(p[0] for p in PROJ)}"))
    r = res["ratios"]["peftc 8 / peftc 1"]
    verdict = "meets the goal" if r <= GOAL else "meets the requirement" if r <= REQUIRED else "FAILS the requirement"
    print(f"\npeftc mixed / single = {r:.3f}: {verdict} (required <= {REQUIRED}, goal <= {GOAL})")
    return res


if __name__ == "__main__":
    main()
