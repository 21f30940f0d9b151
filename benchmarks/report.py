"""Regenerate every figures table in benchmarks/README.md and the figures in README.md: run each benchmark (through
its main, in this process, under harness.py's rules) and write its table between that table's report markers
(`<!-- report:NAME:start -->` ... `<!-- report:NAME:end -->`).

    python benchmarks/report.py [--rounds 20] [--threads N] [--no-compiled] [--dry-run] [--quick]
                                [--only ia3,moe,qlora,generate]

Takes about 15 minutes on a 2-core CPU (most of it compiling). --no-compiled skips the compiled mode and
compile_speed.py (their tables are left as they are) and generate.py's compiled contestant (its table loses that
row); --dry-run prints the tables instead of writing them; --quick runs 2 rounds after 1 warm-up (a smoke test: its
figures are noise); --only regenerates the named tables (each benchmark runs once, however many of them read it).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import blocks  # noqa: E402
import compile_speed  # noqa: E402
import dora  # noqa: E402
import generate  # noqa: E402
import ia3  # noqa: E402
import lora_modes  # noqa: E402
import lora_overhead  # noqa: E402
import merge_speed  # noqa: E402
import mixed_batch  # noqa: E402
import moe  # noqa: E402
import qlora  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_README = os.path.join(HERE, "README.md")
ROOT_README = os.path.join(os.path.dirname(HERE), "README.md")
EVALS = (("no_grad", "eval, `torch.no_grad()`"), ("inference", "eval, `torch.inference_mode()`"),
         ("compiled", "compiled (inductor), `no_grad`"))


def marker(name: str) -> tuple[str, str]:
    return f"<!-- report:{name}:start -->", f"<!-- report:{name}:end -->"


def three(r: dict, pair: str) -> tuple[str, str, str]:
    return f"{r['ratios'][pair]:.3f}", f"{r['min_ratios'][pair]:.3f}", f"{r['paired_ratios'][pair]:.3f}"


def row(*cells) -> str:
    return "| " + " | ".join(cells) + " |"


def stamp(argv: list[str]) -> str:
    return (f"Regenerated {datetime.date.today()} by `python benchmarks/report.py {' '.join(argv)}`".rstrip() +
            f" (torch {torch.__version__}, {torch.get_num_threads()} threads).")


def modes_table(m: dict, mixed: dict, argv) -> str:
    head = row("mode", "ratio", "medians", "minimums", "per round", "target")
    lines = [f"{stamp(argv)} Ratios of medians, of minimums and the median per-round ratio; ideal eval ratio "
             f"{m['ideal']:.3f}. 'peftc off' is peftc with its adapters disabled (its own base graph); 'grad entry': "
             "the hidden state entering `model.layers.0` requires grad in every contestant of those rows; "
             "'peftc off -P': peftc compiled without base pass P.", "", head, "|---|---|---|---|---|---|"]
    for mode, title in EVALS:
        if mode in m:
            eager = mode != "compiled"
            targets = {"peftc / base": "<= 1.06" if eager else "<= 1.08",
                       "peftc / PEFT": "<= 0.98" if eager else "<= 1.00"}
            lines += [row(title, p, *three(m[mode], p), targets.get(p, "")) for p, _ in
                      ((" / ".join(x), 0) for x in lora_modes.EVAL_PAIRS)]
    if "train" in m:
        lines.append(row("training step, as users run them", "peftc / PEFT", *three(m["train"], "peftc / PEFT"),
                         "<= 0.95 (goal 0.90)"))
        for a, b in lora_modes.ADAPTER_PAIRS:
            what = ("adapter cost" if b in ("peftc off", "base") and a in ("peftc", "PEFT") else "base graph")
            lines.append(row(f"training step, {what} (grad entry)", f"{a} / {b}",
                             *three(m["train_adapter"], f"{a} / {b}"), ""))
    if "saved" in m:
        s, sa = m["saved"], m["saved_adapter"]
        mib = lambda d, k: f"{d['bytes'][k] / 2**20:.2f}"   # noqa: E731
        lines.append(row("activations saved for backward, as users run them", "peftc / PEFT",
                         f"{s['ratios']['peftc / PEFT']:.3f}", "", "",
                         f"<= 1.00 (goal 0.75); {mib(s, 'peftc')} vs {mib(s, 'PEFT')} MiB"))
        for a, b in lora_modes.ADAPTER_PAIRS:
            what = ("adapter cost" if b in ("peftc off", "base") and a in ("peftc", "PEFT") else "base graph")
            lines.append(row(f"activations saved, {what} (grad entry)", f"{a} / {b}",
                             f"{sa['ratios'][f'{a} / {b}']:.3f}", "", "", f"{mib(sa, a)} vs {mib(sa, b)} MiB"))
    for pair, target in (("peftc 8 / peftc 1", "<= 1.05"), ("PEFT 8 / PEFT 1", ""), ("peftc 8 / PEFT 8", "")):
        lines.append(row("8-adapter mixed batch (mixed_batch.py)", pair, *three(mixed, pair), target))
    return "\n".join(lines)


def ratio_table(r: dict, pairs, argv, note: str = "") -> str:
    """One benchmark's ratios: medians, minimums, per round."""
    lines = [f"{stamp(argv)}{note}", "", row("ratio", "medians", "minimums", "per round"), "|---|---|---|---|"]
    return "\n".join(lines + [row(" / ".join(p), *three(r, " / ".join(p))) for p in pairs])


