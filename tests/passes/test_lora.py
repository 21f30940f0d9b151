"""LoRA pass: y = W x + b  ->  y = W x + b + s B A dropout(x), at every call of every targeted site."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftc.passes.dropout import make_dropout_mode_aware
from peftc.passes.lora import RowDropout, base_output, insert_lora
from peftc.passes.match import find_sites
from peftc.spec import LoRA
from peftc.store import STORE, Adapter, AdapterStore, LoraWeights, site_key
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


def add_adapter_(store: AdapterStore, sites, name: str, spec: LoRA, targets) -> Adapter:
    """Create `name`'s LoRA weights for `targets` (what peftc.compiler.build_adapter does) and add it."""
    adapter = Adapter(spec, targets, [])
    for t in targets:
        s = sites[t]
        adapter.sites[site_key(t)] = LoraWeights(spec.r, s.in_features, s.out_features, spec.scale, spec.dropout,
                                                 spec.init, dtype=torch.float32, device=torch.device("cpu"))
    store.add(name, adapter)
    return adapter


def lora_graph(model, spec: LoRA, targets, x=X, name="default"):
    """Trace `model`, add one adapter on `targets`, run insert_lora; returns (gm, adapter, rewrite count)."""
    gm = trace(model, (x,) if isinstance(x, torch.Tensor) else x).gm
    sites = find_sites(gm)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    adapter = add_adapter_(store, sites, name, spec, targets)
    store.active.fill_(store.slot(name))
    n = insert_lora(gm, sites, store)
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
    base = trace(model, (X,)).gm.graph.nodes
    gm, adapter, n = lora_graph(model, LoRA(r=4, alpha=8), ["q", "v"])
    assert n == 2
    assert list(adapter.sites) == ["q", "v"]
    nodes = list(gm.graph.nodes)
    assert sum(n.target == aten.linear.default for n in nodes) == sum(n.target == aten.linear.default for n in base)
    new = lora_nodes(gm)
    assert all(n.meta["peftc"]["method"] == "lora" for n in new)
    assert sum(n.target == aten.bmm.default for n in new) == 2                # x A^T, per site
    assert sum(n.target == aten.baddbmm_.default for n in new) == 2            # y + h B^T, per site, one GEMM
    attrs = {n.target for n in new if n.op == "get_attr"}
    assert {f"{STORE}.adapters.default.sites.{s}.{p}" for s in ("q", "v") for p in ("A", "B")} <= attrs
    assert {f"{STORE}.active", f"{STORE}.mixed", f"{STORE}.rows"} <= attrs  # the routing is read, not built in
    gm_store = gm.get_submodule(STORE)
    assert gm_store.banks["q"].scales.tolist() == [0.0, 2.0]                # slot 0 is the base model; alpha / r
    # the site's old users now read the adapted output ("out"), whose base output is the old linear
    outs = [n for n in new if n.meta["peftc"]["role"] == "out"]
    assert len(outs) == 2 and all(base_output(o).target == aten.linear.default for o in outs)
    assert all(set(base_output(o).users) <= set(new) for o in outs)   # only the subgraph reads the old output
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


def test_dropout_in_spec_is_a_per_row_module_on_the_site_input():
    model = Attn().eval()
    gm, adapter, _ = lora_graph(model, LoRA(r=2, dropout=0.5), ["q"])
    calls = [n for n in lora_nodes(gm) if n.op == "call_module"]
    assert [n.target for n in calls] == [f"{STORE}.banks.q.dropout"]
    assert isinstance(gm.get_submodule(calls[0].target), RowDropout)
    assert gm.get_submodule(calls[0].target).rates.tolist() == [0.0, 0.5]
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
    assert sum(n.target == aten.baddbmm_.default for n in lora_nodes(gm)) == 2
    randomize_b_(adapter)
    lw = adapter.sites["lin"]
    W = model.lin.weight + lw.B @ lw.A
    x = torch.randn(4, D)
    torch.testing.assert_close(gm(x), F.linear(torch.relu(F.linear(x, W, model.lin.bias)), W, model.lin.bias))


def test_routing_is_data_two_adapters_of_other_ranks_and_targets():
    """Adapters a (r=2, on q) and b (r=3, on q and o) in one graph: the active slot or the per-row slots pick the
    update; slot 0 is the base model; b's rank pads a's to R=3; a adds nothing at o."""
    model = Attn().eval()
    gm = trace(model, (X,)).gm
    sites = find_sites(gm)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    a = add_adapter_(store, sites, "a", LoRA(r=2, alpha=2), ["q"])
    b = add_adapter_(store, sites, "b", LoRA(r=3, alpha=6), ["q", "o"])
    assert insert_lora(gm, sites, store) == 2
    gm.graph.lint()
    gm.recompile()
    randomize_b_(a)
    randomize_b_(b)
    assert gm.get_submodule(STORE).banks["q"].empty.A.shape == (3, D)
    assert gm.get_submodule(STORE).banks["o"].scales.tolist() == [0.0, 0.0, 2.0]

    def expected(x, who):
        w = weights(model)
        if who == "a":
            w["q"] = (w["q"][0] + a.sites["q"].B @ a.sites["q"].A, w["q"][1])
        if who == "b":
            for s in ("q", "o"):
                w[s] = (w[s][0] + 2.0 * b.sites[s].B @ b.sites[s].A, w[s][1])
        return reference(x, w)

    x = torch.randn(3, 5, D)
    for who in ("__base__", "a", "b"):
        store.active.fill_(store.slot(who))
        torch.testing.assert_close(gm(x), expected(x, who), rtol=1e-5, atol=1e-5)
    store.rows[:3] = torch.tensor([store.slot("b"), 0, store.slot("a")])   # one adapter per row
    store.mixed.fill_(True)
    got = gm(x)
    for i, who in enumerate(("b", "__base__", "a")):
        torch.testing.assert_close(got[i], expected(x[i:i + 1], who)[0], rtol=1e-5, atol=1e-5)


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
    add_adapter_(store, sites, "default", spec, paths)
    store.active.fill_(1)
    assert insert_lora(gm, sites, store) == 2
    gm.graph.lint()
    gm.recompile()
    # Conv1D: y = addmm(b, x, W), x: [N, in]; the adapter reads addmm's second argument and adds to its output
    conv = sites[paths[0]].nodes[0]
    acc = next(next(iter(u.users)) for u in conv.users if u.target == aten.reshape.default)
    assert acc.target == aten.baddbmm_.default and acc.meta["peftc"]["method"] == "lora"
    x3 = next(u for u in conv.args[1].users if u.target == aten.reshape.default and "peftc" in u.meta)
    assert x3.args[1][1:] == [-1, 64]                           # (N, in) -> (batch, N / batch, in)
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
