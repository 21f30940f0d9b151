"""Example: a new adapter method defined outside peftc, registered, trained, saved, reloaded and merged (~10 s).

    python examples/custom_method.py [--out DIR]

The method is a learned gate per output channel of a layer, y' = g * y (g starts at 1, so a fresh adapter changes
nothing). It gives peftc what every method gives it (peftc.Method's core): a frozen spec, its adapter_config.json
mapping, its weights at a site, its rewrite pass (given the sites its adapters adapt) with the value of its route
inputs for one adapter, and PEFT-style checkpoint keys; and one capability, a fold rule (merging); then one
register_method call.
Nothing in peftc changes. Then, on a small Llama:

  train    only the gates of the MLP's down projections, to match a teacher whose down projections are scaled per
           channel: the loss falls and the base model stays bitwise unchanged
  save     pm.save_adapter(): adapter_config.json (peft_type PEFTC_GATE) + adapter_model.safetensors
  reload   peftc.load_adapter(model, dir): the same outputs
  merge    pm.merge() folds the gates into W and b through the method's own fold rule: the same outputs, the base
           model's ops only

Exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

import peftc  # noqa: E402
from peftc.passes.route import route_input  # noqa: E402
from peftc.store import site_key  # noqa: E402


# --- the method: spec, config mapping, weights, rewrite, checkpoint keys, fold rule ----------------------------------
@dataclass(frozen=True)
class Gate(peftc.AdapterSpec):
    """y' = g * y at each target (a list of module names, as LoRA's targets); g, one per output channel, starts at
    `init`."""

    peft_type: ClassVar[str] = "PEFTC_GATE"
    targets: tuple = ()
    init: float = 1.0

    def __post_init__(self):
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise peftc.SpecError(f"Gate targets must be a non-empty list of module names, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))


def gate_from_config(cfg: dict, source: str) -> Gate:
    return Gate(targets=tuple(cfg["target_modules"]), init=float(cfg.get("init", 1.0)))


def gate_to_config(spec: Gate, *, target_modules: Any, **context) -> dict:
    return {"peft_type": Gate.peft_type, "target_modules": list(spec.targets), "init": spec.init,
            "base_model_name_or_path": context.get("base_model_name_or_path")}


def build_gate(spec: Gate, site, weight: torch.Tensor) -> nn.Module:
    """The adapter's weights at one site: the gate vector, a Parameter of the weight's dtype and device."""
    holder = nn.Module()
    holder.g = nn.Parameter(torch.full((site.out_features,), spec.init, dtype=weight.dtype, device=weight.device))
    return holder


def gate_value(g: nn.Module | None, key: tuple, like: torch.Tensor, gm) -> torch.Tensor:
    """A route input's value for one adapter: its gate at the site, or ones (no change) where it has none there."""
    return g.g if g is not None else torch.ones(like.shape, dtype=like.dtype, device=next(gm.parameters()).device)


def insert_gates(gm, *, sites, paths, **_) -> int:
    """The rewrite pass: y -> y * g after every call of each site `paths` names, g the call's own route input."""
    by_name = {n.name: n for n in gm.graph.nodes}
    count = 0
    for path in paths:
        site = sites[path]
        g = route_input(gm, ("gate", path), torch.empty(site.out_features))
        for node in (by_name[n.name] for n in site.nodes):
            with gm.graph.inserting_after(node):
                out = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, g))
            node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
            count += 1
    return count


def gate_keys(path: str, holder: nn.Module):
    yield "gate", holder.g


def fold_gate(adapter, site, weight: torch.Tensor) -> torch.Tensor:
    """g * (W x + b) = (g W) x + g b: the weight's delta (g - 1) W, per output row ([out, in] for nn.Linear)."""
    g = adapter.sites[site_key(site.fqn)].g.detach().float()
    return (g[:, None] - 1) * weight.detach().float()


def fold_gate_bias(adapter, site, bias: torch.Tensor | None) -> torch.Tensor | None:
    if bias is None:
        return None
    return (adapter.sites[site_key(site.fqn)].g.detach().float() - 1) * bias.detach().float()


METHOD = peftc.Method(Gate, Gate.peft_type, gate_from_config, gate_to_config, build=build_gate,
                      rewrite=insert_gates, peft_keys=gate_keys, route_values={"gate": gate_value},
                      site_kinds=("linear",), forms=("single",), fold=fold_gate, fold_bias=fold_gate_bias)


# --- using it --------------------------------------------------------------------------------------------------------
def small_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64)).eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    hf_logging.set_verbosity_error()
    out = Path(args.out or tempfile.mkdtemp(prefix="peftc-custom-"))
    if Gate not in peftc.METHODS:
        peftc.register_method(METHOD)

    model = small_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = small_llama()
    scale = torch.linspace(0.5, 1.5, 64)
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.down_proj.weight.mul_(scale[:, None])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (8, 16), generator=g)
    with torch.no_grad():
        target = teacher(input_ids=ids).logits

    pm = peftc.compile(model, Gate(targets=("down_proj",))).train()
    opt = torch.optim.Adam(pm.trainable_parameters(), lr=0.05)
    losses = []
    for _ in range(args.steps):
        loss = (pm(input_ids=ids).logits - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pm.eval()

    pm.save_adapter(out / "gate")
    loaded = peftc.load_adapter(model, out / "gate")
    merged = pm.merge()
    x = torch.randint(0, 128, (3, 11), generator=g)
    with torch.no_grad():
        want = pm(input_ids=x).logits
        r = {"loss_before": losses[0], "loss_after": losses[-1],
             "reload_diff": (loaded(input_ids=x).logits - want).abs().max().item(),
             "merged_diff": (merged(input_ids=x).logits - want).abs().max().item(),
             "moved": (model(input_ids=x).logits - want).abs().max().item(),
             "base_unchanged": all(torch.equal(before[k], v) for k, v in model.state_dict().items()),
             "merged_ops_clean": not any(n.op == "placeholder" and "peftc_route" in n.meta
                                         for n in merged.graph_module.graph.nodes),
             "trainable": sum(p.numel() for p in pm.trainable_parameters()),
             "config": (out / "gate" / "adapter_config.json").read_text()}
    print(f"loss {r['loss_before']:.3e} -> {r['loss_after']:.3e}; {r['trainable']} gate parameters")
    print(f"reloaded: max |diff| {r['reload_diff']:.2e}; merged: max |diff| {r['merged_diff']:.2e}; "
          f"adapter moved the logits by {r['moved']:.3f}; base unchanged: {r['base_unchanged']}")
    return r


def failures(r: dict) -> list[str]:
    bad = []
    if not r["loss_after"] < 0.5 * r["loss_before"]:
        bad.append(f"loss did not halve: {r['loss_before']:.4f} -> {r['loss_after']:.4f}")
    if not r["reload_diff"] == 0.0:
        bad.append(f"reloaded adapter differs by {r['reload_diff']:.2e} (must be bit for bit)")
    if not r["merged_diff"] <= 1e-4:
        bad.append(f"merged model differs by {r['merged_diff']:.2e}")
    if not r["moved"] > 1e-3:
        bad.append("the trained gates left the logits unchanged")
    if not r["base_unchanged"] or not r["merged_ops_clean"]:
        bad.append("the base model changed, or the merged graph still takes route inputs")
    return bad


if __name__ == "__main__":
    result = main()
    problems = failures(result)
    for p in problems:
        print("FAILED:", p)
    sys.exit(1 if problems else 0)