def modes_by_mode(res: dict, pairs, argv, titles) -> str:
    lines = [stamp(argv) + " Ratios of medians (minimums, median per-round ratio).", "",
             row("mode", *(" / ".join(p) for p in pairs)), "|---" * (len(pairs) + 1) + "|"]
    for mode, title in titles:
        if mode in res:
            lines.append(row(title, *("{} ({}, {})".format(*three(res[mode], " / ".join(p))) for p in pairs)))
    return "\n".join(lines)


def summary(m: dict, merge: dict, mixed: dict, argv) -> str:
    """The figures in README.md."""
    cell = lambda r, p: "{} / {}".format(*(three(r, p)[i] for i in (0, 2)))   # noqa: E731
    lines = [f"{stamp(argv)} Medians / median per-round ratio; ideal eval ratio {m['ideal']:.3f}.", "",
             row("mode", "peftc / base", "PEFT / base", "peftc / PEFT"), "|---|---|---|---|"]
    for mode, title in EVALS:
        if mode in m:
            lines.append(row(title, *(cell(m[mode], p) for p in ("peftc / base", "PEFT / base", "peftc / PEFT"))))
    if "train" in m:
        t = m["train_adapter"]
        lines.append(row("training step (forward + backward)", "", "", cell(m["train"], "peftc / PEFT")))
        lines.append(row("training step, adapter alone (grad entry)", f"{cell(t, 'peftc / peftc off')} (/ peftc off)",
                         cell(t, "PEFT / base"), ""))
    if "saved" in m:
        s, sa = m["saved"], m["saved_adapter"]["ratios"]
        lines.append(row("activations saved for backward", f"{sa['peftc / peftc off']:.3f} (/ peftc off)",
                         f"{sa['PEFT / base']:.3f}", f"{s['ratios']['peftc / PEFT']:.3f} "
                         f"({s['bytes']['peftc'] / 2**20:.1f} vs {s['bytes']['PEFT'] / 2**20:.1f} MiB)"))
    lines += ["", "A merged adapter (`benchmarks/merge_speed.py`): merged / base "
              f"{merge['ratios']['merged / base']:.3f} by medians, {merge['paired_ratios']['merged / base']:.3f} per round. A batch with 8 different adapters "
              f"(`benchmarks/mixed_batch.py`): {mixed['ratios']['peftc 8 / peftc 1']:.3f} x (medians; "
              f"{mixed['paired_ratios']['peftc 8 / peftc 1']:.3f} per round) the same batch on one adapter; PEFT "
              f"{mixed['ratios']['PEFT 8 / PEFT 1']:.3f} x."]
    if "train" in m and "saved" in m:
        t, sv = m["train_adapter"]["ratios"], m["saved_adapter"]["ratios"]
        lines += ["", f"peftc's base graph against the HF model in a training step (grad entry): "
                  f"{t['peftc off / base']:.3f} x the time, {sv['peftc off / base']:.3f} x the saved activations; "
                  f"without the gated-activation pass {sv['peftc off -gated -sdpa_mask / base']:.3f} x (with it "
                  f"{sv['peftc off / peftc off -gated']:.3f} x, with `sdpa_mask` {sv['peftc off / peftc off -sdpa_mask']:.3f} x; "
                  "rows 'peftc off -P' in benchmarks/README.md). One run on a noisy machine: the ranges over several "
                  "runs are under \"Changes in the figures\" there."]
    return "\n".join(lines)


