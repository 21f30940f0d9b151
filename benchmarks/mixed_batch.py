"""Benchmark: a batch whose rows use 8 different LoRA adapters vs the same batch on one adapter, peftc vs HF PEFT.

    python benchmarks/mixed_batch.py [--rounds 30] [--threads N] [--warmup 3] [--device cpu] [--capacity N]

Setup: a Llama-shaped LlamaForCausalLM (random init; hidden 256, 4 layers, 4 heads, intermediate 688, vocab 1024),
8 LoRA adapters (r=16, alpha=32 on q, k, v, o; each with its own A and random non-zero B), batch 8 x 128 tokens, fp32,
eval mode under torch.inference_mode(). PEFT (get_peft_model + add_adapter x 7) wraps its own deepcopy of the base
model and gets the same weights, adapter by adapter.

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
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peftc  # noqa: E402
from lora_overhead import bench_parser, example_ids, report, setup, time_interleaved  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
R, ALPHA = 16, 32
N_ADAPTERS = 8
BATCH, SEQ = 8, 128
REQUIRED, GOAL = 1.15, 1.05


def build_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=688, vocab_size=1024, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def build_pair(base: LlamaForCausalLM, seed: int = 1):
    """(peftc PeftModule, PEFT PeftModel), both with adapters a0..a7 holding the same weights; a0 active."""
    from peft import LoraConfig, get_peft_model

    names = [f"a{i}" for i in range(N_ADAPTERS)]
    spec = peftc.LoRA(r=R, alpha=ALPHA, targets=list(PROJ))
    ours = peftc.compile(base, spec, adapter_name=names[0]).eval()
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(PROJ))
    theirs = get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0]).eval()
    for n in names[1:]:
        ours.add_adapter(n, spec)
        theirs.add_adapter(n, cfg)
    theirs.set_adapter(names[0])
    theirs.eval()

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            adapter = ours.store[n]
            for path in adapter.targets:
                w = adapter.sites[path.replace(".", "-")]
                w.B.copy_((torch.randn(w.B.shape, generator=g) * 0.02).to(w.B.device))
                layer = theirs.base_model.model.get_submodule(path)
                layer.lora_A[n].weight.copy_(w.A)
                layer.lora_B[n].weight.copy_(w.B)
    return ours, theirs, names


def check_outputs(ours, theirs, base, ids: torch.Tensor, mixed: list[str]) -> None:
    with torch.inference_mode():
        single = {"peftc": ours(input_ids=ids).logits, "PEFT": theirs(input_ids=ids).logits}
        mix = {"peftc": ours(input_ids=ids, adapter_names=mixed).logits,
               "PEFT": theirs(input_ids=ids, adapter_names=mixed).logits}
        per_row = []
        for i, n in enumerate(mixed):
            ours.set_adapter(n)
            per_row.append(ours(input_ids=ids[i:i + 1]).logits[0])
        ours.set_adapter(mixed[0])
        per_row = torch.stack(per_row)                           # (B, T, vocab): each row on its adapter alone
        ref = base(input_ids=ids).logits
    d_single = (single["peftc"] - single["PEFT"]).abs().max().item()
    d_mixed = (mix["peftc"] - mix["PEFT"]).abs().max().item()
    d_rows = (mix["peftc"] - per_row).abs().max().item()
    moved = min((mix["peftc"][i] - ref[i]).abs().max().item() for i in range(len(mixed)))
    print(f"check: max |peftc - PEFT| single {d_single:.2e}, mixed {d_mixed:.2e}; max |mixed row - row alone| "
          f"{d_rows:.2e}; min over rows of max |mixed - base| {moved:.2e} (B != 0, must differ)")
    if not (d_single < 1e-4 and d_mixed < 1e-4 and d_rows < 1e-4 and moved > 1e-3):
        raise SystemExit("outputs disagree; not timing")


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__)
    ap.add_argument("--capacity", type=int, default=0, help="also time a copy with room for N adapters")
    args = ap.parse_args(argv)
    setup(args)
    base = build_base().to(args.device)
    ours, theirs, names = build_pair(base)
    mixed = [names[i % N_ADAPTERS] for i in range(BATCH)]                    # 8 rows, 8 different adapters
    same = [names[0]] * BATCH
    ids = example_ids(base, BATCH, SEQ, args.device)                          # (B, T)
    check_outputs(ours, theirs, base, ids, mixed)

    contestants = {      # no KV cache built by anyone (peftc's graph is traced without one)
        "base": lambda input_ids: base(input_ids=input_ids, use_cache=False),
        "peftc 1": ours,
        "peftc 8": lambda input_ids: ours(input_ids=input_ids, adapter_names=mixed),
        "peftc 1x8": lambda input_ids: ours(input_ids=input_ids, adapter_names=same),
        "PEFT 1": lambda input_ids: theirs(input_ids=input_ids, use_cache=False),
        "PEFT 8": lambda input_ids: theirs(input_ids=input_ids, adapter_names=mixed, use_cache=False),
    }
    pairs = [("peftc 8", "peftc 1"), ("PEFT 8", "PEFT 1"), ("peftc 1", "base"), ("peftc 1x8", "peftc 1"),
             ("peftc 8", "PEFT 8")]
    if args.capacity:
        roomy = copy.deepcopy(ours)
        roomy.reserve(args.capacity, R)
        with torch.inference_mode():
            diff = (roomy(input_ids=ids, adapter_names=mixed).logits
                    - ours(input_ids=ids, adapter_names=mixed).logits).abs().max().item()
        print(f"check: capacity {args.capacity} vs none, mixed: max |diff| {diff:.2e}")
        if not diff < 1e-4:
            raise SystemExit("the capacity copy disagrees; not timing")
        contestants["peftc cap 1"] = roomy
        contestants["peftc cap 8"] = lambda input_ids: roomy(input_ids=input_ids, adapter_names=mixed)
        pairs += [("peftc cap 1", "peftc 1"), ("peftc cap 8", "peftc 8")]
    times = time_interleaved(contestants, ids, args.rounds, args.warmup)
    print("'1': every row on the active adapter; '8': adapter_names with 8 different adapters; "
          "'1x8': adapter_names naming one adapter 8 times")
    out = report(times, pairs,
                 f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {BATCH}x{SEQ}, "
                 f"fp32, {N_ADAPTERS} adapters r={R} on {'/'.join(p[0] for p in PROJ)}, "
                 f"{args.rounds} rounds (+{args.warmup} warm-up)")
    r = out["ratios"]["peftc 8 / peftc 1"]
    verdict = "meets the goal" if r <= GOAL else "meets the requirement" if r <= REQUIRED else "FAILS the requirement"
    print(f"\npeftc mixed / single = {r:.3f}: {verdict} (required <= {REQUIRED}, goal <= {GOAL})")
    return out

if __name__ == "__main__":
    main()
