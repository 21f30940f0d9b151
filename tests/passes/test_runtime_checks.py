"""Runtime-checks pass: export's metadata asserts and no-op casts go, values and aliasing stay; real casts and
input guards stay."""
from __future__ import annotations

import torch
from torch import nn

import peftc
from peftc.passes.runtime_checks import drop_input_guards, drop_runtime_checks
from peftc.trace import trace
from tests.models import inputs, make

aten = torch.ops.aten


class Casts(nn.Module):
    def forward(self, x, ids):
        a = x.to(torch.float32)            # no-op: x is float32
        b = x.to(torch.float64)            # a real cast
        c = x.to(torch.float32, copy=True)  # asked for a copy
        return a * 2, b + 1, c, ids.to(torch.long) + 1


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def test_no_op_casts_and_asserts_go_real_casts_stay():
    x, ids = torch.randn(3, 4), torch.arange(6).view(3, 2)
    gm = trace(Casts(), (x, ids)).gm
    casts_before = _count(gm, aten.to.dtype)
    asserts_before = _count(gm, aten._assert_tensor_metadata.default)
    assert casts_before >= 3 and asserts_before >= 1
    dropped = drop_runtime_checks(gm)
    gm.graph.lint()
    gm.recompile()
    assert _count(gm, aten._assert_tensor_metadata.default) == 0
    kept = [n for n in gm.graph.nodes if n.target is aten.to.dtype]
    assert dropped == asserts_before + casts_before - len(kept)
    # the float64 cast and the copy=True cast remain
    assert {n.args[1] for n in kept} == {torch.float64, torch.float32} and len(kept) == 2
    for got, want in zip(gm(x, ids), Casts()(x, ids)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_traced_llama_computes_the_same_without_them():
    model = make("llama")
    gm = trace(model).gm
    before = len(gm.graph.nodes)
    assert drop_runtime_checks(gm) > 0
    gm.graph.lint()
    gm.recompile()
    assert len(gm.graph.nodes) < before
    kw = inputs("llama")
    with torch.no_grad():
        assert torch.equal(gm(**kw, use_cache=False).logits, model(**kw, use_cache=False).logits)


def test_compile_runs_it_first():
    pm = peftc.compile(make("llama"), peftc.LoRA(r=2, targets=["q_proj"]))
    assert pm.base_passes[0] == "runtime_checks"
    assert _count(pm.base_graph_module, aten._assert_tensor_metadata.default) == 0


def test_input_guards_go_only_when_asked():
    gm = trace(make("llama")).gm
    assert drop_runtime_checks(gm) > 0
    assert any(n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes)   # kept by that pass
    assert drop_input_guards(gm) == 1
    gm.graph.lint()
    assert not any(n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes)