def qlora_table(q: dict, argv) -> str:
    """QLoRA (qlora.py): eval forwards, the training step and the saved activations, with the requirement and goal
    of the training step met or not."""
    graphs = "; ".join(f"{name}'s graph calls " + (", ".join(f"`{k}` x{v}" for k, v in sorted(ops.items()))
                                                  or "no peftc op") for name, ops in q["peftc_ops"].items())
    fusion = "'peftc' fuses each quantized layer with its LoRA update (the default), 'peftc unfused' fuse_quant=False"
    note = ("" if q.get("bf16_max_diff") is None else
            f" '{qlora.BF16}' is PEFT with bitsandbytes' default bf16 CPU path (max |logit diff| from fp32 PEFT "
            f"{q['bf16_max_diff']:.2e}).")
    if q.get("bf16_refused"):
        note = (f" '{qlora.BF16}' (PEFT with bitsandbytes' default bf16 CPU path) is left out: its first eval forward "
                f"fails on this model ({q['bf16_refused']}).")
    lines = [f"{stamp(argv)} 4-bit nf4, double quantization, fp32 compute (bitsandbytes' bf16 CPU repack off for base "
             f"and PEFT); LoRA r={qlora.H.R}, alpha={qlora.H.ALPHA}, dropout {qlora.DROPOUT}, all-linear; {fusion}; "
             f"{graphs}. Ratios of medians, of minimums and the median per-round ratio; '{qlora.ENTRY.strip()}': the "
             f"hidden state entering `{qlora.H.FIRST_BLOCK}` requires grad (the base trains nothing otherwise).{note}",
             "", row("mode", "ratio", "medians", "minimums", "per round", "target"), "|---|---|---|---|---|---|"]
    goal = qlora.verdicts(q)
    for mode, title in EVAL_TITLES:
        if mode in q:
            lines += [row(title, k, *three(q[mode], k), "") for k in q[mode]["ratios"]]
    if "train" in q:
        lines += [row(f"training step, train mode (dropout {qlora.DROPOUT})", k, *three(q["train"], k),
                      goal["train"] if k == "peftc / PEFT" else "") for k in q["train"]["ratios"]]
    mib = lambda d, k: f"{d['bytes'][k] / 2**20:.2f}"   # noqa: E731
    for key, title in (("saved", f"activations saved, train mode (dropout {qlora.DROPOUT})"),
                       ("saved_no_dropout", "activations saved, without LoRA dropout")):
        if key in q:
            d = q[key]
            target = lambda k: f"; {goal[key]}" if key in goal and k == "peftc / PEFT" else ""   # noqa: E731
            lines += [row(title, k, f"{v:.3f}", "", "", "{} vs {} MiB".format(*(mib(d, x) for x in k.split(" / ")))
                          + target(k)) for k, v in d["ratios"].items()]
    return "\n".join(lines)


def generate_table(g: dict, argv) -> str:
    """Generation (generate.py): the whole generate call peftc / PEFT with its requirement and goal, the reference
    ratios, then each contestant's milliseconds per new token."""
    verdict = g["verdicts"]
    lines = [f"{stamp(argv)} Greedy, {g['new_tokens']} new tokens, batch {g['batch']} x {g['prompt']}-token prompts "
             f"('8': batch 8, one adapter per row), LoRA r={generate.R} alpha={generate.ALPHA} on "
             f"{', '.join(generate.PROJ)}, fp32, `torch.inference_mode()`. Ratios of the whole call's time: medians, "
             "minimums and the median per-round ratio; target: requirement <= "
             f"{generate.REQUIRED:.2f}, goal <= {generate.GOAL:.2f} (medians).", "",
             row("ratio", "medians", "minimums", "per round", "target"), "|---|---|---|---|---|"]
    for pair in g["ratios"]:
        target = verdict[pair].split(": ", 1)[1] if pair in verdict else ""
        lines.append(row(pair, *three(g, pair), target))
    lines += ["", row("contestant", "batch", "ms per new token (median call / "
                      f"{g['new_tokens']})", "median call ms", "first call s (tracing, compiling)"),
              "|---|---|---|---|---|"]
    for name, ms in g["ms_per_token"].items():
        lines.append(row(name, str(g["batches"][name]), f"{ms:.2f}", f"{1e3 * g['medians_s'][name]:.1f}",
                         f"{g['first_call_s'][name]:.1f}"))
    return "\n".join(lines)


