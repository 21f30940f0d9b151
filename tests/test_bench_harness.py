"""benchmarks/harness.py refuses unfair contestants before timing: KV caches, disagreeing outputs, shared weights."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import harness as H  # noqa: E402
from peftc.tiny import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama").eval()


def inputs(model) -> dict:
    return H.example_inputs(model.config.vocab_size, batch=2, seq=8)


def test_an_hf_contestant_is_called_without_a_cache(base):
    seen = []
    c = H.Contestant("base", H.own_copy(base), call=lambda m, **kw: seen.append(kw) or m(**kw))
    out = H.check([c], inputs(base))
    assert seen[0]["use_cache"] is False and c.checked
    assert out["base"].shape[:2] == (2, 8)
    with pytest.raises(ValueError, match="use_cache"):
        H.Contestant("base", base, kwargs={"use_cache": True})


def test_a_contestant_that_builds_a_cache_is_refused(base):
    leaky = H.Contestant("leaky", H.own_copy(base), call=lambda m, **kw: m(**dict(kw, use_cache=True)))
    with pytest.raises(SystemExit, match="'leaky' built a KV cache"):
        H.check([leaky], inputs(base))
    assert not leaky.checked
    with pytest.raises(SystemExit, match="not checked"):
        H.time_contestants([leaky], inputs(base), rounds=1, warmup=0)


def test_disagreeing_outputs_stop_before_timing(base):
    other = H.own_copy(base)
    with torch.no_grad():
        other.lm_head.weight.add_(0.1)
    cs = [H.Contestant("a", H.own_copy(base)), H.Contestant("b", other)]
    with pytest.raises(SystemExit, match=r"'a' and 'b' disagree: max \|diff\|"):
        H.check(cs, inputs(base), agree=[("a", "b", 1e-4)])
    with pytest.raises(SystemExit, match="'a' and 'a2' do not differ"):
        H.check([cs[0], cs[0].variant("a2")], inputs(base), differ=[("a", "a2", 1e-4)])
    nan = {"a": torch.tensor([float("nan")]), "b": torch.tensor([0.0])}
    with pytest.raises(SystemExit, match="disagree"):
        H.check_outputs(nan, agree=[("a", "b", 1.0)])


def test_shared_storage_between_two_contestants_is_refused(base):
    import peftc

    pm = peftc.compile(base, peftc.LoRA(r=2))              # shares base's weights
    with pytest.raises(SystemExit, match="'base' and 'peftc' share"):
        H.check_storage([H.Contestant("base", base), H.Contestant("peftc", pm)])
    own = peftc.compile(H.own_copy(base), peftc.LoRA(r=2))
    c = H.Contestant("peftc", own)
    H.check_storage([H.Contestant("base", base), c, c.variant("peftc off", own.disable_adapters)])


def test_grad_entry_reaches_the_first_block_of_every_kind(base):
    import peftc

    pm = peftc.compile(H.own_copy(base), peftc.LoRA(r=2))
    frozen = H.own_copy(base, frozen=True)
    x = H.example_inputs(base.config.vocab_size, batch=2, seq=8, labels=True)
    for c in (H.Contestant("peftc off", pm, contexts=(pm.disable_adapters,)), H.Contestant("base", frozen)):
        with pytest.raises(SystemExit, match="requires no grad"):
            H.train_step(c, x)
        hooked = c.variant(c.name, H.GradEntry(c.model, base.config.hidden_size))
        H.check([hooked], x, train=True)
        assert hooked.contexts[-1].leaf.grad is not None
