"""LoRA pass: y = W x + b  ->  y = W x + b + s B A dropout(x), at every call of every targeted site."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftc.passes.dropout import make_dropout_mode_aware
from peftc.methods import method_of
from peftc.passes.lora import RowDropout, SiteBank, insert_lora
from peftc.pipeline import _tagged
from peftc.passes.lora.ops import LoraGroup, lora_update
from peftc.passes.route import plain_route, route_keys
from peftc.passes.match import find_sites
from peftc.passes.lora import LoRA
from peftc.passes.lora.weights import LoraWeights
from peftc.store import STORE, Adapter, AdapterStore, site_key
from peftc.trace import trace
from tests.compare import assert_differs
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
    """Create `name`'s LoRA weights for `targets` (what peftc.build.build_adapter does) and add it."""
    adapter = Adapter(spec, targets, [])
    for t in targets:
        s = sites[t]
        adapter.sites[site_key(t)] = LoraWeights(spec.r, s.in_features, s.out_features, spec.scale, spec.dropout,
                                                 spec.init, dtype=torch.float32, device=torch.device("cpu"))
    store.add(name, adapter)
    return adapter


def lora_graph(model, spec: LoRA, targets, x=X, name="default", form="single"):
    """Trace `model`, add one adapter on `targets`, run insert_lora in `form`; returns (gm, adapter, rewrite count).
    Call the result with run(gm, ...)."""
    gm = trace(model, (x,) if isinstance(x, torch.Tensor) else x).gm
    sites = find_sites(gm)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    adapter = add_adapter_(store, sites, name, spec, targets)
    n = lora_pass(gm, sites, store, form)
    gm.graph.lint()
    gm.recompile()
    return gm, adapter, n


def lora_pass(gm, sites, store, form):
    """insert_lora as the pipeline runs it (peftc.pipeline.emit): its new nodes tagged with the method."""
    return _tagged(method_of(LoRA), lambda g: insert_lora(g, sites, store, form=form))(gm)


def site_outputs_read_only_by_the_subgraph(gm):
    """Every adapted linear's output is read by the LoRA subgraph only (y' = y + update replaces y downstream)."""
    mine = set(lora_nodes(gm))
    linears = [n for n in gm.graph.nodes if n.target == aten.linear.default and set(n.users) & mine]
    return linears and all(set(n.users) <= mine for n in linears), len(linears)


def run(gm, *args, who="default", rows=None, **kw):
    """Call a rewritten graph with its route: adapter `who` for every row (plain form), or per-row slots `rows`
    (gathered form)."""
    store = gm.get_submodule(STORE)
    route = [rows] if rows is not None else plain_route(gm, store, who)
    return gm(*args, **kw, peftc_route=route)


def randomize_b_(adapter: Adapter) -> None:
    with torch.no_grad():
        for w in adapter.sites.values():
            w.B.normal_()


def lora_nodes(gm):
    return [n for n in gm.graph.nodes if "peftc" in n.meta]


FORMS = ["single", "mixed"]


def rows_of(store, who, batch):
    return torch.full((batch,), store.slot(who), dtype=torch.long)


def call(gm, x, form, who="default"):
    return run(gm, x, who=who) if form == "single" else run(gm, x, rows=rows_of(gm.get_submodule(STORE), who, len(x)))


def test_plain_form_structure():
    """q, k and v read one input: one LoraGroup call for the three (one down-projection GEMM); o and head alone.
    Each site's A, B, scale and dropout rate are route inputs, not attributes."""
    model = Attn().eval()
    base = trace(model, (X,)).gm.graph.nodes
    gm, adapter, n = lora_graph(model, LoRA(r=4, alpha=8), ["q", "k", "v", "o"])
    assert n == 4 and list(adapter.sites) == ["q", "k", "v", "o"]
    nodes = list(gm.graph.nodes)
    assert sum(n.target == aten.linear.default for n in nodes) == sum(n.target == aten.linear.default for n in base)
    groups = [n for n in nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LoraGroup)]
    assert [gm.get_submodule(g.target).paths for g in groups] == [["q", "k", "v"], ["o"]]
    assert all(n.meta["peftc"]["method"] == "lora" for n in lora_nodes(gm))
    assert route_keys(gm) == [("lora", s, p) for s in ("q", "k", "v", "o") for p in ("A", "B", "s", "p")]
    assert not [n for n in lora_nodes(gm) if n.op == "get_attr"]               # no weights read from the store
    assert site_outputs_read_only_by_the_subgraph(gm) == (True, 4)
    w = adapter.sites["q"]
    assert w.A.shape == (4, D) and w.B.shape == (D, 4) and w.A.requires_grad and torch.count_nonzero(w.B) == 0


