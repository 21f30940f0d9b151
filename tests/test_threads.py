"""Per-call routing is the call's own data: threads calling one PeftModule at once with different per-row adapters
each get exactly their own outputs, and a call that raises leaves nothing behind."""
from __future__ import annotations

import random
import threading

import pytest
import torch

import peftc
from peftc.errors import InputError
from tests.models import inputs, main_output, make
from tests.parity import randomize_ours_

BASE = "__base__"
NAMES = ("default", "b", "c")
X = inputs("llama", batch=4, seq=9)


@pytest.fixture(scope="module")
def pm():
    model = make("llama")
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["q_proj", "v_proj"]))
    pm.add_adapter("b", peftc.LoRA(r=2, targets=["k_proj", "down_proj"]))
    pm.add_adapter("c", peftc.LoRA(r=6, targets="all-linear"))
    for seed, n in enumerate(NAMES):
        randomize_ours_(pm, seed=20 + seed, name=n)
    return pm.eval()


def call(pm, names):
    with torch.no_grad():
        return main_output(pm(**X, adapter_names=names))


def routings(seed: int, n: int) -> list[list[str]]:
    """Mixed batches, single-adapter batches and all-base batches: every form."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append([rnd.choice((BASE, *NAMES)) for _ in range(4)])
        elif kind == 1:
            out.append([rnd.choice(NAMES)] * 4)
        else:
            out.append([BASE] * 4)
    return out


def test_eight_threads_with_their_own_routing_get_their_own_outputs(pm):
    plans = [routings(seed, 12) for seed in range(8)]
    want = {tuple(r): call(pm, r) for plan in plans for r in plan}      # each call made alone, first
    assert len({v.sum().item() for v in want.values()}) > 3             # the routings really differ
    wrong: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(plan):
        try:
            start.wait()
            for r in plan:
                got = call(pm, r)
                if not torch.equal(got, want[tuple(r)]):
                    wrong.append(f"{r}: max diff {(got - want[tuple(r)]).abs().max().item():.3g}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not wrong, f"{len(wrong)} of {sum(map(len, plans))} calls got another call's routing: {wrong[:3]}"


def test_threads_with_set_adapter_calls_and_per_row_calls_mixed(pm):
    """Calls without adapter_names use the model's active adapter (model state, as in PEFT); per-row calls in other
    threads at the same time do not disturb them."""
    pm.set_adapter("b")
    plain = main_output(pm(**X)).detach()
    mixed = ["c", BASE, "default", "b"]
    want = call(pm, mixed)
    bad: list[str] = []

    def plain_calls():
        for _ in range(10):
            with torch.no_grad():
                if not torch.equal(main_output(pm(**X)), plain):
                    bad.append("plain")

    def routed_calls():
        for _ in range(10):
            if not torch.equal(call(pm, mixed), want):
                bad.append("routed")

    threads = [threading.Thread(target=f) for f in (plain_calls, routed_calls) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pm.set_adapter("default")
    assert not bad, bad


@pytest.mark.parametrize("bad, match", [
    (dict(adapter_names=["default", "b"]), r"4 rows, got \(2,\)"),
    (dict(adapter_names=["default", "nope", "b", "c"]), r"unknown adapter 'nope' in adapter_names; adapters: \['default', 'b', 'c'"),
    (dict(adapter_index=torch.tensor([0, 1, 9, 2])), r"slot\(s\) \[9\]; valid slots are"),
    (dict(adapter_index=torch.tensor([[0, 1, 2, 3]])), r"4 rows, got \(1, 4\)"),
    (dict(adapter_names="default"), r"adapter_names must be a list"),
    (dict(adapter_index=torch.tensor([0.0, 1.0, 1.0, 1.0])), r"adapter_index must be an integer tensor"),
])
def test_bad_routing_is_refused_and_the_next_call_is_unaffected(pm, bad, match):
    mixed = ["c", BASE, "default", "b"]
    before_plain, before_mixed = call(pm, None), call(pm, mixed)
    with pytest.raises(InputError, match=match):
        call_kw = {k: v for k, v in bad.items()}
        with torch.no_grad():
            pm(**X, **call_kw)
    assert torch.equal(call(pm, None), before_plain) and torch.equal(call(pm, mixed), before_mixed)
