"""The ``snap-fast`` command: ``data | unlearn | eval | forget | tofu | demo | bench``.

Each subcommand lives beside the code it drives and registers itself through two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this module only wires them together and
imports each one lazily so ``snap-fast --help`` stays fast. A user error a subcommand raises
(``ValueError``, ``TypeError``, ``FileNotFoundError``, ``FileExistsError``) becomes one line on
stderr, ``snap-fast COMMAND: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "data": ("snap_fast.data.cli", "build forget / hard-positive / held-out sets for a target"),
    "unlearn": ("snap_fast.train.cli", "unlearn a target with SNAP (or a baseline)"),
    "eval": ("snap_fast.eval.cli", "evaluate a model on a data folder"),
    "forget": ("snap_fast.forget", "forget any target end to end: data, unlearning, evaluation, report"),
    "tofu": ("snap_fast.tofu", "the TOFU benchmark end to end: fine-tune, unlearn with each method, table"),
    "demo": ("snap_fast.eval.demo", "end-to-end demo on the packaged SmolLM2 (target: Harry Potter)"),
    "bench": ("snap_fast.bench", "time the regularizer against the peer implementation"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(
        prog="snap-fast", description="Selective unlearning for LLMs with SNAP, with fast kernels."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, chosen = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(SUBCOMMANDS[chosen][0]).run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        # Bad input, found by the subcommand's checks before any heavy work: one line, exit 2,
        # the same for every subcommand.
        print(f"snap-fast {chosen}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
