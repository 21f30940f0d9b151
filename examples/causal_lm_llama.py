"""Example: causal-LM LoRA on a small Llama, byte-level, on the shipped toy corpus (about 15 s on a 2-core CPU).

    python examples/causal_lm_llama.py [--steps 120] [--seed 0] [--out DIR]

The corpus (examples/data/corpus.txt, 3.5 KB of plain English) is split into the first 90 % for training and the
last 10 % held out. The model is a LlamaForCausalLM with random weights from a small config (hidden 128, 2 layers,
vocabulary = the 256 byte values, so no tokenizer is needed); LoRA r=16 goes on every linear layer and the output
head is trained as a modules_to_save copy. With no pre-training the base knows nothing, so this shows the mechanics
of a causal-LM fine-tune (labels = input_ids, the model's own shifted loss), not a useful model. Prints greedy
samples of two prompts, generated as one left-padded batch by pm.generate (prefill and decode graphs over a static
KV cache), and of the base model (adapters disabled). Checks: held-out loss at least halves, the base weights are
bitwise unchanged, the saved adapter reloads and merges to the same loss, and the merged model (pm.merge()) generates
the same bytes. Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peftc  # noqa: E402
from peftc.demo import auto_threads  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
SEQ = 64
MAX_LOSS_RATIO = 0.5   # held-out loss after / before
PROMPTS = ["The wind came", "She said"]


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")))   # (N,) byte ids 0..255


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


def windows(data: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - SEQ, (batch,), generator=g)
    return torch.stack([data[i:i + SEQ] for i in start])   # (B, SEQ)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, data: torch.Tensor) -> float:
    model.eval()
    x = data[: len(data) // SEQ * SEQ].view(-1, SEQ)   # (B, SEQ), non-overlapping
    return model(input_ids=x, labels=x).loss.item()


def greedy(model: torch.nn.Module, prompts: list[str]) -> list[str]:
    """Each prompt and its greedy continuation up to SEQ bytes (the trained context): one left-padded batch through
    the model's generate (peftc's: prefill and decode graphs over a static KV cache)."""
    rows = [encode(p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)   # (B, T); padding is masked out, any byte will do
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=SEQ - width)   # (B, SEQ): prompt + new bytes
    return [decode(torch.cat([r, new])) for r, new in zip(rows, out[:, width:])]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    args = ap.parse_args(argv)

    torch.set_num_threads(auto_threads())   # 1 thread when other jobs keep the cores busy
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    data = encode(CORPUS.read_text())
    cut = int(len(data) * 0.9)
    train, test = data[:cut], data[cut:]
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=256, bos_token_id=None,
                                         eos_token_id=None)).eval()   # bytes: no special tokens
    base_snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    spec = peftc.LoRA(r=16, alpha=32, dropout=0.05, targets="all-linear", modules_to_save=["lm_head"])
    pm = peftc.compile(model, spec)   # the model itself is not changed
    pm.print_trainable_parameters()
    before = held_out_loss(pm, test)
    print(f"held-out loss before: {before:.3f} nats/byte")

    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    pm.train()
    for step in range(1, args.steps + 1):
        x = windows(train, 16, g)
        loss = pm(input_ids=x, labels=x).loss   # the model's own loss: shifts labels by one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 40 == 0 or step == args.steps:
            print(f"step {step}: train loss {loss.item():.3f}")
    after = held_out_loss(pm, test)
    seconds = time.perf_counter() - t0
    print(f"held-out loss after:  {after:.3f} nats/byte  ({seconds:.1f}s)")
    samples = greedy(pm, PROMPTS)
    for text in samples:
        print("sample:", repr(text))
    with pm.disable_adapters():      # the same graphs without the adapter: the base model
        print("base model's sample:", repr(greedy(pm, PROMPTS[:1])[0]))

    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base_snapshot[k])]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        pm.save_adapter(out)
        reloaded = peftc.load_adapter(model, out)
        reload_diff = abs(held_out_loss(reloaded, test) - after)
    merged = pm.merge()
    merged_diff = abs(held_out_loss(merged, test) - after)
    merged_same = greedy(merged, PROMPTS) == samples    # the adapter folded in: the base model's ops
    print(f"adapter saved to {out}; reloaded loss differs by {reload_diff:.1e}, merged by {merged_diff:.1e}; "
          f"merged model's sample {'the same' if merged_same else 'DIFFERENT'}")
    return {"loss_before": before, "loss_after": after, "base_unchanged": not changed, "reload_diff": reload_diff,
            "merged_diff": merged_diff, "merged_sample_same": merged_same, "samples": samples,
            "seconds": seconds}


def failures(r: dict) -> list[str]:
    return [msg for ok, msg in [
        (r["loss_after"] <= MAX_LOSS_RATIO * r["loss_before"],
         f"held-out loss {r['loss_before']:.3f} -> {r['loss_after']:.3f} did not halve"),
        (r["base_unchanged"], "base model weights changed"),
        (r["reload_diff"] == 0.0, f"reloaded adapter's loss differs by {r['reload_diff']:.1e} (must be bit for bit)"),
        (r["merged_diff"] <= 1e-4, f"merged model's loss differs by {r['merged_diff']:.1e}"),
        (r["merged_sample_same"], "the merged model's greedy sample differs from the adapted model's"),
    ] if not ok]


if __name__ == "__main__":
    failed = failures(main())
    for msg in failed:
        print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1 if failed else 0)
