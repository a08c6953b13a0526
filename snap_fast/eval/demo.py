"""``snap-fast demo``: make SmolLM2-135M-Instruct forget Harry Potter, end to end, on a CPU.

The pipeline of ``snap-fast forget`` (:mod:`snap_fast.forget`: load, data, unlearn, evaluate,
report) with the built-in Harry Potter target: aliases, description, facts (reverse questions)
and hard positives about neighbouring fantasy works and authors (Tolkien, Narnia, Percy
Jackson, ...). Everything it needs ships with the package: no download.

``--quick`` shrinks every stage (a smoke run of a few minutes); ``--tiny`` runs the same
pipeline on a tiny random model (seconds; what CI runs). Python: :func:`run_demo`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from snap_fast.forget import (
    ForgetSettings,
    add_common_arguments,
    resolve_settings,
    run_forget,
    settings_from_args,
)

TARGET = "Harry Potter"


def run_demo(
    out: str | Path,
    *,
    settings: ForgetSettings | str = "full",
    model: str | None = None,
    threads: int | None = None,
    answer_cache: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the demo into ``out``; return its summary (also ``out/summary.json``).

    Args:
        out: output folder (see :func:`snap_fast.forget.run_forget`); running again resumes.
        settings: a :class:`~snap_fast.forget.ForgetSettings` or a preset name (``"full"``,
            ``"quick"``, ``"tiny"``).
        model, threads, answer_cache, progress, log: as in :func:`~snap_fast.forget.run_forget`.
    """
    from snap_fast.data.target import builtin_target

    preset, _ = resolve_settings(settings)
    title = f"SNAP demo: SmolLM2 forgets {TARGET}" if preset != "tiny" else None
    return run_forget(builtin_target(TARGET), out, settings=settings, model=model, threads=threads,
                      answer_cache=answer_cache, title=title, progress=progress, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``snap-fast demo`` options on ``parser``."""
    add_common_arguments(parser, "snap_fast_demo")
    parser.add_argument("--clean", action="store_true", help="delete --out first (the answer cache stays)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``snap-fast demo``."""
    settings = settings_from_args(args)
    if args.clean and Path(args.out).exists():
        shutil.rmtree(args.out)
    summary = run_demo(args.out, settings=settings, model=args.model, threads=args.threads,
                       answer_cache=args.answer_cache)
    print(json.dumps({"unlearned": summary["unlearned"], "timings_s": summary["timings_s"]}, indent=2))
    return 0
