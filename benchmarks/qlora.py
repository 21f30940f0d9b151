"""Benchmark: QLoRA, LoRA on a 4-bit bitsandbytes base (nf4, double quantization), peftc vs HF PEFT vs the quantized
base model, interleaved in one process.

    python benchmarks/qlora.py [--rounds 20] [--threads N] [--warmup 3] [--modes train,saved,no_grad,inference]
                               [--no-bf16] [--size tiny]

Setup: harness.py's reference model (LlamaForCausalLM, random init; hidden 512, 4 layers, 8 heads, vocab 1024) with
intermediate 1408 (22 blocks of 64) in place of the reference 1376, saved to a temporary directory and loaded back with
`from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32), device_map="cpu")`, once per contestant model,
so every contestant owns its weights (peftc.compile shares the model it is given; get_peft_model changes its own).
Why 1408: bitsandbytes 0.50.2's CPU dequantize_4bit, given a weight's [out, in] shape, is wrong for some `in` that are
not a multiple of its block of 64 (down_proj's 1376 comes back off by up to a block's absmax), and the quantized base
and PEFT compute with that W; peftc dequantizes the same codes as one flat run, which is right, so on 1376 the outputs
cannot be checked against each other before timing (they differ by bitsandbytes' error).
The 28 projections are bitsandbytes Linear4bit layers; embeddings, norms and lm_head stay fp32. LoRA as QLoRA runs
it: r=16, alpha=32, lora_dropout=0.05, targets "all-linear" (the 28 projections; lm_head left out by both
libraries). Batch 4 x 128 tokens, fp32 activations.

  PEFT    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False), then get_peft_model. On this
          fp32 model prepare_model_for_kbit_training freezes every parameter and casts fp16/bf16 parameters to fp32
          (there are none); peftc.compile does the equivalent (the base's weights are frozen inside the PeftModule,
          and nothing is fp16/bf16), so peftc gets no extra call. Gradient checkpointing (that function's default)
          is off for both: it trades backward time for activations the same way in both libraries (peftc:
          apply_activation_checkpointing on its peftc.Block modules) and would measure the recomputation, not the
          adapter or the quantized layers.
  peftc   peftc.compile(model, peftc.LoRA(r=16, alpha=32, dropout=0.05, targets="all-linear")): by default each
          quantized layer and the LoRA update after it run as one fused module (passes.fuse_quant); the header
          lists the peftc ops and fused modules its graph calls.
  peftc unfused
          peftc.compile(..., fuse_quant=False) on its own load, with the same adapter tensors, in every mode.
  base    the quantized model alone; 'peftc off' is the PeftModule with its adapters disabled (peftc's own base
          graph, eval modes).
  +entry  (training step and saved activations) peftc, PEFT and the base with the grad entry: the hidden state
          entering model.layers.0 is a leaf that requires grad (harness.GradEntry), so that the base, with nothing
          to train, runs a backward through every block too and all three do the same work; 'peftc +entry / base
          +entry' is peftc's cost over the quantized base in a training step.

Both adapters carry the same tensors: peftc's A and a random non-zero B (harness.randomize_b_), copied into PEFT's
lora_A / lora_B by module path (both must adapt the same 28 paths). Checked before anything is timed:
  - eval mode under no_grad: peftc and PEFT logits agree within 1e-4 and differ from the base's; peftc off agrees
    with the base;
  - eval mode with grad (dropout is off in eval): one training step each (forward with labels + backward); logits
    agree within 1e-4 and every site's A and B gradients agree within 1e-4 relative to their largest entry;
  - the same with the grad entry (peftc +entry, PEFT +entry, base +entry): each entry gets its gradient, the
    adapted pair agrees within 1e-4;
  - train mode (dropout on, as users train): one training step each, no cache, the loss requires grad.
The training step and the saved activations are then measured in train mode, with dropout, as users train.

bitsandbytes' bf16 CPU path: on a CPU with AVX512-BF16 (this one), a Linear4bit repacks its weight in place and
computes in bf16 the first time it runs in eval mode on an input that requires no grad (its
`support_avx512bf16_for_cpu`). peftc refuses a model repacked that way and always computes in the compute dtype
(fp32 here). For a like-for-like fp32 comparison this script sets `support_avx512bf16_for_cpu = False` on every
Linear4bit of the base's and PEFT's models. One more contestant, 'PEFT bnb-bf16' (eval modes only, its own load),
leaves that flag as bitsandbytes sets it: what a PEFT user gets by default here. Its logits are checked against fp32
PEFT within a loose tolerance (bf16 compute) and its rows are labelled; --no-bf16 leaves it out. On a CPU without
AVX512-BF16 it would equal PEFT, so it is left out there (and the script says so). bitsandbytes 0.50.2's repack fails
on a layer whose in_features is not a multiple of its blocksize (64): the reference model's down_proj (1376) raises a
RuntimeError on the first eval forward, which is what a PEFT user with bitsandbytes' defaults gets on this CPU; the
script then leaves the contestant out and says why (results["bf16_refused"]).

Modes (each reports ratios of medians, of minimums and the median per-round ratio, harness.report):
  train      one training step in train mode: grads set to None, forward with labels (the model's loss), backward;
             peftc / PEFT as users train (goal: under 1.00, faster than PEFT), and peftc / base, PEFT / base with
             the grad entry
  saved      bytes autograd saves for backward in one training forward (harness.saved_bytes; peftc / PEFT as users
             train: requirement <= 1.00, no more memory than PEFT; goal <= 0.75); the same pairs, and
             peftc / PEFT again without LoRA dropout (the split: what dropout's mask and dropped input cost)
  no_grad    eval forward under torch.no_grad(); peftc / PEFT, peftc / base, PEFT / base (and 'peftc off')
  inference  eval forward under torch.inference_mode(); the same pairs
"""
from __future__ import annotations

