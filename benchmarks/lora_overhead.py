"""Benchmark: inference overhead of unmerged LoRA, peftc vs HF PEFT vs the bare model, timed interleaved in one process.

    python benchmarks/lora_overhead.py [--rounds 30] [--threads N] [--warmup 3]

Setup: a Llama-shaped LlamaForCausalLM (random init; hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 1024),
LoRA r=16, alpha=32 on all seven projections (q, k, v, o, gate, up, down), batch 4 x 128 tokens, fp32, eval mode under
torch.inference_mode(). PEFT wraps its own deepcopy of the base model; both adapters get the same A and the same
random non-zero B, and their outputs are checked against each other before anything is timed.

Each round times every contestant once, in rotated order; the report is the median per contestant and ratios of
medians. The floor for any unmerged LoRA is 1 + (adapter FLOPs / base FLOPs), printed as "ideal".
"""
from __future__ import annotations

import argparse
import warnings
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

import peftc  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R, ALPHA = 16, 32
BATCH, SEQ = 4, 128


def build_base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=1376, vocab_size=1024, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of every nn.Linear, the lm_head included."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def flop_share(model: torch.nn.Module, tokens: int, seq: int) -> tuple[float, float]:
    """(base, adapter) multiply-add FLOPs of one forward: linears + attention scores for the base; B A x per site."""
    shapes = linear_shapes(model)
    base = sum(2 * tokens * i * o for i, o in shapes.values())
    cfg = model.config
    base += cfg.num_hidden_layers * 2 * (2 * tokens * seq * cfg.hidden_size)   # Q K^T and P V, full (no causal skip)
    adapter = sum(2 * tokens * R * (i + o) for n, (i, o) in shapes.items() if n.rsplit(".", 1)[-1] in PROJ)
    return base, adapter


def build_contestants(base: LlamaForCausalLM, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    spec = peftc.LoRA(r=R, alpha=ALPHA, targets=list(PROJ))
    ours = peftc.compile(base, spec).eval()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(PROJ))).eval()

    # Same A (copied from peftc) and the same random non-zero B in both, keyed by module path.
    g = torch.Generator().manual_seed(seed)
    ours_sites = ours.store[ours.active_adapter]
    with torch.no_grad():
        for path in ours_sites.targets:
            w = ours_sites.sites[path.replace(".", "-")]
            w.B.copy_(torch.randn(w.B.shape, generator=g).to(w.B.device) * 0.02)
            layer = theirs.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(w.A)
            layer.lora_B["default"].weight.copy_(w.B)
    return ours, theirs


def check_agree(contestants: dict, ids: torch.Tensor) -> None:
    with torch.inference_mode():
        out = {k: f(input_ids=ids).logits for k, f in contestants.items()}
    diff_lora = (out["peftc"] - out["PEFT"]).abs().max().item()
    diff_base = (out["peftc"] - out["base"]).abs().max().item()
    print(f"check: max |peftc - PEFT| = {diff_lora:.2e}; max |peftc - base| = {diff_base:.2e} (B != 0, must differ)")
    if not diff_lora < 1e-4 or not diff_base > 1e-4:
        raise SystemExit("outputs disagree; not timing")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(contestants: dict, ids: torch.Tensor, rounds: int, warmup: int) -> dict[str, list[float]]:
    names = list(contestants)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                contestants[n](input_ids=ids)
        for i in range(rounds):
            for n in names[i % len(names):] + names[:i % len(names)]:   # rotate the order each round
                _sync(ids.device)
                t0 = time.perf_counter()
                contestants[n](input_ids=ids)
                _sync(ids.device)
                times[n].append(time.perf_counter() - t0)
    return times


def bench_parser(doc: str, rounds: int = 30) -> argparse.ArgumentParser:
    """The flags every benchmark here takes."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as torch starts)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings are synchronized)")
    return ap


def setup(args) -> None:
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)   # transformers deprecations raised inside PEFT
    if args.threads:
        torch.set_num_threads(args.threads)   # before any compile: inductor's CPU kernels fix their thread count


def example_ids(base, batch: int, seq: int, device) -> torch.Tensor:
    """(batch, seq) token ids, the same in every run."""
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(2))
    return ids.to(device)


def report(times: dict[str, list[float]], pairs, header: str) -> dict:
    """Print each contestant's times (and medians over the base model's, or over the first contestant's where
    there is no base) and, per (a, b) pair, a/b as ratios of medians, of minimums and the median per-round ratio
    (on a busy machine the medians drift; the other two are steadier). Returns those ratios."""
    med = {n: statistics.median(t) for n, t in times.items()}
    ref = "base" if "base" in times else next(iter(times))
    width = max(map(len, times)) + 1
    print(f"\n{header}")
    print(f"{'':{width}s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'/ ' + ref:>8s}")
    for n, t in times.items():
        print(f"{n:{width}s} {1e3 * med[n]:10.2f} {1e3 * min(t):8.2f} {1e3 * max(t):8.2f} {med[n] / med[ref]:8.3f}")
    keys = [f"{a} / {b}" for a, b in pairs]
    ratios = {k: med[a] / med[b] for k, (a, b) in zip(keys, pairs)}
    mins = {k: min(times[a]) / min(times[b]) for k, (a, b) in zip(keys, pairs)}
    paired = {k: statistics.median(x / y for x, y in zip(times[a], times[b])) for k, (a, b) in zip(keys, pairs)}
    kw = max(map(len, keys)) + 1
    print(f"\n{'ratio':{kw}s} {'medians':>8s} {'minimums':>9s} {'per-round':>10s}")
    for k in keys:
        print(f"{k:{kw}s} {ratios[k]:8.3f} {mins[k]:9.3f} {paired[k]:10.3f}")
    return {"medians_s": med, "ratios": ratios, "min_ratios": mins, "paired_ratios": paired}


def main(argv: list[str] | None = None) -> dict:
    args = bench_parser(__doc__).parse_args(argv)
    setup(args)
    base = build_base().to(args.device)
    ours, theirs = build_contestants(base)
    # no KV cache built by anyone: peftc's graph is traced without one, and the HF models' default use_cache=True
    # costs about 13 % of the base's time here
    contestants = {"base": lambda input_ids: base(input_ids=input_ids, use_cache=False),
                   "PEFT": lambda input_ids: theirs(input_ids=input_ids, use_cache=False), "peftc": ours}
    ids = example_ids(base, BATCH, SEQ, args.device)                          # (B, T)
    check_agree(contestants, ids)

    flops_base, flops_adapter = flop_share(base, BATCH * SEQ, SEQ)
    ideal = 1 + flops_adapter / flops_base
    times = time_interleaved(contestants, ids, args.rounds, args.warmup)
    out = report(times, [("peftc", "base"), ("PEFT", "base"), ("peftc", "PEFT")],
                 f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {BATCH}x{SEQ}, "
                 f"fp32, {args.rounds} rounds (+{args.warmup} warm-up)")
    print(f"adapter FLOP share: {flops_adapter / flops_base:.2%} of base ({flops_adapter / 1e9:.2f} of "
          f"{flops_base / 1e9:.2f} GFLOP) -> ideal overhead ratio {ideal:.3f}")
    return dict(out, ideal=ideal)


if __name__ == "__main__":
    main()
