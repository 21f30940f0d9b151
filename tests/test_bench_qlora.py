"""benchmarks/qlora.py end to end at tiny sizes (one round): on a 4-bit base peftc and PEFT agree (logits and every
site's gradients) before anything is timed, every mode reports, and report.py builds the qlora table; peftc fused (the
default) and unfused (fuse_quant=False) both measured, with and without bitsandbytes' bf16 CPU path as a contestant."""
from __future__ import annotations

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import qlora  # noqa: E402
import report  # noqa: E402

TINY = ["--size", "tiny", "--rounds", "1", "--warmup", "0"]


def check_results(r: dict, bf16: bool = True) -> str:
    """The checks every run passes, and its qlora table."""
    assert list(r["peftc_ops"]) == ["peftc", qlora.UNFUSED]
    # 1 layer: 7 quantized sites, fused with their LoRA updates by default, each a peftc::linear_4bit call unfused
    assert r["peftc_ops"]["peftc"] == {"fused QuantLoraGroup": 7}
    assert r["peftc_ops"][qlora.UNFUSED] == {"peftc::linear_4bit": 7}
    assert 0 <= r["grad_max_rel_diff"] <= qlora.TOL
    assert 0 <= r["grad_max_rel_diff_unfused"] <= qlora.TOL
    for mode in ("no_grad", "inference"):
        assert {"peftc / PEFT", "peftc / base", "PEFT / base"} <= set(r[mode]["ratios"])
        assert f"{qlora.UNFUSED} / PEFT" in r[mode]["ratios"]
    if bf16 and qlora.has_avx512bf16():               # bitsandbytes' bf16 CPU path runs the tiny model (in 64)
        assert r["bf16_refused"] is None and 0 < r["bf16_max_diff"] <= qlora.BF16_TOL
        assert f"{qlora.BF16} / PEFT" in r["no_grad"]["ratios"]
    else:
        assert "bf16_max_diff" not in r and f"{qlora.BF16} / PEFT" not in r["no_grad"]["ratios"]
    train = r["train"]["ratios"]
    assert {"peftc / PEFT", "peftc +entry / base +entry", "PEFT +entry / base +entry"} <= set(train)
    assert f"peftc / {qlora.UNFUSED}" in train
    assert all(math.isfinite(v) and v > 0 for v in train.values())
    for key in ("saved", "saved_no_dropout"):
        ratio = r[key]["ratios"]["peftc / PEFT"]
        assert math.isfinite(ratio) and ratio > 0 and min(r[key]["bytes"].values()) > 0
    # the base saves less than an adapted model: LoRA's inputs are saved for A's and B's gradients
    assert r["saved"]["ratios"]["peftc +entry / base +entry"] > 1
    assert qlora.verdicts(r)["train"].startswith("goal < 1.00 ")
    assert qlora.verdicts(r)["saved"].startswith("requirement <= 1.00 ")

    table = report.qlora_table(r, ["--only", "qlora"])
    assert "| eval, `torch.inference_mode()` | peftc / PEFT |" in table
    assert "| training step, train mode (dropout 0.05) | peftc +entry / base +entry |" in table
    assert "| activations saved, train mode (dropout 0.05) | peftc / PEFT |" in table
    assert "goal < 1.00" in table and "requirement <= 1.00" in table and "goal <= 0.75" in table
    assert "peftc unfused's graph calls `peftc::linear_4bit` x7" in table
    return table


def test_qlora_benchmark_runs_at_tiny_sizes():
    check_results(qlora.main(TINY))


@pytest.mark.slow       # long: runs in CI's slow pass
def test_qlora_benchmark_without_bitsandbytes_bf16_path():
    check_results(qlora.main(TINY + ["--no-bf16"]), bf16=False)
