"""Example: serve several LoRA adapters from one model, a different adapter per row of one batch (~20 s).

    python examples/multi_adapter_serving.py [--adapters 4] [--steps 20]

Fine-tunes a few LoRA adapters of different ranks on a small Llama (random weights, byte-level), each on its own
slice of the shipped toy corpus, then serves one batch whose rows use different adapters (and "__base__"). Checks:
each row equals that row run alone with its adapter; switching adapters and disabling them change only data (the
graph is the same object); the mixed batch works under torch.compile with no recompile when the row assignment
changes; with a declared capacity (pm.reserve), a saved adapter is loaded and deleted again with no recompile.
Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peftc  # noqa: E402
from peftc.demo import auto_threads  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
TOL = 1e-4


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(auto_threads())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=256)).eval()
    data = torch.tensor(list(CORPUS.read_bytes()))                  # byte ids
    names = [f"task{i}" for i in range(args.adapters)]
    pm = peftc.compile(model, peftc.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]), adapter_name=names[0])
    for i, name in enumerate(names[1:], start=1):                   # other ranks and targets are fine
        pm.add_adapter(name, peftc.LoRA(r=2 + 2 * i, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    graph = pm.graph_module

    chunk = len(data) // len(names)
    for i, name in enumerate(names):                                # each adapter learns its own slice
        pm.set_adapter(name)
        opt = torch.optim.AdamW(pm.trainable_parameters(), lr=5e-3)
        part = data[i * chunk:(i + 1) * chunk]
        pm.train()
        for _ in range(args.steps):
            start = torch.randint(0, len(part) - 48, (4,))
            x = torch.stack([part[j:j + 48] for j in start])        # (4, 48)
            loss = pm(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"{name}: r={pm.store[name].spec.r}, final train loss {loss.item():.3f}")
    pm.eval()
    assert pm.graph_module is graph, "set_adapter changed the graph"

    rows = [*names, "__base__"]                                      # one adapter per row
    x = torch.stack([data[j * 40:j * 40 + 32] for j in range(len(rows))])   # (rows, 32)
    with torch.no_grad():
        mixed = pm(input_ids=x, adapter_names=rows).logits
        alone = []
        for i, name in enumerate(rows):
            if name == "__base__":
                with pm.disable_adapters():
                    alone.append(pm(input_ids=x[i:i + 1]).logits[0])
            else:
                pm.set_adapter(name)
                alone.append(pm(input_ids=x[i:i + 1]).logits[0])
    row_diff = max((mixed[i] - alone[i]).abs().max().item() for i in range(len(rows)))
    print(f"mixed batch of {len(rows)} rows vs each row alone: max |diff| {row_diff:.2e}")

    compiled = torch.compile(pm, backend="eager", fullgraph=True)   # backend="inductor" (the default) for speed
    with torch.no_grad():
        first = compiled(input_ids=x, adapter_names=rows).logits
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(input_ids=x.flip(0), adapter_names=rows[::-1]).logits   # rows reversed: no recompile
    compiled_diff = (first - mixed).abs().max().item()
    reversed_diff = max((again[i] - alone[len(rows) - 1 - i]).abs().max().item() for i in range(len(rows)))
    print(f"compiled vs eager: {compiled_diff:.2e}; reversed rows, no recompile: {reversed_diff:.2e}")

    # Hot-loading: with a declared capacity, loading and deleting adapters is data too (no recompile).
    last = names[-1]
    pm.reserve(adapters=len(names) + 1, rank=max(pm.store[n].spec.r for n in names))   # one rebuild
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        pm.save_adapter(tmp, adapter_name=last)
        want = compiled(input_ids=x, adapter_names=[last] * len(rows)).logits   # compiles the reserved graph
        with torch._dynamo.config.patch(error_on_recompile=True):
            pm.load_adapter(Path(tmp) / last, "hot")                    # a copy of `last`, loaded frozen
            hot = compiled(input_ids=x, adapter_names=["hot"] * len(rows)).logits
            pm.delete_adapter("hot")
            after = compiled(input_ids=x, adapter_names=rows).logits
    hot_diff = (hot - want).abs().max().item()
    after_diff = (after - first).abs().max().item()
    print(f"capacity {pm.capacity.adapters} x r={pm.capacity.rank}: loaded and deleted with no recompile; loaded copy "
          f"vs original: {hot_diff:.2e}; mixed batch afterwards: {after_diff:.2e}")
    return {"row_diff": row_diff, "compiled_diff": compiled_diff, "reversed_diff": reversed_diff,
            "hot_diff": hot_diff, "after_diff": after_diff}


def failures(r: dict) -> list[str]:
    """Every figure that is not within TOL (a NaN is not within it)."""
    return [f"{k} = {v:.2e}, not <= {TOL}" for k, v in r.items() if not v <= TOL]


if __name__ == "__main__":
    bad = failures(main())
    for msg in bad:
        print(f"FAILED: {msg}", file=sys.stderr)
    sys.exit(1 if bad else 0)
