"""Route inputs: per-call tensors become arguments of the graph (peftc_route), for positional and keyword graphs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from peftc.passes.route import drop_route_inputs, plain_route, route_entries, route_input, route_keys, route_value
from peftc.trace import trace
from tests.models import inputs, make

aten = torch.ops.aten


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


def add_bias_input(gm):
    """y -> y + route entry ("bias",): a per-call tensor added to the output."""
    (lin,) = [n for n in gm.graph.nodes if n.target == aten.linear.default]
    b = route_input(gm, ("bias",), torch.zeros(3))
    assert route_input(gm, ("bias",), torch.zeros(3)) is b                # the same key, the same input
    with gm.graph.inserting_after(lin):
        add = gm.graph.call_function(aten.add.Tensor, (lin, b))
    lin.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    gm.graph.lint()
    gm.recompile()
    return gm


def test_positional_graph_takes_its_route_as_a_keyword():
    model = Lin()
    gm = add_bias_input(trace(model, (torch.randn(2, 4),)).gm)
    x = torch.randn(5, 4)
    assert route_keys(gm) == [("bias",)]
    (key, like), = route_entries(gm)
    assert like.device.type == "meta" and like.shape == (3,)              # a copy of the graph stays small
    torch.testing.assert_close(gm(x, peftc_route=[torch.ones(3)]), model(x) + 1)
    torch.testing.assert_close(gm(x, peftc_route=[torch.zeros(3)]), model(x))
    with pytest.raises(TypeError):
        gm(x)                                                             # the route is not optional


def test_keyword_graph_keeps_its_inputs_and_output_type():
    model = make("llama")
    traced = trace(model)
    gm = traced.gm
    (head,) = [n for n in gm.graph.nodes if n.target == aten.linear.default and "lm_head" in str(n.meta.get(
        "nn_module_stack", ""))]
    shift = route_input(gm, ("shift",), torch.zeros(()))
    with gm.graph.inserting_after(head):
        add = gm.graph.call_function(aten.add.Tensor, (head, shift))
    head.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    gm.graph.lint()
    gm.recompile()
    x = inputs("llama")
    with torch.no_grad():
        got = gm(**x, **traced.constants, peftc_route=[torch.tensor(2.0)])
        want = model(**x, use_cache=False)
    assert type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits + 2.0)


def test_drop_route_inputs_restores_the_signature():
    model = Lin()
    gm = add_bias_input(trace(model, (torch.randn(2, 4),)).gm)
    add = next(n for n in gm.graph.nodes if n.target == aten.add.Tensor)
    add.replace_all_uses_with(add.args[0])
    gm.graph.erase_node(add)
    drop_route_inputs(gm)
    gm.graph.lint()
    gm.recompile()
    x = torch.randn(3, 4)
    assert route_keys(gm) == [] and torch.equal(gm(x), model(x))


def test_drop_refuses_a_route_still_in_use():
    gm = add_bias_input(trace(Lin(), (torch.randn(2, 4),)).gm)
    with pytest.raises(AssertionError, match="still used"):
        drop_route_inputs(gm)


def test_plain_route_looks_values_up_by_kind_and_rejects_unknown_kinds():
    gm = add_bias_input(trace(Lin(), (torch.randn(2, 4),)).gm)
    with pytest.raises(KeyError, match="no route value registered for \\('bias',\\)"):
        plain_route(gm, None, "a")
    with pytest.raises(ValueError, match="registered already"):
        route_value("lora")(lambda *a: None)