import collections
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import harness as H  # noqa: E402

MODES = ("train", "saved", "no_grad", "inference")
DROPOUT = 0.05
TARGETS = "all-linear"
BF16 = "PEFT bnb-bf16"
UNFUSED = "peftc unfused"
INTERMEDIATE = 1408        # the reference 1376 rounded up to a multiple of 64
ENTRY = " +entry"                     # a contestant with the grad entry (harness.GradEntry at model.layers.0)
EVAL_PAIRS = [("peftc", "PEFT"), ("peftc", "base"), ("PEFT", "base"), ("peftc", "peftc off"), ("peftc off", "base")]
UNFUSED_PAIRS = [("peftc", UNFUSED), (UNFUSED, "PEFT"), (UNFUSED, "base")]
BF16_PAIRS = [("peftc", BF16), (BF16, "base"), (BF16, "PEFT")]
ENTRY_PAIRS = [(f"peftc{ENTRY}", f"base{ENTRY}"), (f"PEFT{ENTRY}", f"base{ENTRY}"), (f"peftc{ENTRY}", f"PEFT{ENTRY}")]
TRAIN_GOAL = 1.00                      # training step, peftc / PEFT as users train: faster than PEFT
SAVED_LIMIT, SAVED_GOAL = 1.00, 0.75   # saved activations, peftc / PEFT as users train
TOL = 1e-4            # peftc vs PEFT, fp32 compute
BF16_TOL = 0.25       # bf16-compute PEFT vs fp32 PEFT (max |logit diff|; logits are O(1) here)


