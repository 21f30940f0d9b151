"""Benchmark: LoRA on the stacked expert weights of a MoE model (target_parameters), peftc vs HF PEFT vs the bare
model, timed interleaved in one process.

    python benchmarks/moe.py [--rounds 20] [--threads N] [--warmup 3] [--modes no_grad,train]

Setup: a Mixtral-shaped MixtralForCausalLM (random init; hidden 256, 4 layers, 8 heads, 8 experts, top-2,
intermediate 512, vocab 1024; transformers' default grouped_mm experts), LoRA r=16, alpha=32 on
target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] (no module targets), batch 4 x 128, fp32.
The base model, peftc and PEFT each run on their own copy of the weights (harness rules); both adapters carry the
same tensors (peftc's, with random non-zero B, loaded into PEFT under PEFT's keys), and before anything is timed
their logits must agree within 1e-4 and differ from the base model's.

PEFT applies such an adapter by re-parametrising each expert weight: W + s B_e A_e for every expert, a full-size
tensor per weight per call (one baddbmm), which the experts then read. peftc leaves the weight alone and adds
s (x A_e^T) B_e^T on each expert's own tokens (two skinny grouped products per weight), so the adapter costs
O(tokens r (in + out)) instead of O(E in out) per call.

Modes:
Contestants: base (the bare model), PEFT, peftc and "peftc off" (the same PeftModule, adapters disabled: its base
graph), so that peftc / peftc off is the adapter's own cost.

  no_grad   eval forward under torch.no_grad()
  train     one training step: zero grads, forward with labels (the model's loss), backward
Each reports ratios of medians, of minimums and the median per-round ratio (harness.report).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import harness as H  # noqa: E402

MODES = ("no_grad", "train")
PAIRS = [("peftc", "base"), ("PEFT", "base"), ("peftc", "PEFT"), ("peftc", "peftc off")]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build_moe(seed: int = 0, hidden: int = 256, layers: int = 4, heads: int = 8, experts: int = 8,
              intermediate: int = 512, vocab: int = 1024):
    """The MoE reference model (random weights, eval mode). Contestants take `own_copy`s of it."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=heads, intermediate_size=intermediate, num_local_experts=experts,
                        num_experts_per_tok=2, vocab_size=vocab, max_position_embeddings=512)
    return MixtralForCausalLM(cfg).eval()


def build_pair(base, r: int = H.R, alpha: int = H.ALPHA):
    """(peftc PeftModule, PEFT PeftModel) on their own copies of `base`, with the same tensors (random non-zero B)."""
    import peftc
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ours = peftc.compile(H.own_copy(base), peftc.LoRA(r=r, alpha=alpha, targets=[], target_parameters=EXPERTS))
    theirs = get_peft_model(H.own_copy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=[],
                                                         target_parameters=EXPERTS))
    H.randomize_b_(ours.eval())
    result = set_peft_model_state_dict(theirs, ours.store.peft_state_dict("default"))
    if result.unexpected_keys or any("lora_" in k for k in result.missing_keys):
        raise SystemExit(f"PEFT did not take peftc's tensors: unexpected {result.unexpected_keys[:3]}, missing "
                         f"{[k for k in result.missing_keys if 'lora_' in k][:3]}")
    return ours, theirs.eval()


def main(argv: list[str] | None = None) -> dict:
    args = H.parse(H.bench_parser(__doc__, rounds=20, modes=MODES), argv, MODES)
    H.setup(args)
    base = build_moe().to(args.device)
    ours, theirs = build_pair(base)
    peftc_c = H.Contestant("peftc", ours)
    # "peftc off": the same module with its adapter disabled (its base graph): peftc / peftc off is the adapter's
    # own cost; the traced graph runs transformers' grouped_mm_fallback op where the eager model may run torch's kernel
    cs = [H.Contestant("base", H.own_copy(base, frozen=True)), H.Contestant("PEFT", theirs), peftc_c,
          peftc_c.variant("peftc off", ours.disable_adapters)]
    inputs = H.example_inputs(base.config.vocab_size, device=args.device)
    H.check(cs, inputs, torch.no_grad, agree=[("peftc", "PEFT", 1e-4)], differ=[("peftc", "base", 1e-4)])

    head = H.header(args, extra=f"; Mixtral-shaped, {base.config.num_local_experts} experts, LoRA r={H.R} on "
                                "gate_up_proj and down_proj")
    results: dict = {}
    if "no_grad" in args.modes:
        t = H.time_contestants(cs, inputs, args.rounds, args.warmup, args.device, torch.no_grad)
        results["no_grad"] = H.report(t, PAIRS, f"eval forward, torch.no_grad(): {head}")
    if "train" in args.modes:
        trained = cs[1:3]                          # the frozen base (and peftc off) have nothing to train
        for c in trained:
            c.model.train()
        labelled = dict(inputs, labels=inputs["input_ids"])
        H.check(trained, labelled, train=True, agree=[("peftc", "PEFT", 1e-4)])
        t = H.time_contestants(trained, labelled, args.rounds, args.warmup, args.device, train=True)
        results["train"] = H.report(t, [("peftc", "PEFT")], f"training step (forward with labels + backward): {head}")
        for c in trained:
            c.model.eval()
    return results


if __name__ == "__main__":
    main()
