"""LoRA pass: y = W x + b  ->  y = W x + b + s B A dropout(x), at every call of every targeted site."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftc.passes.dropout import make_dropout_mode_aware
from peftc.passes.lora import insert_lora
from peftc.passes.match import find_sites
from peftc.spec import LoRA
from peftc.store import STORE, Adapter, AdapterStore, site_key
from peftc.trace import trace
from tests.models import inputs, make

aten = torch.ops.aten
D, H = 16, 2


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.head = nn.Linear(D, 3)

    def forward(self, x):                                           # (B, T, D)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, H, D // H).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        return self.head(torch.tanh(self.o(a)))


def reference(x, w):
    """Attn as a function of its weights, w[name] = (W [out, in], b): the expected result of a rewrite."""
    B, T, _ = x.shape
    q, k, v = (F.linear(x, *w[n]).view(B, T, H, D // H).transpose(1, 2) for n in "qkv")  # (B, H, T, D/H)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
    return F.linear(torch.tanh(F.linear(a, *w["o"])), *w["head"])  # (B, T, 3)


def weights(model):
    return {n: (m.weight, m.bias) for n, m in model.named_children()}


X = torch.randn(2, 5, D)


def lora_graph(model, spec: LoRA, targets, x=X, name="default"):
    """Trace `model`, run insert_lora on `targets`; returns (gm, adapter, rewrite count)."""
    gm = trace(model, (x,) if isinstance(x, torch.Tensor) else x).gm
    sites = find_sites(gm)
    adapter = Adapter(spec, targets, [])
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    store.add(name, adapter)
    n = insert_lora(gm, sites, spec, adapter, name)
    gm.graph.lint()
    gm.recompile()
    return gm, adapter, n


def randomize_b_(adapter: Adapter) -> None:
    with torch.no_grad():
        for w in adapter.sites.values():
            w.B.normal_()


def lora_nodes(gm):
    return [n for n in gm.graph.nodes if "peftc" in n.meta]


def test_insert_lora_structure():
    model = Attn().eval()
    base_linears = sum(n.target == aten.linear.default for n in trace(model, (X,)).gm.graph.nodes)
    gm, adapter, n = lora_graph(model, LoRA(r=4, alpha=8), ["q", "v"])
    assert n == 2
    assert list(adapter.sites) == ["q", "v"]
    nodes = gm.graph.nodes
    assert sum(n.target == aten.linear.default for n in nodes) == base_linears + 2 * 2
    new = lora_nodes(gm)
    assert len(new) == 2 * 6                                    # get_attr A, B, linear, linear, mul, add per site
    assert {tuple(sorted(n.meta["peftc"].items())) for n in new} == {
        (("adapter", "default"), ("method", "lora"), ("site", s)) for s in ("q", "v")}
    attrs = sorted(n.target for n in new if n.op == "get_attr")
    assert attrs == [f"{STORE}.adapters.default.sites.{s}.{p}" for s in ("q", "v") for p in ("A", "B")]
    for n in new:
        if n.target == aten.mul.Tensor:
            assert n.args[1] == 2.0                             # alpha / r
    # the site's old users now read the adapted output; the old linear feeds only the add
    add = next(n for n in new if n.target == aten.add.Tensor and n.meta["peftc"]["site"] == "q")
    assert len(add.args[0].users) == 1 and add.args[0].target == aten.linear.default
    w = adapter.sites["q"]
    assert w.A.shape == (4, D) and w.B.shape == (D, 4) and w.A.requires_grad and w.B.requires_grad
    assert torch.count_nonzero(w.B) == 0


def test_fresh_adapter_is_exactly_the_base_model():
    model = Attn().eval()
    gm, _, _ = lora_graph(model, LoRA(r=4, targets=None), ["q", "k", "v", "o", "head"])
    assert torch.equal(gm(X), model(X))
    torch.testing.assert_close(model(X), reference(X, weights(model)))


@pytest.mark.parametrize("rslora", [False, True])
def test_insert_lora_numerics(rslora):
    model = Attn().eval()
    spec = LoRA(r=3, alpha=5.0, use_rslora=rslora)
    gm, adapter, _ = lora_graph(model, spec, ["q", "o", "head"])
    randomize_b_(adapter)
    s = 5.0 / (math.sqrt(3) if rslora else 3)
    assert spec.scale == pytest.approx(s)
    w = weights(model)
    for site, lw in adapter.sites.items():
        w[site] = (w[site][0] + s * lw.B @ lw.A, w[site][1])    # W' = W + s B A
    x = torch.randn(3, 5, D)                                    # another batch size than traced
    torch.testing.assert_close(gm(x), reference(x, w), rtol=1e-5, atol=1e-5)


def test_gradients_reach_adapter_weights_only():
    model = Attn().eval()
    gm, adapter, _ = lora_graph(model, LoRA(r=2), ["v"])
    randomize_b_(adapter)
    gm(X).sum().backward()
    lw = adapter.sites["v"]
    assert lw.A.grad is not None and lw.B.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_dropout_in_spec_wraps_the_site_input():
    model = Attn().eval()
    gm, adapter, _ = lora_graph(model, LoRA(r=2, dropout=0.5), ["q"])
    calls = [n for n in lora_nodes(gm) if n.op == "call_module"]
    assert [n.target for n in calls] == [f"{STORE}.adapters.default.sites.q.dropout"]
    assert isinstance(gm.get_submodule(calls[0].target), nn.Dropout)
    assert calls[0].args[0].op == "placeholder"                 # dropout(x), x being q's input
    randomize_b_(adapter)
    gm.train()
    torch.manual_seed(0)
    a = gm(X)
    b = gm(X)
    assert not torch.equal(a, b)                                # dropout is live in train mode
    gm.eval()
    assert torch.equal(gm(X), gm(X))


def test_no_dropout_module_without_dropout():
    gm, _, _ = lora_graph(Attn().eval(), LoRA(r=2, dropout=0.0), ["q"])
    assert not [n for n in lora_nodes(gm) if n.op == "call_module"]


def test_shared_module_is_adapted_at_every_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    model = Twice().eval()
    gm, adapter, n = lora_graph(model, LoRA(r=2, alpha=2), ["lin"], x=torch.randn(2, D))
    assert n == 2 and list(adapter.sites) == ["lin"]
    assert sum(n.target == aten.add.Tensor for n in lora_nodes(gm)) == 2
    randomize_b_(adapter)
    lw = adapter.sites["lin"]
    W = model.lin.weight + lw.B @ lw.A
    x = torch.randn(4, D)
    torch.testing.assert_close(gm(x), F.linear(torch.relu(F.linear(x, W, model.lin.bias)), W, model.lin.bias))


def test_two_adapters_in_one_store_add_up():
    model = Attn().eval()
    gm = trace(model, (X,)).gm
    sites = find_sites(gm)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    for name, r in (("a", 2), ("b", 3)):
        store.add(name, Adapter(LoRA(r=r, alpha=r), ["q"], []))
        assert insert_lora(gm, sites, LoRA(r=r, alpha=r), store[name], name) == 1
    gm.graph.lint()
    gm.recompile()
    for name in ("a", "b"):
        randomize_b_(store[name])
    w = weights(model)
    qa, qb = store["a"].sites["q"], store["b"].sites["q"]
    w["q"] = (w["q"][0] + qa.B @ qa.A + qb.B @ qb.A, w["q"][1])
    torch.testing.assert_close(gm(X), reference(X, w), rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_site_numerics():
    model = make("gpt2")
    paths = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    traced = trace(model)
    gm = traced.gm
    make_dropout_mode_aware(gm)                                 # gpt2 traces with train-mode dropout (see test_dropout)
    sites = find_sites(gm)
    spec = LoRA(r=4, alpha=8)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    store.add("default", Adapter(spec, paths, []))
    assert insert_lora(gm, sites, spec, store["default"], "default") == 2
    gm.graph.lint()
    gm.recompile()
    # Conv1D: y = addmm(b, x, W), x: [N, in]; the adapter reads addmm's second argument and adds to its output
    conv = sites[paths[0]].nodes[0]
    (add,) = conv.users
    assert add.target == aten.add.Tensor and add.meta["peftc"]["site"] == paths[0]
    a_lin = next(n for n in lora_nodes(gm) if n.target == aten.linear.default and n.meta["peftc"]["site"] == paths[0])
    assert a_lin.args[0] is conv.args[1]
    weights = [store["default"].sites[site_key(p)] for p in paths]
    assert weights[0].A.shape == (4, 64) and weights[0].B.shape == (192, 4)
    assert weights[1].A.shape == (4, 64) and weights[1].B.shape == (256, 4)
    randomize_b_(store["default"])

    ref = copy.deepcopy(model)
    with torch.no_grad():                                       # Conv1D keeps W as [in, out]: add (s B A)^T
        for p, lw in zip(paths, weights):
            ref.get_submodule(p).weight += (spec.scale * lw.B @ lw.A).T
    kw = inputs("gpt2", batch=3, seq=6)
    gm.eval()
    with torch.no_grad():
        got = gm(**kw, **traced.constants).logits
        want = ref(**kw).logits
        base = model(**kw).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)