def quant_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def load_4bit(directory: str, bf16_cpu: bool = False):
    """A fresh 4-bit copy of the model saved in `directory` (eval mode). Unless `bf16_cpu`, every Linear4bit keeps
    its weight layout and computes in the compute dtype (support_avx512bf16_for_cpu = False)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant_config(), device_map="cpu")
    layers = linear4bit_layers(model)
    if not layers:
        raise SystemExit(f"the model loaded from {directory} has no bitsandbytes Linear4bit layer; not timing")
    if not bf16_cpu:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = False
    return model.eval()


def linear4bit_layers(model) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def has_avx512bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16 as bnb_has

    return bool(bnb_has())


def compile_peftc(directory: str, dropout: float = DROPOUT, r: int = H.R, alpha: int = H.ALPHA, **compile_kw):
    """peftc's LoRA (QLoRA's setup) on a fresh 4-bit load; `compile_kw` go to peftc.compile (e.g. fuse_quant)."""
    import peftc

    return peftc.compile(load_4bit(directory), peftc.LoRA(r=r, alpha=alpha, dropout=dropout, targets=TARGETS),
                         **compile_kw)


def copy_peftc_lora_(src, dst) -> None:
    """Copy A and B of every site of `src`'s active adapter into `dst`'s (the same site keys, or SystemExit)."""
    a, b = src.store[src.active_adapter].sites, dst.store[dst.active_adapter].sites
    if set(a) != set(b):
        raise SystemExit(f"two peftc modules adapt different sites: {sorted(set(a) ^ set(b))[:4]}; not timing")
    with torch.no_grad():
        for key, w in a.items():
            b[key].A.copy_(w.A)
            b[key].B.copy_(w.B)


def build_qlora_pair(directory: str, dropout: float = DROPOUT, r: int = H.R, alpha: int = H.ALPHA, seed: int = 1):
    """(peftc PeftModule, PEFT PeftModel), each on its own 4-bit load, QLoRA's setup, with the same A and random
    non-zero B."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ours = compile_peftc(directory, dropout, r, alpha)
    theirs = prepare_model_for_kbit_training(load_4bit(directory), use_gradient_checkpointing=False)
    theirs = get_peft_model(theirs, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS))
    ours_paths = set(ours.store[ours.active_adapter].targets)
    theirs_paths = {p.removeprefix("base_model.model.") for p, m in theirs.named_modules() if hasattr(m, "lora_A")}
    if ours_paths != theirs_paths:
        raise SystemExit(f"peftc and PEFT adapt different layers with targets={TARGETS!r}: only peftc "
                         f"{sorted(ours_paths - theirs_paths)[:4]}, only PEFT {sorted(theirs_paths - ours_paths)[:4]}; "
                         "not timing")
    H.randomize_b_(ours, seed)
    H.copy_lora_to_peft_(ours, theirs)
    return ours.eval(), theirs.eval()


def peftc_ops(pm) -> dict[str, int]:
    """{op: calls} of peftc's own ops (namespace peftc::) in the graph `pm` runs for one adapter, blocks included,
    and the sites its fused quantized linear + LoRA modules (passes.fuse_quant) serve."""
    counts: collections.Counter = collections.Counter()
    for m in pm.graph_module.modules():
        graph = getattr(m, "graph", None)
        for node in getattr(graph, "nodes", ()):
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "peftc":
                counts[node.target.name().removesuffix(".default")] += 1
            elif node.op == "call_module":
                fused = m.get_submodule(node.target)
                if hasattr(fused, "bases"):                  # a fused module: one quantized base per site
                    counts[f"fused {type(fused).__name__}"] += len(fused.bases)
    return dict(counts)


def ops_text(ops: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) or "no peftc op"


def check_grads(ours, theirs, adapter: str = "default") -> float:
    """The largest difference between peftc's and PEFT's A and B gradients over all sites, relative to the largest
    gradient entry of that tensor; SystemExit above TOL or where a gradient is missing."""
    sites = ours.store[ours.active_adapter]
    worst = 0.0
    for path in sites.targets:
        w = sites.sites[path.replace(".", "-")]
        layer = theirs.base_model.model.get_submodule(path)
        for mine, ref, what in ((w.A, layer.lora_A[adapter].weight, "A"), (w.B, layer.lora_B[adapter].weight, "B")):
            if mine.grad is None or ref.grad is None:
                raise SystemExit(f"{path}: no gradient of {what} (peftc {mine.grad is not None}, PEFT "
                                 f"{ref.grad is not None}); not timing")
            d = H.max_diff(mine.grad, ref.grad) / max(ref.grad.abs().max().item(), 1e-30)
            if not d <= TOL:
                raise SystemExit(f"{path}: the gradients of {what} disagree: max |diff| {d:.3e} of the largest entry "
                                 f"(must be <= {TOL:g}); not timing")
            worst = max(worst, d)
    print(f"check: {len(sites.targets)} sites' A and B gradients agree, max relative |diff| {worst:.2e}")
    return worst


def verdicts(results: dict) -> dict[str, str]:
    """peftc / PEFT as users train against its targets: the training step's goal (faster than PEFT: under 1.00 by
    medians), and the saved activations' requirement (no more than PEFT's) and goal (<= 0.75)."""
    out = {}
    if "train" in results:
        r = results["train"]["ratios"]["peftc / PEFT"]
        out["train"] = f"goal < {TRAIN_GOAL:.2f} {'met' if r < TRAIN_GOAL else 'not met'} (medians)"
    if "saved" in results:
        r = results["saved"]["ratios"]["peftc / PEFT"]
        out["saved"] = (f"requirement <= {SAVED_LIMIT:.2f} {'met' if r <= SAVED_LIMIT else 'NOT MET'}, "
                        f"goal <= {SAVED_GOAL:.2f} {'met' if r <= SAVED_GOAL else 'not met'}")
    return out


