"""Gated-activation pass: act(a) * b as one op that keeps a and b for backward, with outputs and gradients bit for bit
the two ops' own; a LoRA site reading its output (down_proj) recomputes it instead of keeping a copy."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import peftc
from peftc.passes.gated import GatedAct, fuse_gated_activations
from peftc.passes.lora.ops import LoraGroup
from peftc.trace import trace
from tests.models import inputs, main_output, make

aten = torch.ops.aten
D, I = 8, 12


class GluMlp(nn.Module):
    def __init__(self, act="silu"):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(D, I), nn.Linear(D, I), nn.Linear(I, D)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


def _saved(fn, params) -> dict[int, int]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    keep = {p.untyped_storage().data_ptr() for p in params}
    return out, {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                 if t.untyped_storage().data_ptr() not in keep and t.dim() > 0}


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_outputs_and_gradients_are_bit_for_bit_the_two_ops(act):
    model = GluMlp(act).train()
    x = torch.randn(3, 5, D)
    gm = trace(model, (x,)).gm
    assert fuse_gated_activations(gm) == 1
    gm.graph.lint()
    gm.recompile()
    assert not any(n.target in (aten.silu.default, aten.gelu.default) for n in gm.graph.nodes)
    (mod,) = [m for m in gm.modules() if isinstance(m, GatedAct)]
    assert mod.approximate == ("tanh" if act == "gelu_tanh" else "none")
    x2 = torch.randn(3, 5, D)
    for p in gm.parameters():
        p.requires_grad_(True)                                      # traced frozen; train them here
    xs = [x2.clone().requires_grad_(True) for _ in range(2)]
    got, want = gm(xs[0]), model(xs[1])
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    got.backward(g)
    want.backward(g)
    assert torch.equal(xs[0].grad, xs[1].grad)
    ours = dict(gm.named_parameters())
    assert set(ours) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(ours[name].grad, p.grad), name
    with torch.no_grad():
        assert torch.equal(gm(x2), model(x2))


def test_backward_keeps_the_two_operands_only():
    mod = GatedAct("silu")
    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    y, storages = _saved(lambda: mod(a * 1.0, b * 1.0), [])
    assert len(storages) == 2                                      # a and b, not silu(a)
    _, unfused = _saved(lambda: F.silu(a * 1.0) * (b * 1.0), [])
    assert len(unfused) == 3
    y.sum().backward()
    assert a.grad is not None and b.grad is not None


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.sampled_from(["silu", "gelu"]), st.booleans(), st.booleans())
def test_gradients_match_autograd_for_any_shape_and_grad_mode(rows, width, act, grad_a, grad_b):
    g = torch.Generator().manual_seed(rows * 31 + width)
    a = torch.randn(rows, width, generator=g, dtype=torch.double).requires_grad_(grad_a)
    b = torch.randn(rows, width, generator=g, dtype=torch.double).requires_grad_(grad_b)
    mod = GatedAct(act)
    fn = F.silu if act == "silu" else F.gelu
    got, want = mod(a, b), fn(a) * b
    assert torch.equal(got, want)
    if grad_a or grad_b:
        ga = torch.autograd.grad(got.sum(), [t for t in (a, b) if t.requires_grad])
        wa = torch.autograd.grad(want.sum(), [t for t in (a, b) if t.requires_grad])
        for x, y in zip(ga, wa):
            assert torch.equal(x, y)
    if grad_a and grad_b:
        assert torch.autograd.gradcheck(mod, (a, b))


def test_other_uses_of_the_activation_and_broadcasts_are_left_alone():
    class Reused(nn.Module):
        def forward(self, a, b):
            s = F.silu(a)
            return s * b + s

    class Broadcast(nn.Module):
        def forward(self, a, b):
            return F.silu(a) * b

    gm = trace(Reused(), (torch.randn(2, 3), torch.randn(2, 3))).gm
    assert fuse_gated_activations(gm) == 0
    gm = trace(Broadcast(), (torch.randn(2, 3), torch.randn(3))).gm
    assert fuse_gated_activations(gm) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_gated_mlps_are_fused_and_outputs_unchanged(arch):
    model = make(arch)
    pm = peftc.compile(model, peftc.LoRA(r=4, targets="all-linear"))
    fused = [m for m in pm.base_graph_module.modules() if isinstance(m, GatedAct)]
    assert len(fused) == model.config.num_hidden_layers
    batch = inputs(arch)
    with torch.no_grad(), pm.disable_adapters():
        torch.testing.assert_close(main_output(pm(**batch)), main_output(model(**batch, use_cache=False)),
                                   rtol=1e-5, atol=1e-5)


def test_down_proj_lora_recomputes_its_input_with_the_same_gradients():
    """With LoRA on down_proj the group keeps gate and up (kept for the gated op anyway), not its input; the
    gradients equal those of the same model whose group keeps its input."""
    model = make("llama").train()
    spec = peftc.LoRA(r=4, targets=["down_proj"])
    pm = peftc.compile(model, spec).train()
    groups = [m for m in pm.graph_module.modules() if isinstance(m, LoraGroup)]
    assert groups and all(g.remake is not None for g in groups)
    ref = copy.deepcopy(pm)
    for g in [m for m in ref.graph_module.modules() if isinstance(m, LoraGroup)]:
        g.remake = None                                           # keeps x, as a site on any other input does
    for m in (pm, ref):
        for w in m.store[m.active_adapter].sites.values():
            torch.manual_seed(0)
            w.B.data.normal_()
    batch = inputs("llama", pad_row=False)
    params = [*pm.parameters()]
    out, mine = _saved(lambda: main_output(pm(**batch)), params)
    out_ref, theirs = _saved(lambda: main_output(ref(**batch)), [*ref.parameters()])
    assert torch.equal(out, out_ref)
    assert sum(mine.values()) < sum(theirs.values())
    out.pow(2).mean().backward()
    out_ref.pow(2).mean().backward()
    for (n, p), (_, q) in zip(pm.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), n
