"""The `peftc` command line."""
from __future__ import annotations

import argparse
import logging
import sys


def _demo(args) -> int:
    from . import demo

    r = demo.run(args.out, epochs=args.epochs, seed=args.seed)
    print(demo.summary(r))
    return 0 if all(r["checks"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peftc", description="parameter-efficient fine-tuning as a compiler")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging (also PEFTC_LOG=debug)")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="LoRA fine-tune of the bundled all-MiniLM-L6-v2, save, reload and check",
                       description="Fine-tunes the bundled real all-MiniLM-L6-v2 with LoRA on the shipped topic data "
                                   "set, prints held-out accuracy before and after, saves the adapter in PEFT format, "
                                   "reloads it and checks it. Example: peftc demo --out /tmp/demo")
    d.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_demo)
    args = ap.parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
        logging.getLogger("peftc").setLevel(logging.DEBUG)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