def get_peft_bf16(directory: str, ours):
    """PEFT on a load that keeps bitsandbytes' default bf16 CPU path, with the same adapter tensors as `ours`."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(load_4bit(directory, bf16_cpu=True), use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=H.R, lora_alpha=H.ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS))
    H.copy_lora_to_peft_(ours, model)
    return model.eval()


def bf16_refusal(model, inputs: dict) -> str | None:
    """Why bitsandbytes' bf16 CPU path cannot run `model` (one eval forward under no_grad raised), or None. Its
    repack reshapes the block scales to [out, in / blocksize] and fails where in_features is not a multiple of the
    blocksize (down_proj's 1376 here)."""
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except RuntimeError as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_bf16_paths(theirs_bf16, fp32_models) -> None:
    """SystemExit unless the bf16 contestant took bitsandbytes' bf16 CPU path and no fp32 contestant did."""
    if not any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
               for m in linear4bit_layers(theirs_bf16)):
        raise SystemExit(f"'{BF16}' did not take bitsandbytes' bf16 CPU path (no layer repacked); not timing")
    for m in fp32_models:
        if any(getattr(x.weight.quant_state, "packing_format_for_cpu", False) for x in linear4bit_layers(m)):
            raise SystemExit("a fp32 contestant was repacked for bitsandbytes' bf16 CPU path; not timing")


def train_and_saved(args, results: dict, users: list[H.Contestant], entry: list[H.Contestant], labelled: dict,
                    head: str) -> None:
    """The checks of the training step (eval mode: logits and every site's gradients agree; then train mode), then
    the timed training step and the saved activations, in train mode with dropout."""
    ours, theirs = users[0].model, users[1].model
    agree = [("peftc", "PEFT", TOL)] + [(UNFUSED, "PEFT", TOL) for c in users if c.name == UNFUSED]
    H.check(users, labelled, train=True, agree=agree)             # eval mode: no dropout, so they must agree
    results["grad_max_rel_diff"] = check_grads(ours, theirs)
    if len(users) > 2:
        results["grad_max_rel_diff_unfused"] = check_grads(users[2].model, theirs)
    H.check(entry, labelled, train=True, agree=[(f"peftc{ENTRY}", f"PEFT{ENTRY}", TOL)],
            differ=[(f"peftc{ENTRY}", f"base{ENTRY}", TOL)])     # every entry gets its gradient
    models = {id(c.model): c.model for c in users + entry}.values()
    for m in models:
        m.train()
    everyone = users + entry
    H.check(everyone, labelled, train=True)                       # train mode, dropout on: no cache, a loss that trains
    pairs = [("peftc", "PEFT")] + (UNFUSED_PAIRS[:2] if len(users) > 2 else []) + ENTRY_PAIRS
    if "train" in args.modes:
        t = H.time_contestants(everyone, labelled, args.rounds, args.warmup, args.device, train=True)
        results["train"] = H.report(t, pairs, f"training step in train mode (forward with labels + backward, "
                                    f"dropout {DROPOUT}; '{ENTRY.strip()}': grad entry at {H.FIRST_BLOCK}): {head}")
    if "saved" in args.modes:
        results["saved"] = H.saved(everyone, labelled, pairs, f"as users train, train mode (dropout {DROPOUT})")
    for m in models:
        m.eval()


