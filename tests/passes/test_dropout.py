"""Dropout pass: dropouts traced in train mode follow the module's train()/eval() mode afterwards."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftc.passes.dropout import ModeAwareDropout, ModeAwareSDPA, make_dropout_mode_aware
from peftc.trace import trace
from tests.compare import assert_differs
from tests.models import inputs, make

aten = torch.ops.aten
D, H = 16, 2


class Net(nn.Module):
    """nn.Dropout(0.5), nn.Dropout(0.0), a functional eval-mode dropout, SDPA with and without dropout_p."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.drop, self.zero = nn.Dropout(0.5), nn.Dropout(0.0)

    def forward(self, x):                                           # (B, T, D)
        return reference(x, self.inp, self.out, self.training)


def reference(x, inp, out, training: bool):
    B, T, _ = x.shape
    h = F.dropout(inp(x), 0.5, training)
    h = F.dropout(h, 0.0, training)
    h = F.dropout(h, 0.3, training=False)
    q = h.view(B, T, H, D // H).transpose(1, 2)                     # (B, H, T, D/H)
    a = F.scaled_dot_product_attention(q, q, q, dropout_p=0.25 if training else 0.0)
    a = a + F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return out(a.transpose(1, 2).reshape(B, T, D))


X = torch.randn(2, 5, D)


def rewritten(model):
    gm = trace(model.eval(), (X,)).gm
    n = make_dropout_mode_aware(gm)
    gm.graph.lint()
    gm.recompile()
    return gm, n


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


def test_traced_graph_bakes_train_mode_dropout_in():
    model = Net().eval()
    gm = trace(model, (X,)).gm
    drops = [n.args for n in gm.graph.nodes if n.target == aten.dropout.default]
    assert [a[1:] for a in drops] == [(0.5, True), (0.0, True), (0.3, False)]
    assert model.training is False                              # traced in train mode, mode restored
    gm.eval()
    torch.manual_seed(0)
    assert_differs(gm(X), gm(X))  # without the pass, eval() changes nothing


def test_pass_structure():
    gm, n = rewritten(Net())
    assert n == 4                                               # 3 dropouts + 1 SDPA with dropout_p
    t = targets(gm)
    assert aten.dropout.default not in t
    assert [x for x in t if isinstance(x, str) and x.startswith("peftc_")] == ["peftc_dropout_0", "peftc_sdpa_3"]
    drop = gm.get_submodule("peftc_dropout_0")
    assert isinstance(drop, ModeAwareDropout) and drop.p == 0.5 and drop.op is aten.dropout.default
    assert isinstance(gm.get_submodule("peftc_sdpa_3"), ModeAwareSDPA)
    sdpa_call = next(n for n in gm.graph.nodes if n.target == "peftc_sdpa_3")
    assert sdpa_call.kwargs["dropout_p"] == 0.25
    assert "val" in sdpa_call.meta                              # meta kept for later passes
    assert t.count(aten.scaled_dot_product_attention.default) == 1  # the dropout-free SDPA is left alone


def test_eval_is_exactly_the_base_model():
    model = Net().eval()
    gm, _ = rewritten(model)
    gm.eval()
    x = torch.randn(3, 5, D)
    assert torch.equal(gm(x), model(x))
    assert torch.equal(gm(x), reference(x, model.inp, model.out, training=False))


def test_train_is_stochastic_and_matches_the_model_in_train_mode():
    model = Net()
    gm, _ = rewritten(model)
    gm.train()
    torch.manual_seed(0)
    a, b = gm(X), gm(X)
    assert_differs(a, b)
    model.train()
    torch.manual_seed(0)
    ref = model(X)
    model.eval()
    torch.testing.assert_close(a, ref)                          # same RNG draws in the same order


def test_mode_aware_sdpa():
    q = torch.randn(2, H, 5, D // H)
    m = ModeAwareSDPA()
    m.eval()
    assert torch.equal(m(q, q, q, None, 0.9), F.scaled_dot_product_attention(q, q, q))
    m.train()
    torch.manual_seed(0)
    assert_differs(m(q, q, q, None, 0.9), m(q, q, q, None, 0.9))


def test_graph_without_dropout_is_unchanged():
    mlp = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
    gm = trace(mlp, (X,)).gm
    before = targets(gm)
    assert make_dropout_mode_aware(gm) == 0
    gm.graph.lint()
    assert targets(gm) == before


def test_gpt2_dropouts_and_sdpa_become_mode_aware():
    model = make("gpt2")                                        # resid/embd/attn dropout 0.1
    traced = trace(model)
    gm = traced.gm
    n = make_dropout_mode_aware(gm)
    gm.graph.lint()
    gm.recompile()
    t = targets(gm)
    assert aten.dropout.default not in t
    assert aten.scaled_dot_product_attention.default not in t
    sdpa = [x for x in t if isinstance(x, str) and x.startswith("peftc_sdpa_")]
    drops = [x for x in t if isinstance(x, str) and x.startswith("peftc_dropout_")]
    assert len(sdpa) == 2                                       # one per layer
    assert len(drops) == 1 + 2 * 2                              # embeddings + (attn residual, mlp) per layer
    assert n == len(sdpa) + len(drops)
    kw = {**inputs("gpt2"), **traced.constants}
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(**kw).logits, model(**inputs("gpt2")).logits)
        gm.train()
        torch.manual_seed(0)
        a, b = gm(**kw).logits, gm(**kw).logits
    assert_differs(a, b)


@pytest.mark.parametrize("drop", [nn.Dropout2d(0.5), nn.Dropout(0.5, inplace=True),
                                  nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.5)],
                         ids=lambda d: f"{type(d).__name__}{'-inplace' if getattr(d, 'inplace', False) else ''}")
def test_every_dropout_kind_is_off_in_eval(drop):
    model = nn.Sequential(nn.Linear(6, 6), drop).eval()
    gm = trace(model, (torch.randn(2, 4, 5, 6),)).gm
    make_dropout_mode_aware(gm)
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    x = torch.randn(3, 4, 5, 6)
    assert torch.equal(gm(x), model(x))


def test_feature_dropout_stays_channelwise_in_train_mode():
    """nn.Dropout2d zeroes whole channels (dim 1); the mode-aware replacement must too."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout2d(0.5))
    gm = trace(model, (torch.randn(2, 4, 5, 6),)).gm                # (N, C, H, W)
    make_dropout_mode_aware(gm)
    gm.graph.lint()
    gm.recompile()
    gm.train()
    torch.manual_seed(0)
    zero = (gm(torch.randn(8, 4, 5, 6)) == 0).flatten(2)            # (N, C, H*W)
    assert zero.any()
    assert (zero.all(-1) | ~zero.any(-1)).all()                    # each channel all dropped or all kept
