"""benchmarks/generate.py end to end at tiny sizes (2 rounds): every contestant generates PEFT's tokens before anything
is timed, the report carries each target pair's verdict and per-token latency, and report.py builds the generate
table; the token check itself refuses a contestant that generates other tokens or fewer of them."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import generate  # noqa: E402
import report  # noqa: E402

TINY = ["--size", "tiny", "--rounds", "2", "--warmup", "0"]
EAGER = ["base", "PEFT", "peftc", "peftc merged", "PEFT 8", "peftc 8"]


def check_results(r: dict, compiled: bool) -> str:
    """The checks every run passes, and its generate table."""
    names = EAGER + (["peftc compiled"] if compiled else [])
    assert sorted(r["medians_s"]) == sorted(names)
    _, batch, prompt, new = generate.SIZES["tiny"]
    assert (r["new_tokens"], r["batch"], r["prompt"]) == (new, batch, prompt)
    assert r["batches"]["peftc 8"] == r["batches"]["PEFT 8"] == generate.N_ADAPTERS
    assert r["batches"]["peftc"] == batch
    for n in names:     # ms per new token is the median call over the new-token count
        assert r["ms_per_token"][n] == pytest.approx(1e3 * r["medians_s"][n] / new)
        assert r["first_call_s"][n] > 0
    targeted = {"peftc / PEFT", "peftc merged / PEFT", "peftc 8 / PEFT 8"} | ({"peftc compiled / PEFT"} if compiled
                                                                              else set())
    assert set(r["verdicts"]) == targeted <= set(r["ratios"])
    for pair, v in r["verdicts"].items():
        ratio = r["ratios"][pair]
        assert math.isfinite(ratio) and ratio > 0
        assert v.startswith(f"{ratio:.3f}: requirement <= 0.90 {'met' if ratio <= 0.9 else 'NOT MET'}, goal <= 0.50")
    assert ("peftc compiled / peftc" in r["ratios"]) == compiled

    table = report.generate_table(r, ["--only", "generate"])
    assert "| peftc / PEFT |" in table and "| peftc 8 / PEFT 8 |" in table and "requirement <= 0.90" in table
    assert ("| peftc compiled / PEFT |" in table) == compiled
    assert f"| peftc 8 | {generate.N_ADAPTERS} |" in table
    return table


@pytest.mark.slow
def test_generate_benchmark_runs_at_tiny_sizes():
    check_results(generate.main(TINY + ["--no-compiled"]), compiled=False)


@pytest.mark.slow       # torch.compile of the prefill and decode graphs, and the profile: a minute or more
def test_generate_benchmark_compiled_and_profiled():
    r = generate.main(TINY + ["--profile"])
    check_results(r, compiled=True)
    for name in ("peftc", "PEFT"):
        p = r["profile"][name]
        assert p["aten_calls"] > 0 and p["aten_ms"] > 0 and p["top"]
        assert p["other_ms"] == pytest.approx(p["wall_ms"] - p["aten_ms"])


def test_token_check_refuses_other_tokens_and_other_lengths():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    other = ref.clone()
    other[1, 3] = 9
    shape = {"PEFT": (2, 4), "peftc": (2, 4)}
    generate.check_tokens({"PEFT": ref, "peftc": ref.clone()}, {"peftc": "PEFT"}, shape)
    with pytest.raises(SystemExit, match=r"'peftc' and 'PEFT' generate different tokens: first at row 1, position 3 "
                                         r"\(9 vs 8\)"):
        generate.check_tokens({"PEFT": ref, "peftc": other}, {"peftc": "PEFT"}, shape)
    with pytest.raises(SystemExit, match=r"'peftc' returned tokens of shape \(2, 3\), expected \(2, 4\)"):
        generate.check_tokens({"PEFT": ref, "peftc": ref[:, :3]}, {"peftc": "PEFT"}, shape)
