"""IA3 pass: y = W x + b  ->  y = l * (W x + b) at a target, W (l * x) + b at a feedforward target, per call or
per row; the fold rule W' = diag(l) W / W diag(l); defaults found from the graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftc.methods import method_of
from peftc.passes.ia3 import IA3, IA3Weights, down_projections, ia3_bias_delta, ia3_delta, insert_ia3
from peftc.pipeline import _tagged
from peftc.passes.match import find_sites
from peftc.passes.route import plain_route, route_keys
from peftc.store import STORE, Adapter, AdapterStore, site_key
from peftc.trace import trace

aten = torch.ops.aten
D, H, F_ = 16, 2, 32


class Block(nn.Module):
    """Attention (q, k, v, o) and an MLP (up, down), with residuals, then a head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, F_), nn.Linear(F_, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):                                           # (B, T, D)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, H, D // H).transpose(1, 2) for p in (self.q, self.k, self.v))
        h = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))
        h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)                                         # (B, T, 3)


def reference(m: Block, x, l: dict):
    """Block with IA3 vectors l[name] applied by hand: k, v outputs scaled, down's input scaled."""
    B, T, _ = x.shape
    proj = {n: getattr(m, n)(x) * l.get(n, 1) for n in "qkv"}
    q, k, v = (proj[n].view(B, T, H, D // H).transpose(1, 2) for n in "qkv")
    h = x + m.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))
    h = h + m.down(F.gelu(m.up(h)) * l.get("down", 1))
    return m.head(h)


X = torch.randn(2, 5, D)


def graph(model, specs: dict, form="single", x=X):
    """Trace, add an IA3 adapter per name in `specs` ({name: (targets, feedforward)}) with random vectors, rewrite."""
    gm = trace(model, (x,)).gm
    sites = find_sites(gm)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    g = torch.Generator().manual_seed(0)
    for name, (targets, ff) in specs.items():
        ad = Adapter(IA3(targets=targets, feedforward=ff), targets, [])
        for t in targets:
            s = sites[t]
            w = IA3Weights(s.in_features if t in ff else s.out_features, t in ff, s.kind, len(s.weight_shape), True,
                           torch.float32, torch.device("cpu"))
            with torch.no_grad():
                w.l.copy_(torch.rand(w.l.shape, generator=g) + 0.5)
            ad.sites[site_key(t)] = w
        store.add(name, ad)
    n = _tagged(method_of(IA3), lambda g: insert_ia3(g, sites, store, form=form))(gm)    # as emit runs it
    gm.graph.lint()
    gm.recompile()
    return gm, sites, store, n


def vectors(store, name) -> dict:
    return {k: w.l.detach().flatten() for k, w in store[name].sites.items()}


def test_default_roles_find_key_value_and_the_mlp_down_projection():
    sites = find_sites(trace(Block(), (X,)).gm)
    assert {p for p, s in sites.items() if s.roles & {"k", "v"}} == {"k", "v"}
    assert down_projections(sites) == ["down"]          # not up (fed by o), not head (3 != D), not o (a role)


@pytest.mark.parametrize("form", ["single", "mixed"])
def test_rewrite_scales_outputs_and_the_feedforward_input(form):
    m = Block().eval()
    gm, sites, store, n = graph(m, {"a": (["k", "v", "down"], ["down"])}, form)
    assert n == 3
    tagged = [nd for nd in gm.graph.nodes if (nd.meta.get("peftc") or {}).get("method") == "ia3"]
    down = next(nd for nd in gm.graph.nodes if nd.target is aten.linear.default and nd.args[1].target == "down.weight")
    assert down.args[0] in tagged                       # the down projection reads the scaled input
    for name in ("k.weight", "v.weight"):               # k's and v's outputs are read only by their scaling
        site = next(nd for nd in gm.graph.nodes if nd.target is aten.linear.default and nd.args[1].target == name)
        assert set(site.users) <= set(tagged)
    if form == "single":
        assert route_keys(gm) == [("ia3", "k", "out"), ("ia3", "v", "out"), ("ia3", "down", "in")]
        assert sum(o.target is aten.mul.Tensor for o in tagged) == 3
        y = gm(X, peftc_route=plain_route(gm, store, "a"))
    else:
        assert route_keys(gm) == [("rows",)]
        y = gm(X, peftc_route=[torch.tensor([1, 1])])
    lv = vectors(store, "a")
    want = reference(m, X, {"k": lv["k"], "v": lv["v"], "down": lv["down"]})
    assert (y - want).abs().max() < 1e-6
    assert (y - m(X)).abs().max() > 1e-2


