"""Exports: export_merged writes a Hugging Face directory that transformers loads; pm.export writes a .pt2 program."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from torch import nn

import peftc
from peftc.errors import ExportError, MergeError
from tests.models import ARCHS, DECODERS, inputs, main_output, make
from tests.parity import MOVED, randomize_ours_

TOL = 1e-4                   # fp32 round trip through the files, max |loaded - pm|
# Random non-zero adapters over several kinds of targets; the classifiers' modules_to_save copies are perturbed too.
SPECS = {
    "llama": dict(r=4, alpha=8, targets="all-linear"),
    "qwen2": dict(r=4, alpha=16, use_rslora=True),
    "mistral": dict(r=2, alpha=4, targets=["q_proj", "mlp.down_proj"]),
    "gpt2": dict(r=4, alpha=8, targets="all-linear"),
    "bert": dict(r=4, alpha=8, modules_to_save=["classifier"]),
    "vit": dict(r=4, alpha=8, modules_to_save=["classifier"]),
    "minilm": dict(r=8, alpha=16),
}
AUTO = {"bert": tf.AutoModelForSequenceClassification, "vit": tf.AutoModelForImageClassification,
        "minilm": tf.AutoModel, **{a: tf.AutoModelForCausalLM for a in DECODERS}}


@functools.lru_cache(maxsize=None)
def adapted(arch: str, **extra):
    """(user's model, PeftModule in eval mode with random non-zero adapter), built once per arch."""
    model = make(arch)
    pm = peftc.compile(model, peftc.LoRA(**{**SPECS[arch], **extra})).eval()
    randomize_ours_(pm, seed=0)
    return model, pm


def shapes(arch: str) -> list[dict]:
    """Two shapes other than the trace shape (2 x 8): 3 x 11 with a left-padded row, and 1 x 5."""
    return [inputs(arch, batch=3, seq=11, seed=1), inputs(arch, batch=1, seq=5, seed=2)]


def out_of(m, kw) -> torch.Tensor:
    with torch.no_grad():
        return main_output(m(**kw)).float()


def max_diff(a, b, kw) -> float:
    return (out_of(a, kw) - out_of(b, kw)).abs().max().item()


def load(directory, arch: str, **kw):
    model, info = AUTO[arch].from_pretrained(directory, output_loading_info=True, **kw)
    missing = list(info["missing_keys"])
    assert not missing and not info["unexpected_keys"], f"missing {missing[:3]}, unexpected {info['unexpected_keys'][:3]}"
    return model.eval()


def file_keys(directory) -> dict[str, list[str]]:
    """key -> safetensors files holding it."""
    where: dict[str, list[str]] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                where.setdefault(k, []).append(f.name)
    return where


def snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


# --- round trip through transformers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_export_merged_loads_with_transformers(arch, tmp_path):
    model, pm = adapted(arch)
    out = peftc.export_merged(pm, tmp_path / arch, progress=False)
    assert out == tmp_path / arch
    names = sorted(p.name for p in out.iterdir())
    want = ["config.json", "model.safetensors"] + (["generation_config.json"] if arch in DECODERS else [])
    assert names == sorted(want)
    assert json.loads((out / "config.json").read_text())["architectures"] == [pm.model_class]
    loaded = load(out, arch)
    assert type(loaded).__name__ == pm.model_class
    for kw in shapes(arch):
        assert max_diff(pm, model, kw) > MOVED * TOL, "the adapter does not move the output; the test is vacuous"
        assert max_diff(loaded, pm, kw) <= TOL
    assert not list(tmp_path.glob(".*")), "temp directories left behind"


def test_sharded_export_maps_every_key(tmp_path):
    model, pm = adapted("llama")
    out = peftc.export_merged(pm, tmp_path / "m", max_shard_size="50KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and "model.safetensors" not in shards
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    where = file_keys(out)
    assert set(where) == set(index["weight_map"]) == set(model.state_dict())
    assert all(where[k] == [f] for k, f in index["weight_map"].items()), "a key is in another file than indexed"
    total = 0
    for f in shards:
        with safe_open(out / f, "pt") as sf:
            sizes = [sf.get_tensor(k).numel() * sf.get_tensor(k).itemsize for k in sf.keys()]
        assert sum(sizes) <= 50_000 or len(sizes) == 1, f"{f} holds {sum(sizes)} bytes in {len(sizes)} tensors"
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    loaded = load(out, "llama")
    for kw in shapes("llama"):
        assert max_diff(loaded, pm, kw) <= TOL


def test_gpt2_tied_embeddings_are_written_once_and_stay_tied(tmp_path):
    _, pm = adapted("gpt2")
    out = peftc.export_merged(pm, tmp_path / "g", max_shard_size="50KB", progress=False)
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True
    where = file_keys(out)
    assert len(where["transformer.wte.weight"]) == 1 and "lm_head.weight" not in where
    loaded = load(out, "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert max_diff(loaded, pm, shapes("gpt2")[0]) <= TOL


def test_gpt2_adapted_lm_head_is_written_untied(tmp_path):
    """LoRA on GPT-2's tied lm_head: the folded head is not the embedding any more; both are written, untied."""
    _, pm = adapted("gpt2", targets=("lm_head", "c_attn"))
    out = peftc.export_merged(pm, tmp_path / "g", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(file_keys(out))
    loaded = load(out, "gpt2")
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    for kw in shapes("gpt2"):
        assert max_diff(loaded, pm, kw) <= TOL


def test_gpt2_saved_lm_head_export_equals_pm(tmp_path):
    """modules_to_save=["lm_head"] on GPT-2, whose lm_head is tied to the token embedding: the export (trained head
    copy, embedding as it was, untied: what PEFT does) must compute what pm computes."""
    _, pm = adapted("gpt2", modules_to_save=("lm_head",))
    out = peftc.export_merged(pm, tmp_path / "g", progress=False)
    loaded = load(out, "gpt2")
    assert max_diff(loaded, pm, shapes("gpt2")[0]) <= TOL


@pytest.mark.parametrize("dtype,want,stored", [("bf16", torch.bfloat16, "BF16"), (torch.float16, torch.float16, "F16")])
def test_export_in_half_precision(dtype, want, stored, tmp_path):
    _, pm = adapted("llama")
    out = peftc.export_merged(pm, tmp_path / "h", dtype=dtype, progress=False)
    with safe_open(out / "model.safetensors", "pt") as sf:
        assert {sf.get_slice(k).get_dtype() for k in sf.keys()} == {stored}
    loaded = load(out, "llama")                                     # no dtype given: the config's
    assert loaded.dtype == want and {p.dtype for p in loaded.parameters()} == {want}
    for kw in shapes("llama"):
        torch.testing.assert_close(out_of(loaded, kw), out_of(pm, kw), rtol=5e-2, atol=5e-2)


def test_overwrite_replaces_the_whole_directory(tmp_path):
    _, pm = adapted("bert")
    out = peftc.export_merged(pm, tmp_path / "b", max_shard_size="50KB", progress=True)   # progress bar on
    assert (out / "model.safetensors.index.json").exists()
    peftc.export_merged(pm, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]   # old shards are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]                            # no temp or backup left
    assert max_diff(load(out, "bert"), pm, shapes("bert")[0]) <= TOL


def test_existing_empty_directory_needs_no_overwrite(tmp_path):
    (tmp_path / "e").mkdir()
    _, pm = adapted("vit")
    peftc.export_merged(pm, tmp_path / "e", progress=False)
    assert (tmp_path / "e" / "model.safetensors").exists()


# --- bad inputs: an ExportError, and nothing existing changed ------------------------------------------------------------
@pytest.fixture
def existing(tmp_path):
    """A directory with an earlier export's files in it; returns (path, its bytes)."""
    d = tmp_path / "out"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"old": true}\n')
    (d / "model.safetensors").write_bytes(os.urandom(1000))
    (d / "sub" / "notes.txt").write_text("keep me")
    return d, snapshot(d)


def assert_intact(d, before):
    assert snapshot(d) == before, "an existing file was changed or removed"
    assert sorted(p.name for p in d.parent.iterdir()) == [d.name], "temp files left next to the target"


def test_non_empty_directory_without_overwrite(existing):
    d, before = existing
    _, pm = adapted("bert")
    with pytest.raises(ExportError, match="exists and is not empty; pass overwrite=True"):
        peftc.export_merged(pm, d, progress=False)
    assert_intact(d, before)


def test_path_that_is_a_file(existing):
    d, before = existing
    _, pm = adapted("bert")
    f = d / "config.json"
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="is a file"):
            peftc.export_merged(pm, f, overwrite=overwrite, progress=False)
    assert_intact(d, before)


@pytest.mark.parametrize("how", ["hf", "pt2"])
def test_path_below_a_file(existing, how):
    """A path whose parent is a file cannot be written: an ExportError, not an OSError from deep inside."""
    d, before = existing
    _, pm = adapted("bert")
    with pytest.raises(ExportError):
        if how == "hf":
            peftc.export_merged(pm, d / "config.json" / "merged", progress=False)
        else:
            pm.export(d / "config.json" / "model.pt2")
    assert_intact(d, before)


def test_parent_not_writable(tmp_path, monkeypatch):
    """The temp directory is made beside the target: a parent that cannot be written is refused up front, also when
    the target itself exists and could be written."""
    ro = tmp_path / "ro"
    (ro / "old").mkdir(parents=True)
    (ro / "old" / "config.json").write_text("{}\n")
    before = snapshot(ro)
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):              # running as root, which ignores modes: answer as for any other user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK
                            else real(p, mode, **kw))
    _, pm = adapted("bert")
    try:
        for target in (ro / "m", ro / "a" / "b"):
            with pytest.raises(ExportError, match=f"{ro} is not writable"):
                peftc.export_merged(pm, target, progress=False)
        with pytest.raises(ExportError, match=f"{ro} is not writable"):
            peftc.export_merged(pm, ro / "old", overwrite=True, progress=False)
        with pytest.raises(ExportError, match="not writable"):
            pm.export(ro / "m.pt2")
        assert snapshot(ro) == before and [p.name for p in ro.iterdir()] == ["old"]
    finally:
        ro.chmod(0o755)


