"""Parity with HF PEFT: one comparison helper, the tolerance table, and ways to give either side random adapters."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.utils.other import ModulesToSaveWrapper

import peftc
from tests.models import DECODERS, inputs, main_output, make

# Largest allowed max |ours - ref| of the main output and the loss, per method, in fp32.
TOL: dict[type, float] = {
    peftc.LoRA: 1e-4,  # rsLoRA included: only the scale differs
}
# A random adapter must move the output by more than MOVED x the tolerance (a no-op adapter moves it by 0).
MOVED = 10
STD = 0.5  # of the random lora_B entries and of the noise added to modules_to_save copies

# PEFT knows no default LoRA targets for these model types; give it the query and value projections by name.
PEFT_QV = {"vit": ["q_proj", "v_proj"]}


def assert_parity(ours, ref, inputs: dict, tol: float) -> float:
    """ours(**inputs) == ref(**inputs) within `tol` on the main output and, with labels, the loss; returns the
    largest difference."""
    with torch.no_grad():
        a, b = ours(**inputs), ref(**inputs)
    x, y = main_output(a), main_output(b)
    assert x.shape == y.shape, f"output shapes differ: ours {tuple(x.shape)}, reference {tuple(y.shape)}"
    assert torch.isfinite(x).all() and torch.isfinite(y).all(), "non-finite outputs"
    diff = (x - y).abs().max().item()
    assert diff <= tol, f"main output differs by {diff:.3g} > {tol:g} at shape {tuple(x.shape)}"
    if "labels" in inputs:
        assert a["loss"] is not None and b["loss"] is not None, "a loss is missing although labels were given"
        loss_diff = (a["loss"] - b["loss"]).abs().item()
        assert loss_diff <= tol, f"loss differs by {loss_diff:.3g} > {tol:g} ({a['loss'].item()} vs {b['loss'].item()})"
        diff = max(diff, loss_diff)
    return diff


def assert_same_weights(ours, ref, name: str = "default") -> None:
    """peftc's adapter tensors equal PEFT's, key for key, shape for shape (per-layer ranks) and bit for bit (outputs
    alone can miss a small error in one layer of a model with tiny logits)."""
    a, b = ours.store.peft_state_dict(name), get_peft_model_state_dict(ref, adapter_name=name)
    # PEFT also saves a targeted embedding's own weight (save_embedding_layers="auto"): the base's, not the adapter's
    b = {k: v for k, v in b.items() if not k.endswith(".base_layer.weight")}
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    assert not only_a and not only_b, f"adapter keys differ: only peftc {only_a[:3]}, only PEFT {only_b[:3]}"
    shapes = {k: (tuple(a[k].shape), tuple(b[k].shape)) for k in a if a[k].shape != b[k].shape}
    assert not shapes, f"shapes differ (peftc, PEFT): {shapes}"
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[0]}"


def max_diff(ours, ref, inputs: dict) -> float:
    with torch.no_grad():
        return (main_output(ours(**inputs)) - main_output(ref(**inputs))).abs().max().item()


def parity_inputs(arch: str, *, labels: bool = False) -> list[dict]:
    """Inputs at two shapes other than the tracing shape (2 x 8): 3 x 11 with a left-padded row, and 1 x 5; with
    labels for the loss when asked (token labels, -100 on padding, for decoders; class labels for bert and vit)."""
    out = []
    for batch, seq, seed in ((3, 11, 1), (1, 5, 2)):
        x = inputs(arch, batch=batch, seq=seq, seed=seed, pad_row=True)
        if labels and arch in DECODERS:
            x["labels"] = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)  # (B, T)
        elif labels and arch in ("bert", "vit"):
            g = torch.Generator().manual_seed(seed)
            x["labels"] = torch.randint(0, 3 if arch == "bert" else 5, (batch,), generator=g)  # (B,)
        out.append(x)
    return out


def lora_config(arch: str, r: int = 8, alpha: float = 8.0, targets=None, use_rslora: bool = False,
                modules_to_save=(), task_type=None) -> LoraConfig:
    """PEFT's LoraConfig for the keyword arguments of peftc.LoRA (targets None: PEFT's own default targets)."""
    if targets is None:
        targets = PEFT_QV.get(arch)
    elif not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, use_rslora=use_rslora,
                      modules_to_save=list(modules_to_save) or None, task_type=task_type)


def peft_targets(model) -> set[str]:
    """Module paths (relative to the user's model) that PEFT put a LoRA layer on."""
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def randomize_ours_(pm, seed: int, std: float = STD, name: str = "default") -> None:
    """Random non-zero B at every site (A is already random), perturbed modules_to_save copies and trained token
    rows (changes `pm`)."""
    g = torch.Generator().manual_seed(seed)
    ad = pm.store[name]
    for w in ad.sites.values():
        w.B_r.copy_(torch.randn(w.B_r.shape, generator=g) * std)
    for holder in ad.saved.values():
        for p in holder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    for rows in ad.tokens.values():
        rows.delta.add_(torch.randn(rows.delta.shape, generator=g) * std)


@torch.no_grad()
def randomize_peft_(model, seed: int, std: float = STD, name: str = "default") -> None:
    """The same for a PEFT model: random lora_B, perturbed modules_to_save copies and token rows (changes `model`)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            w = m.lora_B[name].weight
            w.copy_(torch.randn(w.shape, generator=g) * std)
        elif isinstance(m, ModulesToSaveWrapper):
            for p in m.modules_to_save[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)
        elif isinstance(m, TrainableTokensLayer) and m.tied_adapter is None and name in m.trainable_tokens_delta:
            w = m.trainable_tokens_delta[name]
            w.add_(torch.randn(w.shape, generator=g) * std)


def assert_loads_and_merges(ref, directory, arch: str, tol: float = TOL[peftc.LoRA]):
    """peftc.load_adapter of PEFT model `ref`'s adapter saved in `directory` onto a fresh `arch`: the same tensors,
    an output the adapter moves, and `ref`'s outputs unmerged and merged at parity_inputs' shapes. Returns it."""
    base = make(arch)
    ours = peftc.load_adapter(base, directory)
    assert_same_weights(ours, ref)
    xs = parity_inputs(arch)
    assert max_diff(ours, base, xs[0]) > MOVED * tol, "the loaded adapter left the output unchanged"
    merged = ours.merge()
    for x in xs:
        assert_parity(ours, ref, x, tol)
        assert_parity(merged, ref, x, tol)
    return ours
