"""Merge and export invariants over random specs: merged == adapted, no adapter op survives a merge, and a .pt2
export -> load is the identity.

Each model is traced once (tests/test_properties.py's cache); compile gets a fresh copy of that graph.
"""
from __future__ import annotations

import functools
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from peftc.pipeline import BASE_PASSES, run_passes
from peftc.store import STORE
from tests.models import inputs, main_output
from tests.test_properties import D, base, compile_, fresh, specs

pytestmark = pytest.mark.slow      # a merge and an export per example: minutes on 2 cores

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ARCHS = ("attn", "llama", "gpt2", "bert")


def assert_close(got, want, rtol=1e-3, atol=1e-5):
    """Within rtol, atol scaled to the output's size (logits of large random adapters reach tens: ~1e-6 float
    noise of a reassociated sum is above a fixed atol there)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()))


def call(m, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        return main_output(m(**kw)) if "x" not in kw else m(kw["x"])


@st.composite
def call_inputs(draw, arch: str) -> dict:
    """Inputs at a random shape (attn: its sequence length is fixed by the trace, the batch is free)."""
    batch = draw(st.integers(1, 4))
    if arch == "attn":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        return {"x": torch.randn(batch, 5, D, generator=g)}
    return inputs(arch, batch=batch, seq=draw(st.integers(1, 12)), seed=draw(st.integers(0, 2**16)),
                  pad_row=draw(st.booleans()))


@st.composite
def adapted(draw, arch: str):
    """(pm in eval mode with random non-zero adapter weights, its spec, inputs at a random shape)."""
    spec, _ = draw(specs(arch, inits=(False,)))                     # init=False: A and B both random
    pm = compile_(arch, spec).eval()
    with torch.no_grad():                                           # trained-looking modules_to_save copies
        for p in pm.store["default"].saved.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return pm, spec, draw(call_inputs(arch))


@functools.lru_cache(maxsize=None)
def base_counts(arch: str) -> tuple[Counter, Counter]:
    """Op counts (call_function, call_module) of the base model's graph after the mode passes compile runs."""
    gm = fresh(base(arch)[1]).gm
    run_passes(gm, BASE_PASSES)
    return counts(gm)


def counts(gm) -> tuple[Counter, Counter]:
    return tuple(Counter(n.target for n in gm.graph.nodes if n.op == op) for op in ("call_function", "call_module"))


@SETTINGS
@given(data=st.data())
def test_merged_equals_adapted(data):
    arch = data.draw(st.sampled_from(ARCHS))
    pm, spec, kw = data.draw(adapted(arch))
    merged = pm.merge()
    want = call(pm, kw)
    assert_close(call(merged, kw), want)
    model = base(arch)[0]
    for path in pm.store["default"].targets:                        # the folds are not no-ops
        assert not torch.equal(merged.graph_module.get_parameter(f"{path}.weight"), model.get_parameter(f"{path}.weight"))


@SETTINGS
@given(data=st.data())
def test_merged_graph_has_no_adapter_ops(data):
    arch = data.draw(st.sampled_from(ARCHS))
    pm, spec, _ = data.draw(adapted(arch))
    gm = pm.merge().graph_module
    assert not [n.name for n in gm.graph.nodes if "peftc" in n.meta]
    assert not [n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module") and n.target.startswith(STORE)]
    assert counts(gm) == base_counts(arch)
    assert counts(pm.graph_module) != base_counts(arch)


# each example exports a program (~1 s): no shrinking, which would re-export hundreds of times on a failure
@settings(SETTINGS, max_examples=8, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_pt2_export_then_load_is_the_identity(data):
    arch = data.draw(st.sampled_from(ARCHS))
    pm, spec, kw = data.draw(adapted(arch))
    merged = data.draw(st.booleans())
    module = pm.merge() if merged else pm
    with tempfile.TemporaryDirectory() as d:
        prog = torch.export.load(module.export(Path(d) / "m.pt2") if merged else
                                 pm.export(Path(d) / "m.pt2", merged=False)).module()
    if "token_type_ids" in pm.input_names:
        kw = {**kw, "token_type_ids": torch.zeros_like(kw["input_ids"])}
    pkw = kw if "x" not in kw else {}
    with torch.no_grad():
        got = prog(kw["x"]) if "x" in kw else main_output(prog(**pkw))
    assert_close(got, call(module, kw), rtol=1e-5, atol=1e-6)
