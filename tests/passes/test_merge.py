"""Merge pass: the adapter folded into the weights (W' = W + s B A; Conv1D: W + (s B A)^T), its nodes gone."""
from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

import peftc
from peftc.errors import MergeError
from peftc.passes.batchnorm import make_batchnorm_mode_aware
from peftc.passes.dropout import make_dropout_mode_aware
from peftc.passes.runtime_checks import drop_runtime_checks
from peftc.passes.merge import fold_adapter, merge_graph_module
from peftc.passes.route import plain_route
from peftc.passes.lora import LoRA
from peftc.store import STORE, site_key
from peftc.trace import trace
from tests.compare import assert_differs
from tests.models import inputs, main_output, make
from tests.parity import randomize_ours_

aten = torch.ops.aten
D, H = 16, 2
X = torch.randn(2, 5, D)


class Net(nn.Module):
    """Attention, a dropout, an MLP called twice (one site, two nodes) with a bias-free up projection, a head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.down = nn.Linear(D, 2 * D, bias=False), nn.Linear(2 * D, D)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(D, 3)

    def forward(self, x):                                           # (B, T, D)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, H, D // H).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, T, D/H)
        h = x + self.drop(self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)))
        for _ in range(2):
            h = h + self.down(F.gelu(self.up(h)))
        return self.head(h)                                         # (B, T, 3)


TARGETS = ["q", "v", "o", "up", "down", "head"]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)   # fp32: W' x vs W x + s B A x differ by rounding only


def call(gm, x, route=None):
    """A raw traced graph returns the model's outputs flattened: (y,). An adapted one takes its route too."""
    out = gm(x) if route is None else gm(x, peftc_route=route)
    return out[0] if isinstance(out, tuple) else out


def mode_passes(gm):
    drop_runtime_checks(gm)
    make_dropout_mode_aware(gm)
    make_batchnorm_mode_aware(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def op_counts(gm, op="call_function") -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == op)


def adapted_graph(model, spec: LoRA, targets):
    """The graph compile builds (trace, mode passes, LoRA) with random non-zero B; returns (gm, sites, adapter, the
    base graph it was emitted from, which merging folds into)."""
    pm = peftc.compile(model, dataclasses.replace(spec, targets=targets), example_inputs=(X,))
    randomize_ours_(pm, seed=0)
    return pm.graph_module.eval(), pm.sites, pm.store["default"], pm.base_graph_module.eval()


