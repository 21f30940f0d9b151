"""Regenerate the figures table at the top of benchmarks/README.md: run lora_modes.py (every mode, compiled
included) and mixed_batch.py in this process and write their ratios between the report markers.

    python benchmarks/report.py [--rounds 20] [--threads N] [--no-compiled] [--dry-run]

Takes about 10 minutes on a 2-core CPU (most of it compiling). --dry-run prints the table instead of writing it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import lora_modes  # noqa: E402
import mixed_batch  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
START, END = "<!-- report:start -->", "<!-- report:end -->"


def row(what: str, r: dict, pair: str, target: str) -> str:
    return (f"| {what} | {pair} | {r['ratios'][pair]:.3f} | {r['min_ratios'][pair]:.3f} | "
            f"{r['paired_ratios'][pair]:.3f} | {target} |")


def table(modes: dict, mixed: dict, argv: list[str]) -> str:
    lines = [f"Regenerated {datetime.date.today()} by `python benchmarks/report.py {' '.join(argv)}` "
             f"(torch {torch.__version__}, {torch.get_num_threads()} threads). Ratios of medians, of minimums and the "
             "median per-round ratio; ideal eval ratio "
             f"{modes['ideal']:.3f}. 'peftc off' is peftc with its adapters disabled (its own base graph).", "",
             "| mode | ratio | medians | minimums | per round | target |", "|---|---|---|---|---|---|"]
    for mode, title in (("no_grad", "eval, `torch.no_grad()`"), ("inference", "eval, `torch.inference_mode()`"),
                        ("compiled", "compiled (inductor), `no_grad`")):
        if mode not in modes:
            continue
        r = modes[mode]
        targets = {"peftc / base": "<= 1.06" if mode != "compiled" else "<= 1.08",
                   "peftc / PEFT": "<= 0.98" if mode != "compiled" else "<= 1.00"}
        for pair in ("peftc / base", "PEFT / base", "peftc / PEFT", "peftc / peftc off", "peftc off / base"):
            lines.append(row(title, r, pair, targets.get(pair, "")))
    if "train" in modes:
        lines.append(row("training step", modes["train"], "peftc / PEFT", "<= 0.95 (goal 0.90)"))
    if "saved" in modes:
        b = modes["saved"]["bytes"]
        lines.append(f"| activations saved for backward | peftc / PEFT | {modes['saved']['ratio']:.3f} | | | "
                     f"<= 1.00 (goal 0.75); {b['peftc'] / 2**20:.2f} vs {b['PEFT'] / 2**20:.2f} MiB |")
    for pair, target in (("peftc 8 / peftc 1", "<= 1.05"), ("PEFT 8 / PEFT 1", ""), ("peftc 8 / PEFT 8", "")):
        lines.append(row("8-adapter mixed batch (mixed_batch.py)", mixed, pair, target))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compiled", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    common = ["--rounds", str(args.rounds)] + (["--threads", str(args.threads)] if args.threads else [])
    modes = "no_grad,inference,train,saved" + ("" if args.no_compiled else ",compiled")
    got = lora_modes.main(common + ["--modes", modes])
    mixed = mixed_batch.main(common)
    text = table(got, mixed, sys.argv[1:])
    if args.dry_run:
        print(text)
        return
    with open(README) as f:
        doc = f.read()
    if START not in doc or END not in doc:
        raise SystemExit(f"{README} has no {START} ... {END} markers")
    doc = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", doc, flags=re.S)
    with open(README, "w") as f:
        f.write(doc)
    print(text)


if __name__ == "__main__":
    main()