def test_gathered_form_structure():
    model = Attn().eval()
    gm, adapter, n = lora_graph(model, LoRA(r=4, alpha=8), ["q", "v"], form="mixed")
    assert n == 2
    new = lora_nodes(gm)
    assert sum(n.target == aten.bmm.default for n in new) == 2                # x A^T, per site
    assert sum(n.target == aten.baddbmm_.default for n in new) == 2            # y + h B^T, per site, one GEMM
    attrs = {n.target for n in new if n.op == "get_attr"}
    assert {f"{STORE}.adapters.default.sites.{s}.{p}" for s in ("q", "v") for p in ("A", "B")} <= attrs
    assert route_keys(gm) == [("rows",)]                                     # the rows' slots: the call's input
    assert not any(n.target == aten.where.self for n in gm.graph.nodes)
    assert {f"{STORE}.adapters.default.sites.{s}.scale_t" for s in ("q", "v")} <= attrs   # scales are data too
    banks = [m for m in gm.modules() if isinstance(m, SiteBank)]
    assert len(banks) == 2 and all(m.empty.s.item() == 0.0 for m in banks)     # slot 0 is the base model
    assert site_outputs_read_only_by_the_subgraph(gm) == (True, 2)


@pytest.mark.parametrize("form", FORMS)
def test_fresh_adapter_is_exactly_the_base_model(form):
    model = Attn().eval()
    gm, _, _ = lora_graph(model, LoRA(r=4, targets=None), ["q", "k", "v", "o", "head"], form=form)
    assert torch.equal(call(gm, X, form), model(X))
    torch.testing.assert_close(model(X), reference(X, weights(model)))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rslora", [False, True])
