"""run_passes: lint + recompile after each pass; a failure names the pass and the passes that ran before it."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import peftc
from peftc.pipeline import run_passes
from peftc.trace import trace

aten = torch.ops.aten


MODEL = nn.Sequential(nn.Linear(4, 4), nn.ReLU())


def small_gm():
    return trace(MODEL, (torch.randn(2, 4),)).gm


def relu_to_gelu(gm) -> int:
    n = 0
    for node in gm.graph.nodes:
        if node.target == aten.relu.default:
            node.target = aten.gelu.default
            n += 1
    return n


def boom(gm) -> int:
    raise RuntimeError("boom")


def break_graph(gm) -> int:
    """Leaves a node that uses a value defined after it: only graph.lint() notices."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0][0]
    with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        gm.graph.call_function(aten.neg.default, (last,))
    return 1


def test_passes_run_in_order_and_return_counts():
    gm = small_gm()
    x = torch.randn(3, 4)
    assert run_passes(gm, [("gelu", relu_to_gelu), ("noop", lambda g: 0)]) == {"gelu": 1, "noop": 0}
    assert "gelu" in gm.code                                    # recompiled after the pass
    torch.testing.assert_close(gm(x), torch.nn.functional.gelu(MODEL[0](x)))


def test_failing_pass_names_itself_and_the_passes_before():
    with pytest.raises(peftc.PassError, match=r"pass 'boom' failed \(passes that ran before it: gelu, noop\).*"
                                              r"RuntimeError: boom") as e:
        run_passes(small_gm(), [("gelu", relu_to_gelu), ("noop", lambda g: 0), ("boom", boom), ("never", boom)])
    assert isinstance(e.value.__cause__, RuntimeError)


def test_first_pass_failing_says_none_ran_before():
    with pytest.raises(peftc.PassError, match=r"pass 'boom' failed \(passes that ran before it: none\)"):
        run_passes(small_gm(), [("boom", boom)])


def test_lint_failure_is_blamed_on_the_pass_that_broke_the_graph():
    with pytest.raises(peftc.PassError, match=r"pass 'break' failed \(passes that ran before it: gelu\)"):
        run_passes(small_gm(), [("gelu", relu_to_gelu), ("break", break_graph)])


def test_compile_reports_a_failing_builtin_pass(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(gm, **kw):
        raise KeyError("site")

    monkeypatch.setitem(peftc.METHODS, peftc.LoRA, dataclasses.replace(peftc.METHODS[peftc.LoRA], rewrite=broken))
    with pytest.raises(peftc.PassError, match=r"pass 'lora' failed \(passes that ran before it: runtime_checks, dropout, batchnorm, sdpa_mask, gated\)"):
        peftc.compile(model, peftc.LoRA(r=1, targets=["0"]), example_inputs=(torch.randn(2, 4),))
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "peftc_store")
