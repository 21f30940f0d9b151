"""Example: merge a LoRA adapter and export it two ways, a Hugging Face directory and a torch.export .pt2 (~15 s).

    python examples/export_merged.py [--out DIR]

Builds a small Llama (random weights), saves it as a Hugging Face directory (OUT/base), fine-tunes LoRA on it for a
few steps on the shipped toy corpus and saves the adapter (OUT/adapter). Then:

  merge      pm.merge(): a new module with W' = W + (alpha/r) B A folded in; pm itself is unchanged
  HF dir     peftc.export_merged(pm, OUT/merged): reloaded with plain AutoModelForCausalLM.from_pretrained
  .pt2       pm.export(OUT/model.pt2) (merged) and merged=False (LoRA ops kept): torch.export.load(...).module()

and checks that every one of them gives the adapted model's logits, at a batch and length other than the traced
ones. OUT/base and OUT/adapter are what `peftc merge` and `peftc export` take on the command line (printed at the
end). Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

import peftc  # noqa: E402
from peftc.demo import auto_threads  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
TOL = 1e-4   # fp32: folded W' vs W x + s B A x differ by rounding only


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)

    hf_logging.disable_progress_bar()
    torch.set_num_threads(auto_threads())
    torch.manual_seed(0)
    out = Path(args.out or tempfile.mkdtemp(prefix="peftc-export-"))
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=256)).eval()
    model.save_pretrained(out / "base")

    pm = peftc.compile(model, peftc.LoRA(r=8, alpha=16, targets="all-linear"))
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=3e-3)
    data = torch.tensor(list(CORPUS.read_bytes()))   # byte ids
    pm.train()
    for _ in range(args.steps):
        start = torch.randint(0, len(data) - 64, (8,))
        x = torch.stack([data[i:i + 64] for i in start])   # (8, 64)
        loss = pm(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    pm.eval()
    pm.save_adapter(out / "adapter")

    ids = torch.randint(0, 256, (3, 21))   # not the traced shape (2, 8)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = pm(input_ids=ids, attention_mask=mask).logits   # (3, 21, 256): the adapted model
        diffs = {"pm.merge()": (pm.merge()(input_ids=ids, attention_mask=mask).logits - ref).abs().max().item()}

        peftc.export_merged(pm, out / "merged", overwrite=True)
        hf = AutoModelForCausalLM.from_pretrained(out / "merged").eval()   # plain transformers
        diffs["HF directory"] = (hf(input_ids=ids, attention_mask=mask).logits - ref).abs().max().item()

        for name, merged in (("model.pt2", True), ("model-unmerged.pt2", False)):
            path = out / name
            if path.exists():
                path.unlink()
            pm.export(path, merged=merged)
            program = torch.export.load(str(path)).module()
            logits = program(input_ids=ids, attention_mask=mask)["logits"]
            diffs[name] = (logits - ref).abs().max().item()
    for name, d in diffs.items():
        print(f"{name:<20} max |logit diff| vs adapted: {d:.2e}")
    print(f"written under {out}: base/ adapter/ merged/ model.pt2 model-unmerged.pt2")
    print("the same from the command line:\n"
          f"  peftc merge --base {out / 'base'} --adapter {out / 'adapter'} --out {out / 'merged-cli'}\n"
          f"  peftc export --base {out / 'base'} --adapter {out / 'adapter'} --out {out / 'cli.pt2'}")
    return {"out": str(out), "diffs": diffs}


if __name__ == "__main__":
    r = main()
    failed = [f"{name}: max |logit diff| {d:.2e} > {TOL}" for name, d in r["diffs"].items() if not d <= TOL]
    for msg in failed:
        print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1 if failed else 0)