BAD_DTYPES = [torch.int8, torch.bool, "int4", "fp8", "float", 16]
BAD_SIZES = ["0", 0, -1, "-2GB", "abc", "2XB", "", None, "0.0MB"]


@pytest.mark.parametrize("kw", [{"dtype": d} for d in BAD_DTYPES] + [{"max_shard_size": s} for s in BAD_SIZES],
                         ids=[f"dtype={d}" for d in BAD_DTYPES] + [f"max_shard_size={s!r}" for s in BAD_SIZES])
def test_bad_dtype_or_shard_size(existing, kw):
    d, before = existing
    _, pm = adapted("bert")
    what = next(iter(kw))
    with pytest.raises(ExportError, match=f"{what}="):
        peftc.export_merged(pm, d, overwrite=True, progress=False, **kw)
    assert_intact(d, before)


def test_failure_while_writing_keeps_the_old_directory(existing):
    """A non-finite folded weight is found only while the shards are written: the old directory must survive."""
    d, before = existing
    model = make("bert")
    pm = peftc.compile(model, peftc.LoRA(r=2, targets="all-linear")).eval()
    last = pm.store["default"].targets[-1]
    with torch.no_grad():
        pm.store["default"].sites[last.replace(".", "-")].B[0, 0] = float("nan")
    with pytest.raises(MergeError, match=f"'default' into layer {last}"):
        peftc.export_merged(pm, d, overwrite=True, max_shard_size="50KB", progress=False)
    assert_intact(d, before)


