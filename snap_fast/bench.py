"""``snap-fast bench``: run the regularizer benchmark (``benchmarks/bench_regularizer.py``).

The benchmark and its baselines (``benchmarks/peer.py``) live in the source tree, not in the
installed package, so that they stay independent of the code they measure. This subcommand loads
that script from the checkout snap_fast is installed from (an editable install, as the README's
quick start does), or from the folder named by ``$SNAP_FAST_BENCHMARKS``, and runs it with the
same options::

    snap-fast bench --quick
    snap-fast bench --repeats 5 --output results.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["add_arguments", "benchmarks_dir", "run"]

ENV_VAR = "SNAP_FAST_BENCHMARKS"
SCRIPT = "bench_regularizer.py"


def benchmarks_dir() -> Path | None:
    """The folder holding ``bench_regularizer.py``: ``$SNAP_FAST_BENCHMARKS`` or the checkout's."""
    candidates = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    candidates.append(Path(__file__).resolve().parent.parent / "benchmarks")
    return next((c for c in candidates if (c / SCRIPT).is_file()), None)


def _load() -> ModuleType | None:
    folder = benchmarks_dir()
    if folder is None:
        return None
    name = "snap_fast_bench_regularizer"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own options (see ``python benchmarks/bench_regularizer.py --help``)."""
    module = _load()
    if module is not None:
        module.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; returns its exit status (2 when the benchmarks folder is missing)."""
    module = _load()
    if module is None:
        print(
            f"snap-fast bench: {SCRIPT} not found; run from a source checkout installed with "
            f"`pip install -e .`, or set {ENV_VAR} to the checkout's benchmarks/ folder",
            file=sys.stderr,
        )
        return 2
    try:
        return module.run(args)
    except ValueError as err:  # bad options: one line, not a traceback
        print(f"snap-fast bench: {err}", file=sys.stderr)
        return 2
