"""Fuzzing with hypothesis: random spec dicts (valid and invalid) either compile or raise a peftc.PeftcError, and
random corruptions of a saved adapter (bytes flipped, truncated, keys renamed, dtypes or shapes changed, config
fields changed) either load to the very adapter that was saved or raise a peftc.PeftcError: never an AttributeError,
KeyError, IndexError or TypeError from inside, never a silently different model; and a refused input changes nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import peftc

SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.emb = nn.Embedding(10, 8)

    def forward(self, ids):                                           # (B, T) -> (B, T, 3)
        x = self.emb(ids)
        return self.head(torch.tanh(self.q(x)) * self.v(x))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


EX = (torch.tensor([[1, 2, 3, 4]]),)
_TRACED: dict = {}


def compile_(spec):
    m = net()
    return m, peftc.compile(m, spec, example_inputs=EX)


# --- spec dicts ------------------------------------------------------------------------------------------------------

ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=6), st.lists(st.sampled_from(["q", "v", "head", "emb", "x", ".*", "["]), max_size=3),
                st.dictionaries(st.sampled_from(["q", "v", "head", "(", "emb"]), st.integers(-2, 9), max_size=2))
TARGETS = st.sampled_from([["q"], ["q", "v"], "all-linear", "q|v", ["emb"], ["q", "emb"], ["head"]])
GOOD = {   # per method: a key's valid values
    "LORA": {"r": st.integers(1, 8), "target_modules": TARGETS, "lora_alpha": st.sampled_from([1, 8, 16.0, -4]),
             "lora_dropout": st.sampled_from([0.0, 0.1]), "use_rslora": st.booleans(), "use_dora": st.booleans(),
             "bias": st.sampled_from(["none", "all", "lora_only"]),
             "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora"]),
             "modules_to_save": st.sampled_from([None, ["head"]]), "rank_pattern": st.sampled_from([{}, {"q": 2}])},
    "IA3": {"target_modules": TARGETS, "feedforward_modules": st.sampled_from([["v"], [], ["q", "v"]]),
            "modules_to_save": st.sampled_from([None, ["head"]]), "init_ia3_weights": st.booleans()},
}
REQUIRED = {"r", "target_modules"}       # drawn nine times in ten: most dicts are complete


@st.composite
def spec_dicts(draw):
    kind = draw(st.sampled_from(["LORA"] * 6 + ["IA3"] * 3 + ["lora", "LOHA", "", 3, None]))
    d = {"peft_type": kind}
    keys = GOOD.get(str(kind).upper(), GOOD["LORA"])
    for key, good in keys.items():
        if draw(st.sampled_from(range(10))) < (9 if key in REQUIRED else 5):
            d[key] = draw(good) if draw(st.sampled_from(range(10))) else draw(ANY)   # mostly valid values
    if not draw(st.sampled_from(range(6))):
        d[draw(st.sampled_from(["use_qalora", "layer_replication", "nonsense_key", "target_parameters", "bias"]))] = \
            draw(ANY)
    return d


@settings(max_examples=60, **SETTINGS)
@given(d=spec_dicts())
def test_random_spec_dicts_compile_or_raise_a_peftc_error(d):
    m = net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        pm = peftc.compile(m, d, example_inputs=EX)
    except peftc.PeftcError as e:
        event(f"refused: {type(e).__name__}: {str(e)[:70]}")
    else:
        event("compiled")                                   # a model that compiled runs, and is the base model where B = 0
        with torch.no_grad():
            y = pm(*EX)
            assert y.shape == (1, 4, 3) and torch.isfinite(y).all()
        assert pm.store["default"].targets
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# --- corrupted checkpoints -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random adapter (LoRA on q, v and the embedding, head kept whole), saved; and its outputs."""
    d = tmp_path_factory.mktemp("fuzz") / "good"
    _, pm = compile_(peftc.LoRA(r=2, alpha=4, targets=["q", "v", "emb"], modules_to_save=["head"], init=False))
    with torch.no_grad():
        for p in pm.store["default"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    pm.save_adapter(d)
    with torch.no_grad():
        return d, pm(*EX)


def _flip(data: bytes, at: int, xor: int) -> bytes:
    at %= len(data)
    return data[:at] + bytes([data[at] ^ xor]) + data[at + 1:]


@st.composite
def corruptions(draw):
    kind = draw(st.sampled_from(["flip weights", "flip config", "truncate weights", "truncate config", "rename key",
                                 "dtype", "shape", "drop key", "config field"]))
    return kind, draw(st.integers(0, 10**6)), draw(st.integers(1, 255)), draw(st.sampled_from(
        [torch.int32, torch.bool, torch.int8, torch.float16, torch.float64, torch.uint8]))


def corrupt(directory: Path, kind: str, n: int, xor: int, dtype) -> None:
    w, c = directory / WEIGHTS, directory / CONFIG
    if kind == "flip weights":
        w.write_bytes(_flip(w.read_bytes(), n, xor))
    elif kind == "flip config":
        c.write_bytes(_flip(c.read_bytes(), n, xor))
    elif kind == "truncate weights":
        w.write_bytes(w.read_bytes()[: n % w.stat().st_size])
    elif kind == "truncate config":
        c.write_bytes(c.read_bytes()[: n % c.stat().st_size])
    else:
        t = load_file(w)
        keys = sorted(t)
        key = keys[n % len(keys)]
        if kind == "rename key":
            t[key[: len(key) // 2] + "X" + key[len(key) // 2:]] = t.pop(key)
        elif kind == "dtype":
            t[key] = t[key].to(dtype)
        elif kind == "shape":
            t[key] = torch.zeros(*(s + 1 for s in t[key].shape))
        elif kind == "drop key":
            del t[key]
        if kind == "config field":
            cfg = json.loads(c.read_text())
            field = sorted(cfg)[n % len(cfg)]
            cfg[field] = [None, 3, "q", -1, {"a": 1}, [1, 2]][xor % 6]
            c.write_text(json.dumps(cfg))
        else:
            save_file(t, w)


@settings(max_examples=80, **SETTINGS)
@given(case=corruptions())
def test_corrupted_checkpoints_load_the_same_adapter_or_raise_a_peftc_error(saved, case, tmp_path_factory):
    good, want = saved
    directory = tmp_path_factory.mktemp("bad") / "adapter"
    shutil.copytree(good, directory)
    corrupt(directory, *case)
    m = net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        pm = peftc.load_adapter(m, directory, example_inputs=EX)
    except peftc.PeftcError as e:
        event(f"{case[0]}: refused ({type(e).__name__})")
    else:
        event(f"{case[0]}: loaded")
        with torch.no_grad():
            got = pm(*EX)
        # loaded: the same values in another float dtype (float16 rounds them, as an adapter saved in float16 would
        # be), or a config field that does not change the model
        tol = 1e-2 if case[0] == "dtype" and case[3] == torch.float16 else 1e-5
        assert got.shape == want.shape and torch.allclose(got, want, atol=tol), f"{case[0]}: a different model"
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
