"""Invariants over random specs: zero-init is the identity, save -> load is the identity, valid specs compile and run.

Each model is traced once; compile gets a fresh copy of that graph (weights still shared) instead of re-tracing.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
import tempfile
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peftc
from peftc.passes.match import find_sites
from peftc.trace import trace
from tests.models import inputs, main_output, make

D, H = 16, 2
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.head = nn.Linear(D, 2 * D), nn.Linear(2 * D, 4)

    def forward(self, x):                                           # (B, T, D)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, H, D // H).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        return self.head(F.gelu(self.up(x + self.o(a))))           # (B, T, 4)


ARCHS = ("attn", "llama", "gpt2")


@functools.lru_cache(maxsize=None)
def base(arch: str):
    """(model, traced, sites, inputs for compile, call inputs, base output): built and traced once."""
    if arch == "attn":
        torch.manual_seed(0)
        model, example = Attn().eval(), (torch.randn(2, 5, D),)
        kw = {"x": torch.randn(3, 5, D)}
    else:
        model, example = make(arch), None
        kw = inputs(arch, batch=2, seq=4)
    traced = trace(model, example)
    with torch.no_grad():
        out = run(model, kw)
    return model, traced, find_sites(traced.gm), example, kw, out


def run(m, kw):
    return main_output(m(**kw)) if "x" not in kw else m(kw["x"])


def fresh(traced):
    """A copy of the traced graph, as a new trace would give: own nodes and modules, the model's weights."""
    memo = {id(t): t for t in (*traced.gm.parameters(), *traced.gm.buffers())}
    return dataclasses.replace(traced, gm=copy.deepcopy(traced.gm, memo))


@contextmanager
def traced_once(arch: str):
    _, traced, *_ = base(arch)
    with mock.patch("peftc.pipeline.trace", lambda model, example_inputs=None: fresh(traced)):
        yield


def compile_(arch: str, spec):
    model, _, _, example, _, _ = base(arch)
    with traced_once(arch):
        return peftc.compile(model, spec, example_inputs=example)


@st.composite
def specs(draw, arch: str, inits=(True, False, "gaussian")):
    """A valid LoRA spec for `arch`: targets in every accepted form, r within the chosen layers' sizes."""
    _, traced, sites, *_ = base(arch)
    names = sorted({s.name for s in sites.values()})
    form = draw(st.sampled_from(["none", "all-linear", "names", "regex", "paths"]))
    if form == "none":
        targets = None
        chosen = [f for f, s in sites.items() if s.roles & {"q", "v"}]
    elif form == "all-linear":
        targets = "all-linear"
        chosen = [f for f, s in sites.items() if s.linear_like and f not in ("lm_head", "head")]
    else:
        pool = names if form != "paths" else sorted(sites)
        picked = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True))
        if form == "regex":
            targets = rf"(.*\.)?({'|'.join(map(re.escape, picked))})"
        else:
            targets = picked
        chosen = [f for f in sites if any(f == p or f.endswith("." + p) for p in picked)]
    max_r = min(min(sites[f].in_features, sites[f].out_features) for f in chosen)
    heads = [h for h in ("head", "lm_head") if h in sites and h not in chosen]      # gpt2: tied lm_head
    linear_only = all(sites[f].linear_like for f in chosen)             # DoRA, lora_bias: not on embeddings
    use_dora = draw(st.booleans()) if linear_only else False
    return peftc.LoRA(
        use_dora=use_dora,
        lora_bias=draw(st.booleans()) if linear_only and not use_dora else False,
        r=draw(st.integers(1, min(max_r, 12))),
        alpha=draw(st.sampled_from([1, 8, 16.0, 0.5, -4, 64])),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.5])),
        targets=targets,
        use_rslora=draw(st.booleans()),
        modules_to_save=draw(st.sampled_from([(), tuple(heads)])),
        init=draw(st.sampled_from(inits)),
    ), chosen


@SETTINGS
@given(data=st.data())
def test_zero_init_adapter_is_the_identity(data):
    arch = data.draw(st.sampled_from(ARCHS))
    spec, chosen = data.draw(specs(arch, inits=(True, "gaussian")))
    model, _, _, _, kw, want = base(arch)
    pm = compile_(arch, spec)
    assert pm.store["default"].targets == chosen
    with torch.no_grad():
        assert torch.equal(run(pm, kw), want)


@SETTINGS
@given(data=st.data())
def test_save_then_load_is_the_identity(data):
    arch = data.draw(st.sampled_from(ARCHS))
    spec, chosen = data.draw(specs(arch, inits=(False,)))
    model, _, _, example, kw, _ = base(arch)
    pm = compile_(arch, spec)
    with torch.no_grad():                                       # trained-looking saved copies, not the base weights
        for ad in pm.store["default"].saved.values():
            for p in ad.parameters():
                p.add_(torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d, traced_once(arch):
        pm.save_adapter(d)
        loaded = peftc.load_adapter(model, d, example_inputs=example)
    assert loaded.store["default"].targets == chosen
    ours = dict(pm.store.peft_parameters("default"))
    theirs = dict(loaded.store.peft_parameters("default"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    pm.eval()
    with torch.no_grad():
        assert torch.equal(run(loaded, kw), run(pm, kw))


@SETTINGS
@given(data=st.data())
def test_any_valid_spec_compiles_and_trains(data):
    arch = data.draw(st.sampled_from(ARCHS))
    spec, chosen = data.draw(specs(arch))
    model, _, sites, _, kw, want = base(arch)
    pm = compile_(arch, spec)
    ad = pm.store["default"]
    assert ad.targets == chosen
    per_channel = spec.use_dora or spec.lora_bias                       # a magnitude or a bias per output channel
    n_lora = sum(spec.r * (sites[f].in_features + sites[f].out_features) + per_channel * sites[f].out_features
                 for f in chosen)
    n_saved = sum(p.numel() for m in spec.modules_to_save for p in model.get_submodule(m).parameters())
    assert sum(p.numel() for p in pm.trainable_parameters()) == n_lora + n_saved
    pm.train()
    out = run(pm, kw)
    assert out.shape == want.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in pm.trainable_parameters())
    assert all(p.grad is None for p in model.parameters())