def test_insert_lora_numerics(rslora, form):
    model = Attn().eval()
    spec = LoRA(r=3, alpha=5.0, use_rslora=rslora)
    gm, adapter, _ = lora_graph(model, spec, ["q", "k", "o", "head"], form=form)
    randomize_b_(adapter)
    s = 5.0 / (math.sqrt(3) if rslora else 3)
    assert spec.scale == pytest.approx(s)
    w = weights(model)
    for site, lw in adapter.sites.items():
        w[site] = (w[site][0] + s * lw.B @ lw.A, w[site][1])    # W' = W + s B A
    x = torch.randn(3, 5, D)                                    # another batch size than traced
    torch.testing.assert_close(call(gm, x, form), reference(x, w), rtol=1e-5, atol=1e-5)
    with torch.no_grad():                                       # the in-place path gives the same
        torch.testing.assert_close(call(gm, x, form), reference(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_gradients_reach_adapter_weights_only(form):
    model = Attn().eval()
    gm, adapter, _ = lora_graph(model, LoRA(r=2), ["q", "v"], form=form)
    randomize_b_(adapter)
    call(gm, X, form).sum().backward()
    for lw in adapter.sites.values():
        assert lw.A.grad is not None and lw.B.grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_plain_form_gradients_equal_autograd_on_the_plain_formula():
    """The custom backward (x and h saved, nothing else) against autograd on W x + s B A x, float64, input
    gradient included; q, k and v share the down projection."""
    model = Attn().double().eval()
    x = X.double()
    gm, adapter, _ = lora_graph(model, LoRA(r=3, alpha=6), ["q", "k", "v", "o"], x=x)
    adapter.double()
    randomize_b_(adapter)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    call(gm, xs[0], "single").pow(2).sum().backward()
    got = [lw.A.grad.clone() for lw in adapter.sites.values()] + [lw.B.grad.clone() for lw in adapter.sites.values()]
    adapter.zero_grad()
    w = weights(model)
    for site, lw in adapter.sites.items():
        w[site] = (w[site][0] + 2.0 * lw.B @ lw.A, w[site][1])
    reference(xs[1], w).pow(2).sum().backward()
    want = [lw.A.grad for lw in adapter.sites.values()] + [lw.B.grad for lw in adapter.sites.values()]
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-10)


def test_lora_update_gradcheck():
    """torch.autograd.gradcheck on the group op: two sites of other ranks and widths reading one x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.double, generator=g, requires_grad=True)
    As = [torch.randn(r, 5, dtype=torch.double, generator=g, requires_grad=True) for r in (2, 3)]
    Bs = [torch.randn(o, r, dtype=torch.double, generator=g, requires_grad=True) for o, r in ((4, 2), (6, 3))]
    Ws = [torch.randn(o, 5, dtype=torch.double, generator=g) for o in (4, 6)]
    ss = [torch.tensor(0.5, dtype=torch.double), torch.tensor(2.0, dtype=torch.double)]

    def f(x, A0, A1, B0, B1):
        return lora_update(x, [F.linear(x, W) for W in Ws], [A0, A1], [B0, B1], ss)
    assert torch.autograd.gradcheck(f, (x, *As, *Bs))


def test_saved_for_backward_is_x_only():
    """What a training forward of the group keeps for backward: x (shared by q, k, v and their base layers); h is
    recomputed."""
    model = Attn().eval()
    gm, adapter, _ = lora_graph(model, LoRA(r=4), ["q", "k", "v"])
    saved = []
    x = X.clone().requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *adapter.parameters()]}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ys = lora_update(x, [F.linear(x, model.q.weight)] * 3, *[[adapter.sites[s].A for s in "qkv"],
                                                                 [adapter.sites[s].B for s in "qkv"],
                                                                 [adapter.sites[s].scale_t for s in "qkv"]])
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                if t.untyped_storage().data_ptr() not in params and t.dim() > 0}
    assert storages == {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()}
    assert len(ys) == 3


def test_dropout_in_spec_draws_in_train_mode_only():
    model = Attn().eval()
    gm, adapter, _ = lora_graph(model, LoRA(r=2, dropout=0.5), ["q"])
    calls = [n for n in lora_nodes(gm) if n.op == "call_module"]
    group = gm.get_submodule(calls[0].target)
    assert isinstance(group, LoraGroup) and group.live
    randomize_b_(adapter)
    gm.train()
    torch.manual_seed(0)
    assert_differs(run(gm, X), run(gm, X))  # dropout is live in train mode
    gm.eval()
    assert torch.equal(run(gm, X), run(gm, X))


def test_gathered_dropout_is_a_per_row_module_on_the_site_input():
    model = Attn().eval()
    gm, adapter, _ = lora_graph(model, LoRA(r=2, dropout=0.5), ["q"], form="mixed")
    calls = [n for n in lora_nodes(gm) if n.op == "call_module"]
    assert [n.target for n in calls] == ["peftc_mixed.bank0.dropout"]           # the form's own module
    assert isinstance(gm.get_submodule(calls[0].target), RowDropout)
    rates = calls[0].args[1]                                                     # the rows' rates, gathered
    assert rates.target == torch.ops.aten.index.Tensor and rates.args[0].target == torch.ops.aten.stack.default
    assert [a.target for a in rates.args[0].args[0]] == ["peftc_mixed.bank0.empty.s",
                                                         f"{STORE}.adapters.default.sites.q.p_t"]
    randomize_b_(adapter)
    gm.train()
    torch.manual_seed(0)
    assert_differs(call(gm, X, "mixed"), call(gm, X, "mixed"))
    gm.eval()
    assert torch.equal(call(gm, X, "mixed"), call(gm, X, "mixed"))


def test_no_dropout_without_dropout():
    gm, _, _ = lora_graph(Attn().eval(), LoRA(r=2, dropout=0.0), ["q"])
    assert not any(gm.get_submodule(n.target).live for n in lora_nodes(gm) if n.op == "call_module")
    gm, _, _ = lora_graph(Attn().eval(), LoRA(r=2, dropout=0.0), ["q"], form="mixed")
    assert not [n for n in lora_nodes(gm) if n.op == "call_module"]


@pytest.mark.parametrize("form", FORMS)
def test_shared_module_is_adapted_at_every_call(form):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    model = Twice().eval()
    gm, adapter, n = lora_graph(model, LoRA(r=2, alpha=2), ["lin"], x=torch.randn(2, D), form=form)
    assert n == 2 and list(adapter.sites) == ["lin"]
    assert len(route_keys(gm)) == (4 if form == "single" else 1)          # one set of inputs for both calls
    randomize_b_(adapter)
    lw = adapter.sites["lin"]
    W = model.lin.weight + lw.B @ lw.A
    x = torch.randn(4, D)
    torch.testing.assert_close(call(gm, x, form), F.linear(torch.relu(F.linear(x, W, model.lin.bias)), W,
                                                           model.lin.bias))


@pytest.mark.parametrize("form", FORMS)
def test_routing_is_data_two_adapters_of_other_ranks_and_targets(form):
    """Adapters a (r=2, on q) and b (r=3, on q and o) in one graph: the call's adapter (plain form) or its rows'
    slots (gathered form) pick the update; slot 0 is the base model; a adds nothing at o."""
    model = Attn().eval()
    gm = trace(model, (X,)).gm
    sites = find_sites(gm)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    a = add_adapter_(store, sites, "a", LoRA(r=2, alpha=2), ["q"])
    b = add_adapter_(store, sites, "b", LoRA(r=3, alpha=6), ["q", "o"])
    assert lora_pass(gm, sites, store, form) == 2
    gm.graph.lint()
    gm.recompile()
    randomize_b_(a)
    randomize_b_(b)

    def expected(x, who):
        w = weights(model)
        if who == "a":
            w["q"] = (w["q"][0] + a.sites["q"].B @ a.sites["q"].A, w["q"][1])
        if who == "b":
            for s in ("q", "o"):
                w[s] = (w[s][0] + 2.0 * b.sites[s].B @ b.sites[s].A, w[s][1])
        return reference(x, w)

    x = torch.randn(3, 5, D)
    if form == "single":
        for who in ("a", "b"):
            torch.testing.assert_close(run(gm, x, who=who), expected(x, who), rtol=1e-5, atol=1e-5)
        return
    banks = [m for m in gm.modules() if isinstance(m, SiteBank)]                # q's, then o's
    assert [m.empty.A.shape for m in banks] == [(3, D), (3, D)]              # b's rank pads a's to R=3
    for who in ("__base__", "a", "b"):
        torch.testing.assert_close(run(gm, x, rows=rows_of(store, who, 3)), expected(x, who), rtol=1e-5, atol=1e-5)
    got = run(gm, x, rows=torch.tensor([store.slot("b"), 0, store.slot("a")]))   # one adapter per row
    for i, who in enumerate(("b", "__base__", "a")):
        torch.testing.assert_close(got[i], expected(x[i:i + 1], who)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_gpt2_conv1d_site_numerics(form):
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
    assert lora_pass(gm, sites, store, form) == 2
    gm.graph.lint()
    gm.recompile()
    # Conv1D: y = addmm(b, x, W), x: [N, in]; the adapter reads addmm's second argument and adds to its output
    conv = sites[paths[0]].nodes[0]
    conv = next(n for n in gm.graph.nodes if n.name == conv.name)
    if form == "mixed":
        acc = next(next(iter(u.users)) for u in conv.users if u.target == aten.reshape.default)
        assert acc.target == aten.baddbmm_.default and acc.meta["peftc"]["method"] == "lora"
    else:
        (group,) = conv.users
        assert group.op == "call_module" and group.args[0] is conv.args[1] and group.args[1] == [conv]
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
    route = plain_route(gm, store, "default") if form == "single" else [torch.ones(3, dtype=torch.long)]
    with torch.no_grad():
        got = gm(**kw, **traced.constants, peftc_route=route).logits
        want = ref(**kw).logits
        base = model(**kw).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_differs(got, base, atol=1e-3)