def write(path: str, blocks_: dict[str, str], dry_run: bool) -> None:
    with open(path) as f:
        doc = f.read()
    for name, text in blocks_.items():
        start, end = marker(name)
        if start not in doc or end not in doc:
            raise SystemExit(f"{path} has no {start} ... {end} markers for the {name} table")
        if dry_run:
            print(f"\n== {os.path.relpath(path)}: {name}\n{text}")
        doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", doc, flags=re.S)
    if not dry_run:
        with open(path, "w") as f:
            f.write(doc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-compiled", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 rounds after 1 warm-up (a smoke test)")
    ap.add_argument("--only", default=None, help="comma-separated tables to regenerate (default: all): "
                    + ", ".join(TABLES))
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    only = list(TABLES) if args.only is None else args.only.split(",")
    unknown = sorted(set(only) - set(TABLES))
    if unknown:
        raise SystemExit(f"--only: no table named {unknown}; the tables are {', '.join(TABLES)}")
    if args.no_compiled:
        only = [n for n in only if n != "compile_speed"]
    rounds, warmup = (2, 1) if args.quick else (args.rounds, args.warmup)
    common = ["--rounds", str(rounds), "--warmup", str(warmup)]
    common += ["--threads", str(args.threads)] if args.threads else []
    modes = "no_grad,inference,train,saved" + ("" if args.no_compiled else ",compiled")
    runs = {
        "lora_modes": lambda: lora_modes.main(common + ["--modes", modes]),
        "lora_overhead": lambda: lora_overhead.main(common),
        "merge_speed": lambda: merge_speed.main(common),
        "mixed_batch": lambda: mixed_batch.main(common),
        "dora": lambda: dora.main(common),
        "blocks": lambda: blocks.main(common),
        "ia3": lambda: ia3.main(common),
        "moe": lambda: moe.main(common),
        "qlora": lambda: qlora.main(common),
        "generate": lambda: generate.main(common + (["--no-compiled"] if args.no_compiled else [])),
        "compile_speed": lambda: compile_speed.main(common + ["--compile-base"]),
    }
    done: dict = {}

    def result(name: str) -> dict:
        """Each benchmark runs once, however many tables read it."""
        if name not in done:
            done[name] = runs[name]()
        return done[name]

    tables = {name: TABLES[name](result, argv) for name in only}
    readme = {n: t for n, t in tables.items() if n != "summary"}
    write(BENCH_README, readme, args.dry_run)
    if "summary" in tables:
        write(ROOT_README, {"summary": tables["summary"]}, args.dry_run)
    if not args.dry_run:
        print("\n\n".join(readme.values()))


EVAL_TITLES = (("no_grad", "eval, `torch.no_grad()`"), ("inference", "eval, `torch.inference_mode()`"))
TRAIN_TITLE = (("train", "training step"),)
# table name -> (result(benchmark name) -> dict, argv) -> its text
TABLES = {
    "modes": lambda r, argv: modes_table(r("lora_modes"), r("mixed_batch"), argv),
    "lora_overhead": lambda r, argv: ratio_table(r("lora_overhead"), lora_overhead.PAIRS, argv,
                                                 f" `torch.inference_mode()`; ideal {r('lora_overhead')['ideal']:.3f}."),
    "merge_speed": lambda r, argv: ratio_table(r("merge_speed"), merge_speed.PAIRS, argv, " `torch.inference_mode()`."),
    "mixed_batch": lambda r, argv: ratio_table(r("mixed_batch"), [("peftc 8", "peftc 1"), ("PEFT 8", "PEFT 1"),
                                                                  ("peftc 1", "base"), ("peftc 1x8", "peftc 1"),
                                                                  ("peftc 8", "PEFT 8")], argv,
                                               " `torch.inference_mode()`."),
    "dora": lambda r, argv: modes_by_mode(r("dora"), dora.PAIRS, argv, EVAL_TITLES + TRAIN_TITLE),
    "blocks": lambda r, argv: modes_by_mode(r("blocks"), [("blocks", "flat")], argv, EVAL_TITLES + TRAIN_TITLE),
    "ia3": lambda r, argv: modes_by_mode(r("ia3"), ia3.PAIRS, argv, EVAL_TITLES),
    "moe": lambda r, argv: modes_by_mode(r("moe"), [("peftc", "base"), ("PEFT", "base"), ("peftc", "PEFT")], argv,
                                         EVAL_TITLES[:1]) + "\n\n" + modes_by_mode(r("moe"), [("peftc", "PEFT")], argv,
                                                                                 TRAIN_TITLE),
    "qlora": lambda r, argv: qlora_table(r("qlora"), argv),
    "generate": lambda r, argv: generate_table(r("generate"), argv),
    "compile_speed": lambda r, argv: ratio_table(r("compile_speed"), [("peftc compiled", "peftc"),
                                                                      ("peftc compiled", "PEFT compiled"),
                                                                      ("peftc compiled", "base compiled"),
                                                                      ("base compiled", "base"),
                                                                      ("PEFT compiled", "PEFT"), ("peftc", "base")],
                                                 argv, " `torch.inference_mode()`, `--compile-base`."),
    "summary": lambda r, argv: summary(r("lora_modes"), r("merge_speed"), r("mixed_batch"), argv),
}


if __name__ == "__main__":
    main()
