"""Adapter checkpoints: PEFT's format, written atomically; every bad input is refused and changes nothing."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftc
from peftc import CheckpointError, LoRA, SpecError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class Net(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.q, self.v, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):                                           # (B, d)
        return self.head(torch.tanh(self.q(x)) * self.v(x))


def model(d: int = 8, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(d).eval()


def ex(d: int = 8):
    return (torch.randn(2, d),)


SPEC = LoRA(r=2, alpha=4, targets=["q", "v"], modules_to_save=["head"], init=False)


def compiled(m: Net | None = None, spec: LoRA = SPEC):
    m = m or model()
    return m, peftc.compile(m, spec, example_inputs=ex(m.q.in_features))


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def snapshot(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()],
            [x.training for x in m.modules()])


def assert_unchanged(m: nn.Module, before) -> None:
    state, grads, modes = snapshot(m)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert grads == before[1] and modes == before[2]


# --- saving --------------------------------------------------------------------------------------------------
def test_save_writes_peft_format_and_no_temp_files(tmp_path):
    _, pm = compiled()
    out = tmp_path / "a" / "b"                                       # parents are created
    pm.save_adapter(out)
    assert sorted(os.listdir(out)) == [CONFIG, WEIGHTS]
    cfg = json.loads((out / CONFIG).read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["modules_to_save"]) == (
        "LORA", 2, 4, ["q", "v"], ["head"])
    tensors = load_file(out / WEIGHTS)
    assert sorted(tensors) == sorted([f"base_model.model.{s}.lora_{ab}.weight" for s in "qv" for ab in "AB"]
                                     + ["base_model.model.head.weight", "base_model.model.head.bias"])
    assert tensors["base_model.model.q.lora_A.weight"].shape == (2, 8)
    assert tensors["base_model.model.q.lora_B.weight"].shape == (8, 2)


def test_save_over_an_existing_adapter_replaces_it(tmp_path):
    m, pm = compiled()
    pm.save_adapter(tmp_path)
    first = files(tmp_path)
    with torch.no_grad():
        pm.store["default"].sites["q"].B.add_(1.0)
    pm.save_adapter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG, WEIGHTS]
    assert files(tmp_path)[WEIGHTS] != first[WEIGHTS]
    loaded = peftc.load_adapter(m, tmp_path, example_inputs=ex())
    assert torch.equal(loaded.store["default"].sites["q"].B, pm.store["default"].sites["q"].B)


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_failed_save_leaves_the_old_adapter_whole_and_no_temp_files(tmp_path, monkeypatch, failing):
    """Atomic for the adapter as a whole: new weights next to the old config would load with the wrong spec."""
    _, pm = compiled()
    pm.save_adapter(tmp_path)
    before = files(tmp_path)

    def half_written_weights(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 10)
        raise OSError("disk full")

    def failing_json(*args, **kwargs):
        raise OSError("disk full")

    if failing == "weights":
        monkeypatch.setattr("peftc.checkpoint.save_file", half_written_weights)
    else:
        monkeypatch.setattr("peftc.checkpoint.json.dumps", failing_json)
    with torch.no_grad():
        pm.store["default"].sites["q"].B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        pm.save_adapter(tmp_path)
    assert files(tmp_path) == before


def test_save_to_a_file_path_is_refused(tmp_path):
    _, pm = compiled()
    target = tmp_path / "adapter"
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="exists and is a file; pass a directory path"):
        pm.save_adapter(target)
    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["adapter"]


def test_save_unknown_adapter_name(tmp_path):
    _, pm = compiled()
    with pytest.raises(peftc.UnknownAdapter, match=r"unknown adapter 'other'; adapters: \['default'\]"):
        pm.save_adapter(tmp_path / "x", "other")
    assert not (tmp_path / "x").exists()


# --- loading -------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    m, pm = compiled()
    pm.save_adapter(tmp_path)
    loaded = peftc.load_adapter(m, tmp_path, example_inputs=ex())
    assert loaded.store["default"].spec == pm.store["default"].spec
    theirs = dict(pm.store.peft_parameters("default"))
    for k, p in loaded.store.peft_parameters("default"):
        assert torch.equal(p, theirs[k]), k
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), pm(x))
    assert not loaded.training and not loaded.trainable_parameters()         # inference by default, like PEFT
    trainable = peftc.load_adapter(m, tmp_path, example_inputs=ex(), is_trainable=True)
    assert len(trainable.trainable_parameters()) == 4 + 2


def test_adapter_names_are_not_part_of_the_checkpoint(tmp_path):
    m = model()
    pm = peftc.compile(m, SPEC, adapter_name="mine", example_inputs=ex())
    pm.save_adapter(tmp_path)                        # PEFT's layout: an adapter not named "default" in a subfolder
    assert not (tmp_path / WEIGHTS).exists()
    assert all(".mine." not in k for k in load_file(tmp_path / "mine" / WEIGHTS))
    loaded = peftc.load_adapter(m, tmp_path / "mine", adapter_name="theirs", example_inputs=ex())
    assert loaded.adapters == ["theirs"]
    assert torch.equal(loaded.store["theirs"].sites["v"].B, pm.store["mine"].sites["v"].B)


def test_peft_keys_that_keep_the_adapter_name_load(tmp_path):
    m, pm = compiled(spec=LoRA(r=2, targets=["q"], init=False))
    pm.save_adapter(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    save_file({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in tensors.items()}, tmp_path / WEIGHTS)
    loaded = peftc.load_adapter(m, tmp_path, example_inputs=ex())
    assert torch.equal(loaded.store["default"].sites["q"].A, pm.store["default"].sites["q"].A)


def saved(tmp_path: Path) -> Path:
    _, pm = compiled()
    pm.save_adapter(tmp_path / "good")
    return tmp_path / "good"


def _missing_dir(d: Path) -> Path:
    return d.parent / "nowhere"


def _file_not_dir(d: Path) -> Path:
    return d / WEIGHTS


def _no_config(d: Path) -> Path:
    (d / CONFIG).unlink()
    return d


def _malformed_json(d: Path) -> Path:
    (d / CONFIG).write_text('{\n  "peft_type": "LORA",\n  "r": 2,,\n}\n')
    return d


def _json_list(d: Path) -> Path:
    (d / CONFIG).write_text("[1, 2]")
    return d


def _not_utf8(d: Path) -> Path:
    (d / CONFIG).write_bytes(b'{"r": "\xff\xfe"}')
    return d


def _truncated(d: Path) -> Path:
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    return d


def _garbage(d: Path) -> Path:
    (d / WEIGHTS).write_bytes(b"not a safetensors file")
    return d


def _no_weights(d: Path) -> Path:
    (d / WEIGHTS).unlink()
    return d


def _unexpected_key(d: Path) -> Path:
    t = load_file(d / WEIGHTS)
    t["base_model.model.k.lora_A.weight"] = torch.zeros(2, 8)
    save_file(t, d / WEIGHTS)
    return d


def _missing_key(d: Path) -> Path:
    t = load_file(d / WEIGHTS)
    del t["base_model.model.v.lora_B.weight"]
    save_file(t, d / WEIGHTS)
    return d


def _integer_tensor(d: Path) -> Path:
    t = load_file(d / WEIGHTS)
    key = "base_model.model.v.lora_A.weight"
    t[key] = (t[key] * 100).to(torch.int32)
    save_file(t, d / WEIGHTS)
    return d


def _bool_tensor(d: Path) -> Path:
    t = load_file(d / WEIGHTS)
    key = "base_model.model.v.lora_B.weight"
    t[key] = t[key] > 0
    save_file(t, d / WEIGHTS)
    return d


def _edited_alpha(d: Path) -> Path:
    cfg = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**cfg, "lora_alpha": 5}))
    return d


def _flipped_value(d: Path) -> Path:
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-3] ^= 0x10                                            # a bit of the last tensor's last value
    (d / WEIGHTS).write_bytes(bytes(data))
    return d


def _unsupported_config(d: Path) -> Path:
    cfg = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**cfg, "use_qalora": True}))
    return d


BAD = {
    "missing dir": (_missing_dir, CheckpointError, r"nowhere does not exist"),
    "file, not dir": (_file_not_dir, CheckpointError, r"is a file; pass the adapter's directory"),
    "no config": (_no_config, CheckpointError, r"has no adapter_config.json"),
    "malformed json": (_malformed_json, CheckpointError, r"is not valid JSON \(line 3, column 10: "),
    "json list": (_json_list, CheckpointError, r"must hold a JSON object, found list"),
    "not utf-8": (_not_utf8, CheckpointError, r"not UTF-8"),
    "truncated": (_truncated, CheckpointError, r"adapter_model.safetensors is truncated or not a safetensors file"),
    "garbage": (_garbage, CheckpointError, r"truncated or not a safetensors file"),
    "no weights": (_no_weights, CheckpointError, r"has no adapter_model.safetensors"),
    "unexpected key": (_unexpected_key, CheckpointError,
                       r"key 'base_model.model.k.lora_A.weight' \(and 0 more\) has no place in this model"),
    "missing key": (_missing_key, CheckpointError, r"missing 1 key\(s\), e.g. 'base_model.model.v.lora_B.weight'"),
    "integer tensor": (_integer_tensor, CheckpointError,
                       r"base_model.model.v.lora_A.weight is stored as torch.int32, but adapter weights are floating"),
    "bool tensor": (_bool_tensor, CheckpointError, r"v.lora_B.weight is stored as torch.bool"),
    "edited config": (_edited_alpha, CheckpointError,
                      r"adapter_config.json does not mean the adapter its weights were saved with: lora_alpha: 5 "
                      r"\(saved with 4"),
    "flipped bit": (_flipped_value, CheckpointError, r"do not match the checksum recorded when peftc saved them"),
    "unsupported config": (_unsupported_config, SpecError, r"use_qalora=True is not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_refused_and_changes_nothing(tmp_path, case):
    spoil, error, message = BAD[case]
    directory = spoil(saved(tmp_path))
    m = model()
    m.train()
    m.q.weight.requires_grad_(False)
    before, on_disk = snapshot(m), files(tmp_path / "good")
    with pytest.raises(error, match=message):
        peftc.load_adapter(m, directory, example_inputs=ex())
    assert_unchanged(m, before)
    assert files(tmp_path / "good") == on_disk


class Boom:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_only_adapter_is_refused_without_unpickling(tmp_path):
    d = saved(tmp_path)
    (d / WEIGHTS).unlink()
    marker = tmp_path / "unpickled"
    (d / "adapter_model.bin").write_bytes(pickle.dumps(Boom(str(marker))))
    m = model()
    before, on_disk = snapshot(m), files(d)
    with pytest.raises(CheckpointError, match=r"holds only adapter_model.bin, a pickle; peftc loads safetensors only"):
        peftc.load_adapter(m, d, example_inputs=ex())
    assert not marker.exists()
    assert files(d) == on_disk
    assert_unchanged(m, before)


def test_adapter_from_another_base_model_names_the_key_and_both_shapes(tmp_path):
    _, pm = compiled(model(d=8))
    pm.save_adapter(tmp_path)
    other = model(d=6)                                               # same module names, other widths
    before, on_disk = snapshot(other), files(tmp_path)
    with pytest.raises(CheckpointError, match=r"base_model.model.q.lora_A.weight has shape \(2, 8\) in the "
                                              r"checkpoint but \(2, 6\) in this model; .*different base model"):
        peftc.load_adapter(other, tmp_path, example_inputs=ex(6))
    assert_unchanged(other, before)
    assert files(tmp_path) == on_disk


def test_hf_adapter_into_another_architecture(tmp_path):
    from tests.models import make

    gpt2 = make("gpt2")
    peftc.compile(gpt2, LoRA(r=2, targets="all-linear")).save_adapter(tmp_path)
    bert = make("bert")
    before = snapshot(bert)
    with pytest.raises(peftc.TargetNotFound, match=r"targets \[.*'c_attn'.*\] matched no linear layer"):
        peftc.load_adapter(bert, tmp_path)
    assert_unchanged(bert, before)


def test_config_edits_that_keep_the_meaning_load(tmp_path):
    d = saved(tmp_path)
    cfg = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps({**cfg, "base_model_name_or_path": "elsewhere", "inference_mode": False}))
    m, pm = compiled()
    loaded = peftc.load_adapter(model(), d, example_inputs=ex())
    x = ex()
    with torch.no_grad():
        assert torch.equal(loaded(*x), pm(*x))
