"""Merge and export invariants over random specs: no adapter op survives a merge, and a .pt2 export -> load is the
identity (merged == unmerged itself is a property in tests/test_properties.py).

Each model is traced once (tests/strategies.py's cache); compile gets a fresh copy of that graph.
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
from tests.models import main_output
from tests.strategies import FAST_ARCHS, base, call_inputs, compile_, fresh, randomize_, specs

pytestmark = pytest.mark.slow      # a merge and an export per example: minutes on 2 cores

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ARCHS = (*FAST_ARCHS, "bert")


def assert_close(got, want, rtol=1e-3, atol=1e-5):
    """Within rtol, atol scaled to the output's size (logits of large random adapters reach tens: ~1e-6 float
    noise of a reassociated sum is above a fixed atol there)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()))


@st.composite
def adapted(draw, arch: str):
    """(base, pm in eval mode with random non-zero adapter tensors, inputs at a drawn shape), float32."""
    b = base(arch)
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    spec, _ = draw(specs(b, inits=(False,), mergeable=True), label="spec")
    pm = compile_(b, spec, seed).eval()
    randomize_(pm, seed)
    return b, pm, draw(call_inputs(b, seed), label="inputs")


@functools.lru_cache(maxsize=None)
def base_counts(arch: str) -> tuple[Counter, Counter]:
    """Op counts (call_function, call_module) of the base model's graph after the mode passes compile runs."""
    gm = fresh(base(arch).traced).gm
    run_passes(gm, BASE_PASSES)
    return counts(gm)


def counts(gm) -> tuple[Counter, Counter]:
    return tuple(Counter(n.target for n in gm.graph.nodes if n.op == op) for op in ("call_function", "call_module"))


@SETTINGS
@given(data=st.data())
def test_merged_graph_has_no_adapter_ops(data):
    arch = data.draw(st.sampled_from(ARCHS))
    b, pm, _ = data.draw(adapted(arch))
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
    b, pm, (args, kw) = data.draw(adapted(arch))
    merged = data.draw(st.booleans())
    module = pm.merge() if merged else pm
    with tempfile.TemporaryDirectory() as d:
        prog = torch.export.load(module.export(Path(d) / "m.pt2") if merged else
                                 pm.export(Path(d) / "m.pt2", merged=False)).module()
    if "token_type_ids" in pm.input_names:
        kw = {**kw, "token_type_ids": torch.zeros_like(kw["input_ids"])}
    with torch.no_grad():
        got = main_output(prog(**kw)) if b.hf else prog(*args)
        want = b.call(module, (args, kw))
    assert_close(got, want, rtol=1e-5, atol=1e-6)