def test_unknown_adapter_and_non_hf_model(tmp_path):
    _, pm = adapted("bert")
    with pytest.raises(peftc.UnknownAdapter, match=r"unknown adapter 'x'; adapters: \['default'\]"):
        peftc.export_merged(pm, tmp_path / "a", adapter_name="x", progress=False)
    plain = peftc.compile(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), peftc.LoRA(r=1, targets=["0"]),
                          example_inputs=(torch.randn(2, 4),))
    with pytest.raises(ExportError, match=r"not a Hugging Face model; use pm.export"):
        peftc.export_merged(plain, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- .pt2 programs -------------------------------------------------------------------------------------------------------
def program_inputs(pm, kw: dict) -> dict:
    """The program takes every traced input: BERT-like models need token_type_ids spelled out."""
    kw = dict(kw)
    if "token_type_ids" in pm.input_names:
        kw["token_type_ids"] = torch.zeros_like(kw["input_ids"])
    return kw


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "vit"])
@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
def test_pt2_program_equals_pm(arch, merged, tmp_path):
    _, pm = adapted(arch)
    path = pm.export(tmp_path / "m.pt2", merged=merged)
    assert path == tmp_path / "m.pt2" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
    prog = torch.export.load(path).module()
    for kw in shapes(arch):                                         # dynamic batch and sequence
        with torch.no_grad():
            got, want = prog(**program_inputs(pm, kw)), pm(**kw)
        assert type(got) is type(want)
        assert (main_output(got) - main_output(want)).abs().max().item() <= TOL


def test_pt2_from_merged_module_and_from_train_mode(tmp_path):
    _, pm = adapted("qwen2")
    merged = pm.merge()
    a = merged.export(tmp_path / "a.pt2")
    pm.train()
    try:
        b = pm.export(tmp_path / "b.pt2")                           # exported in eval mode, pm's mode kept
        assert pm.training
    finally:
        pm.eval()
    kw = shapes("qwen2")[0]
    with torch.no_grad():
        want = pm(**kw).logits
        for p in (a, b):
            assert (torch.export.load(p).module()(**kw).logits - want).abs().max().item() <= TOL


def test_pt2_positional_plain_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 3)).eval()
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["0", "3"], dropout=0.1), example_inputs=(torch.randn(2, 8),))
    randomize_ours_(pm, seed=0)
    pm.eval()
    for merged in (True, False):
        prog = torch.export.load(pm.export(tmp_path / f"{merged}.pt2", merged=merged)).module()
        for x in (torch.randn(5, 8), torch.randn(1, 8)):
            with torch.no_grad():
                torch.testing.assert_close(prog(x), pm(x), rtol=1e-4, atol=1e-5)


def test_pt2_path_that_is_a_directory(tmp_path):
    _, pm = adapted("vit")
    (tmp_path / "d").mkdir()
    with pytest.raises(ExportError, match="is a directory; pass a file path"):
        pm.export(tmp_path / "d")
    with pytest.raises(ExportError, match="is a directory"):
        pm.merge().export(tmp_path / "d")
    with pytest.raises(ExportError, match="is a directory"):
        pm.export(tmp_path / "d", merged=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "d"] and not list((tmp_path / "d").iterdir())