def test_mixed_rows_use_their_own_adapter_and_slot_zero_is_the_base():
    m = Block().eval()
    specs = {"a": (["k", "v", "down"], ["down"]), "b": (["q", "down"], [])}   # b scales down's OUTPUT
    gm, _, store, _ = graph(m, specs, "mixed", x=torch.randn(3, 5, D))
    x = torch.randn(3, 5, D)
    y = gm(x, peftc_route=[torch.tensor([2, 0, 1])])
    la, lb = vectors(store, "a"), vectors(store, "b")
    want_a = reference(m, x, {"k": la["k"], "v": la["v"], "down": la["down"]})
    B, T, _ = x.shape
    q, k, v = (getattr(m, n)(x) * (lb["q"] if n == "q" else 1) for n in "qkv")
    q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
    h = x + m.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))
    want_b = m.head(h + m.down(F.gelu(m.up(h))) * lb["down"])
    assert (y[0] - want_b[0]).abs().max() < 1e-6
    assert (y[1] - m(x)[1]).abs().max() < 1e-6
    assert (y[2] - want_a[2]).abs().max() < 1e-6
    # the plain form of the same store: b alone, then a alone
    gm1, _, store1, _ = graph(m, specs, "single", x=torch.randn(3, 5, D))
    assert (gm1(x, peftc_route=plain_route(gm1, store1, "b"))[0] - want_b[0]).abs().max() < 1e-6
    assert (gm1(x, peftc_route=plain_route(gm1, store1, "a"))[2] - want_a[2]).abs().max() < 1e-6


def test_untargeted_model_is_not_rewritten():
    gm, _, _, n = graph(Block(), {})
    assert n == 0 and route_keys(gm) == []


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, groups=2)

    def forward(self, x):                                           # (B, 3, H, W)
        return self.c2(F.relu(self.c1(x)))


@pytest.mark.parametrize("form", ["single", "mixed"])
def test_convolutions_scale_channels(form):
    m = Convs().eval()
    x = torch.randn(2, 3, 6, 6)
    gm, _, store, _ = graph(m, {"a": (["c1", "c2"], ["c2"])}, form, x=x)
    route = plain_route(gm, store, "a") if form == "single" else [torch.tensor([1, 1])]
    l1, l2 = store["a"].sites["c1"].l, store["a"].sites["c2"].l                 # (1, 8, 1, 1) each
    assert l1.shape == (1, 8, 1, 1) and l2.shape == (1, 8, 1, 1)
    want = m.c2(F.relu(m.c1(x) * l1) * l2)
    assert (gm(x, peftc_route=route) - want).abs().max() < 1e-5


def _fold(weight, bias, w, site):
    ad = Adapter(IA3(targets=[site.fqn]), [site.fqn], [])
    ad.sites[site_key(site.fqn)] = w
    return weight + ia3_delta(ad, site, weight), ia3_bias_delta(ad, site, bias)


@pytest.mark.parametrize("feedforward", [False, True])
def test_fold_rule_linear_and_grouped_conv(feedforward):
    m = Block()
    sites = find_sites(trace(m, (X,)).gm)
    s = sites["down"]
    w = IA3Weights(s.in_features if feedforward else s.out_features, feedforward, "linear", 2, False,
                   torch.float32, torch.device("cpu"))
    W, db = _fold(m.down.weight, m.down.bias, w, s)
    x = torch.randn(4, F_)
    l = w.l.detach().flatten()
    want = m.down(x * l) if feedforward else m.down(x) * l
    b = m.down.bias + (db if db is not None else 0)
    assert (F.linear(x, W, b) - want).abs().max() < 1e-5
    assert (db is None) == feedforward                  # the input side leaves the bias alone (PEFT's merge)
    c = Convs()
    xs = torch.randn(2, 3, 6, 6)
    cs = find_sites(trace(c, (xs,)).gm)["c2"]
    wc = IA3Weights(8, feedforward, "conv", 4, False, torch.float32, torch.device("cpu"))
    Wc, dbc = _fold(c.c2.weight, c.c2.bias, wc, cs)
    h = torch.randn(2, 8, 6, 6)
    want = c.c2(h * wc.l) if feedforward else c.c2(h) * wc.l
    got = F.conv2d(h, Wc, c.c2.bias + (dbc if dbc is not None else 0), groups=2)
    assert (got - want).abs().max() < 1e-5