def main(argv: list[str] | None = None) -> dict:
    ap = H.bench_parser(__doc__, rounds=20, modes=MODES)
    ap.add_argument("--no-bf16", action="store_true", help=f"leave out the '{BF16}' contestant (eval modes)")
    ap.add_argument("--size", default="reference", choices=("reference", "tiny"),
                    help="tiny: hidden 64, 1 layer, batch 2 x 16 (a smoke test; its figures mean nothing)")
    args = H.parse(ap, argv, MODES)
    if args.device != "cpu":
        raise SystemExit("qlora.py runs on the CPU (bitsandbytes' CPU 4-bit path; device_map='cpu')")
    H.setup(args)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tiny = args.size == "tiny"
    batch, seq = (2, 16) if tiny else (H.BATCH, H.SEQ)
    # intermediate: a multiple of 64, where bitsandbytes' CPU dequantize_4bit is right (the docstring says why)
    base = H.build_base(**(dict(hidden=64, layers=1, heads=4, intermediate=128) if tiny else
                           dict(intermediate=INTERMEDIATE)))
    bf16 = not args.no_bf16 and bool({"no_grad", "inference"} & set(args.modes))
    if bf16 and not has_avx512bf16():
        print(f"this CPU has no AVX512-BF16: bitsandbytes computes in fp32 here by default, so '{BF16}' would be "
              "PEFT again; leaving it out")
        bf16 = False
    training = bool({"train", "saved"} & set(args.modes))
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as d:
        base.save_pretrained(d)
        ours, theirs = build_qlora_pair(d)
        unfused = compile_peftc(d, fuse_quant=False).eval()
        copy_peftc_lora_(ours, unfused)
        # the split: the same pair without LoRA dropout (saved activations only)
        plain = build_qlora_pair(d, dropout=0.0) if "saved" in args.modes else None
        quant_base = load_4bit(d).requires_grad_(False)
        theirs_bf16 = get_peft_bf16(d, ours) if bf16 else None
    inputs = H.example_inputs(base.config.vocab_size, batch=batch, seq=seq)
    labelled = dict(inputs, labels=inputs["input_ids"])
    results: dict = {}
    if theirs_bf16 is not None:
        results["bf16_refused"] = bf16_refusal(theirs_bf16, inputs)
        if results["bf16_refused"]:
            print(f"'{BF16}' left out: bitsandbytes' bf16 CPU path fails on this model, as it would for a PEFT user "
                  f"with bitsandbytes' defaults: {results['bf16_refused']}")
            theirs_bf16 = None
    ops = {"peftc": peftc_ops(ours), UNFUSED: peftc_ops(unfused)}
    graphs = "; ".join(f"{k}'s graph calls {ops_text(v)}" for k, v in ops.items())
    head = H.header(args, batch, seq, extra=f"; 4-bit nf4 (double quantization, fp32 compute), LoRA r={H.R} "
                                            f"alpha={H.ALPHA} dropout {DROPOUT} on {TARGETS}; peftc fused "
                                            f"(fuse_quant, the default), peftc unfused fuse_quant=False; {graphs}")
    print(head)
    results.update(peftc_ops=ops, header=head)

    peftc_c, peft_c = H.Contestant("peftc", ours), H.Contestant("PEFT", theirs)
    base_c = H.Contestant("base", quant_base)
    unfused_c = [H.Contestant(UNFUSED, unfused)]
    evals = [base_c, peft_c, peftc_c, peftc_c.variant("peftc off", ours.disable_adapters), *unfused_c]
    if theirs_bf16 is not None:
        evals.append(H.Contestant(BF16, theirs_bf16))
    eval_pairs = EVAL_PAIRS + (UNFUSED_PAIRS if unfused_c else []) + (BF16_PAIRS if theirs_bf16 is not None else [])
    agree = [("peftc", "PEFT", TOL), ("peftc off", "base", TOL)] + [(UNFUSED, "PEFT", TOL) for _ in unfused_c]
    agree += [(BF16, "PEFT", BF16_TOL)] if theirs_bf16 is not None else []
    out = H.check(evals, inputs, torch.no_grad, agree=agree, differ=[("peftc", "base", TOL)])
    if theirs_bf16 is not None:
        results["bf16_max_diff"] = H.max_diff(out[BF16], out["PEFT"])
        check_bf16_paths(theirs_bf16, [quant_base, theirs])

    for mode, ctx in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        if mode in args.modes:
            H.check(evals, inputs, ctx)
            t = H.time_contestants(evals, inputs, args.rounds, args.warmup, args.device, ctx)
            results[mode] = H.report(t, eval_pairs, f"eval forward, torch.{ctx.__name__}(): {head}")

    if training:
        hidden = base.config.hidden_size
        entry = [c.variant(c.name + ENTRY, H.GradEntry(c.model, hidden)) for c in (peftc_c, peft_c, base_c)]
        train_and_saved(args, results, [peftc_c, peft_c, *unfused_c], entry, labelled, head)
    if plain is not None:
        nodrop = [H.Contestant("peftc", plain[0].train()), H.Contestant("PEFT", plain[1].train())]
        H.check(nodrop, labelled, train=True, agree=[("peftc", "PEFT", TOL)])      # no dropout: train mode agrees
        results["saved_no_dropout"] = H.saved(nodrop, labelled, [("peftc", "PEFT")], "without LoRA dropout (the split)")
    for what, v in verdicts(results).items():
        print(f"{what}: {v}")
    return results


if __name__ == "__main__":
    main()