def assert_no_adapter_left(gm):
    assert not [n.name for n in gm.graph.nodes if "peftc" in n.meta]
    assert not [n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module") and n.target.startswith(STORE)]
    assert not hasattr(gm, STORE)


# --- the pass on a plain module -------------------------------------------------------------------------------------
def test_merge_pass_structure():
    model = Net().eval()
    base = mode_passes(trace(model, (X,)).gm)
    gm, sites, adapter, base_gm = adapted_graph(model, LoRA(r=2, alpha=4, dropout=0.1), TARGETS)
    assert op_counts(gm) != op_counts(base)
    merged = merge_graph_module(base_gm, sites, adapter, "default")
    merged.graph.lint()
    assert_no_adapter_left(merged)
    assert op_counts(merged) == op_counts(base)
    assert op_counts(merged, "call_module") == op_counts(base, "call_module")   # mode-aware dropout kept, LoRA's gone
    # fold_adapter counts one fold per site (up and down are called twice but folded once)
    again = GraphModule(base_gm, copy.deepcopy(base_gm.graph))
    assert fold_adapter(again, sites, adapter, "default") == len(TARGETS)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_adapted_and_the_folded_reference(rslora):
    model = Net().eval()
    spec = LoRA(r=3, alpha=5.0, use_rslora=rslora)
    gm, sites, adapter, base_gm = adapted_graph(model, spec, TARGETS)
    merged = merge_graph_module(base_gm, sites, adapter, "default").eval()
    assert spec.scale == pytest.approx(5.0 / (math.sqrt(3) if rslora else 3))
    ref = copy.deepcopy(model)
    with torch.no_grad():                                           # W' = W + s B A, by hand
        for t in TARGETS:
            lw = adapter.sites[t]
            ref.get_submodule(t).weight += spec.scale * lw.B @ lw.A
    x = torch.randn(4, 5, D)                                        # another batch size than traced
    with torch.no_grad():
        route = plain_route(gm, gm.get_submodule(STORE), "default")
        got, want, ref_out, base_out = call(merged, x), call(gm, x, route), ref(x), model(x)
    close(got, want)
    close(got, ref_out)
    assert_differs(got, base_out, atol=1e-2, msg="the adapter does not move the output; the test is vacuous")


def test_untargeted_weights_are_shared_targeted_are_new():
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, sites, adapter, base_gm = adapted_graph(model, LoRA(r=2), ["q", "up"])
    merged = merge_graph_module(base_gm, sites, adapter, "default")
    for name, p in model.named_parameters():
        ours, theirs = merged.get_parameter(name), gm.get_parameter(name)
        if name in ("q.weight", "up.weight"):
            assert ours.data_ptr() not in (theirs.data_ptr(), p.data_ptr()), f"{name} was folded in place"
            assert_differs(ours, p)
        else:
            assert ours.data_ptr() == theirs.data_ptr() == p.data_ptr(), f"{name} was copied"
        assert not ours.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gpt2_conv1d_folds_transposed():
    model = make("gpt2")
    base = mode_passes(trace(model).gm)
    pm = peftc.compile(model, LoRA(r=4, alpha=8, targets="all-linear", dropout=0.1)).eval()
    randomize_ours_(pm, seed=0)
    merged = pm.merge()
    assert merged.training is False
    assert_no_adapter_left(merged.graph_module)
    assert op_counts(merged.graph_module) == op_counts(base)
    assert op_counts(merged.graph_module, "call_module") == op_counts(base, "call_module")

    path = "transformer.h.1.attn.c_attn"
    lw = pm.store["default"].sites[site_key(path)]
    W = model.get_submodule(path).weight                            # Conv1D: [in, out]
    assert W.shape == (64, 192) and lw.B.shape == (192, 4)
    torch.testing.assert_close(merged.graph_module.get_parameter(f"{path}.weight"),
                               W + (pm.store["default"].spec.scale * lw.B @ lw.A).T)
    for kw in (inputs("gpt2"), inputs("gpt2", batch=1, seq=5)):
        with torch.no_grad():
            got, want, base_out = main_output(merged(**kw)), main_output(pm(**kw)), main_output(model(**kw))
        close(got, want)
        assert_differs(got, base_out, atol=1e-2)


def test_gpt2_tied_lm_head_as_a_target_leaves_the_embedding_alone():
    """GPT-2's lm_head shares its weight with the token embedding, and the traced graph reads both through one
    get_attr (lm_head.weight). Folding LoRA into lm_head must not fold it into the embedding too."""
    model = make("gpt2")
    pm = peftc.compile(model, LoRA(r=4, alpha=8, targets=["lm_head", "c_attn"])).eval()
    randomize_ours_(pm, seed=0)
    merged = pm.merge()
    kw = inputs("gpt2")
    with torch.no_grad():
        close(main_output(merged(**kw)), main_output(pm(**kw)))


# --- what merge leaves alone ------------------------------------------------------------------------------------------
def plain_pm(**kw):
    torch.manual_seed(0)
    pm = peftc.compile(Net().eval(), LoRA(r=2, alpha=4, targets=TARGETS, **kw), example_inputs=(X,)).eval()
    randomize_ours_(pm, seed=1)
    return pm


def test_merge_leaves_the_peft_module_unchanged():
    pm = plain_pm(dropout=0.1)
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        out = pm(x)
    store = {k: v.clone() for k, v in pm.store.state_dict().items()}
    code, n_nodes = pm.graph_module.code, len(pm.graph_module.graph.nodes)
    merged = pm.merge()
    assert merged is not pm and merged.graph_module is not pm.graph_module
    with torch.no_grad():
        assert torch.equal(pm(x), out)
        close(merged(x), out)
    assert pm.graph_module.code == code and len(pm.graph_module.graph.nodes) == n_nodes
    assert hasattr(pm.graph_module, STORE) and pm.adapters == ["default"]
    now = pm.store.state_dict()
    assert now.keys() == store.keys() and all(torch.equal(now[k], v) for k, v in store.items())
    assert sum(1 for n in pm.graph_module.graph.nodes if "peftc" in n.meta) > 0


def test_modes_stay_apart():
    pm = plain_pm(dropout=0.5)
    merged = pm.merge()
    x = torch.randn(3, 5, D)
    merged.train()
    assert pm.training is False and not any(m.training for m in pm.modules())
    assert all(m.training for m in merged.modules())
    with torch.no_grad():
        assert torch.equal(pm(x), pm(x))                            # pm's dropouts are still off
        assert_differs(merged(x), merged(x))  # merged's are on
    merged.eval()
    pm.train()
    assert merged.training is False and not any(m.training for m in merged.modules())
    with torch.no_grad():
        assert torch.equal(merged(x), merged(x))
    pm.eval()
    assert pm.merge().training is False
    pm.train()
    assert pm.merge().training is True                              # a merge starts in pm's mode


def test_merged_train_mode_batch_norm_updates_its_own_statistics():
    """Running the merged module in train mode must not move pm's batch-norm statistics (pm stays unchanged)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.ReLU(), nn.Linear(D, 3)).eval()
    pm = peftc.compile(model, LoRA(r=2, targets=["0", "3"]), example_inputs=(torch.randn(4, D),)).eval()
    randomize_ours_(pm, seed=1)
    x = torch.randn(6, D)
    stats = model[1].running_mean.clone()
    with torch.no_grad():
        out = pm(x)
        merged = pm.merge().train()
        merged(x * 3 + 1)                                           # updates the running statistics it uses
        assert torch.equal(pm(x), out), "a train-mode forward of the merged module changed pm's batch-norm statistics"
        assert_differs(merged.eval()(x), out, atol=1e-3, msg="the merged module's statistics did not move")
    assert torch.equal(model[1].running_mean, stats)


def test_same_inputs_output_type_and_loss():
    model = make("llama")
    pm = peftc.compile(model, LoRA(r=4)).eval()
    randomize_ours_(pm, seed=0)
    merged = pm.merge()
    assert merged.input_names == pm.input_names
    kw = inputs("llama")
    kw["labels"] = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    with torch.no_grad():
        a, b = merged(**kw), pm(**kw)
    assert type(a) is type(b)
    close(a.logits, b.logits)
    close(a.loss, b.loss)
    with torch.no_grad():
        t = merged(kw["input_ids"], kw["attention_mask"], return_dict=False)   # positional inputs, tuple output
    assert isinstance(t, tuple)
    close(t[0], b.logits)


def test_modules_to_save_copies_become_the_merged_weights():
    model = make("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftc.compile(model, LoRA(r=4, modules_to_save=["classifier"])).eval()
    randomize_ours_(pm, seed=0)                                     # random B and perturbed classifier copies
    merged = pm.merge("default")
    assert_no_adapter_left(merged.graph_module)
    names = set(model.state_dict()) | {n for n, _ in model.named_buffers()}
    assert set(merged.graph_module.state_dict()) <= names              # the model's own names, no store keys
    saved = pm.store["default"].saved["classifier"]
    for p in ("weight", "bias"):
        w = merged.graph_module.get_parameter(f"classifier.{p}")   # the model's own key name
        assert torch.equal(w, getattr(saved, p)) and not torch.equal(w, getattr(model.classifier, p))
    assert {n.target for n in merged.graph_module.graph.nodes if n.op == "get_attr"} >= {"classifier.weight",
                                                                                          "classifier.bias"}
    kw = inputs("bert")
    with torch.no_grad():
        got, want, base_out = merged(**kw).logits, pm(**kw).logits, model(**kw).logits
    close(got, want)
    assert_differs(got, base_out, atol=1e-2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("opts", [{}, dict(lora_bias=True), dict(use_dora=True)], ids=["plain", "lora_bias", "dora"])
def test_float64_model_merges_in_float64(opts):
    """A float64 model's fold (s B A, s b_B, DoRA's norms) is computed in float64: merged == unmerged to float64
    rounding (a float32 fold leaves ~1e-7 here)."""
    model = make("llama").double()
    pm = peftc.compile(model, LoRA(r=4, alpha=8, targets=["q_proj"], init=False, **opts))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_trainable_parameters():      # magnitudes off the weight norms, b_B away from zero
            p.mul_(1 + 0.3 * torch.randn_like(p)) if n.endswith("magnitude") else p.normal_(0, 0.2)
    merged = pm.merge()
    assert all(p.dtype == torch.float64 for p in merged.graph_module.parameters())
    x = inputs("llama")
    with torch.no_grad():
        got, want = main_output(merged(**x)), main_output(pm(**x))
    assert_differs(want, main_output(model(**x)), atol=1e-3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# --- errors -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_adapter_is_refused_naming_adapter_and_layer(bad):
    pm = plain_pm()
    with torch.no_grad():
        pm.store["default"].sites["down"].B[1, 0] = bad
    with pytest.raises(MergeError, match=r"adapter 'default' into layer down .*non-finite"):
        pm.merge()
    assert pm.adapters == ["default"] and hasattr(pm.graph_module, STORE)


def test_unknown_adapter_lists_the_adapters():
    pm = plain_pm()
    with pytest.raises(peftc.UnknownAdapter, match=r"unknown adapter 'other'; adapters: \['default'\]"):
        pm.merge("other")
