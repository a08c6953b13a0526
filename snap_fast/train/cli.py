"""``snap-fast unlearn``: the command-line face of :func:`snap_fast.train.unlearn`.

Settings come from, in increasing priority: the defaults of :class:`UnlearnConfig`, a YAML file
(``--config``; with ``--resume`` and no ``--config``, the run folder's own ``config.yaml``), and
the flags given on the command line.

Exit codes: 0 done; 2 bad input (message on stderr); 3 NaN/inf loss (last good checkpoint kept);
130 stopped by SIGINT (Ctrl-C) and 143 by SIGTERM, after saving a checkpoint — rerun the same
command with ``--resume`` to continue.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from .config import UnlearnConfig
from .runtime import EXIT_CODES


def cli_options() -> list[tuple[str, dict[str, Any], str | None]]:
    """``(flag, argparse keyword arguments, group)`` for every :class:`UnlearnConfig` field with a
    flag, help text ending with the field's default: what ``snap-fast unlearn --help`` shows."""
    options = []
    for f in dataclasses.fields(UnlearnConfig):
        meta = f.metadata
        if "help" not in meta:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        help_text = meta["help"]
        if meta["action"] is None and f.default not in (None, ""):
            help_text += f" (default {f.default})"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if meta["action"] is not None:
            kwargs["action"] = meta["action"]
            if meta["const"] is not None:
                kwargs["const"] = meta["const"]
        else:
            kwargs["type"] = meta["type"] or (str if f.default is None else type(f.default))
            if meta["choices"] is not None:
                kwargs["choices"] = meta["choices"]
        options.append((flag, kwargs, meta["group"]))
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``unlearn`` flags on ``parser``: one per :class:`UnlearnConfig` field, help
    and defaults from the field's metadata (:func:`cli_options`).

    Every flag's argparse default is SUPPRESS, so only the flags the user gave override the YAML
    file and the dataclass defaults.
    """
    parser.add_argument("--config", default=None, help="YAML config file (flags override it)")
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for flag, kwargs, group in cli_options():
        if group is not None and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        target = parser if group is None else groups[group]
        target.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def options_markdown() -> str:
    """The flag table of docs/training.md, from the same field metadata as ``--help`` (a test
    keeps the page equal to it)."""
    lines = ["| flag | config field | default | meaning |", "|---|---|---|---|"]
    for flag, kwargs, _ in cli_options():
        field = kwargs["dest"]
        default = getattr(UnlearnConfig, field)
        shown = "—" if default in (None, "") else f"`{default}`"
        action = kwargs.get("action")
        if action is not None:
            set_to = kwargs["const"] if action == "store_const" else action == "store_true"
            shown = f"`{default}` (`{set_to}` with the flag)"
        meaning = kwargs["help"].removesuffix(f" (default {default})")
        lines.append(f"| `{flag}` | `{field}` | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"


def config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    """The :class:`UnlearnConfig` the flags describe (YAML base, flags on top)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    base: dict = {}
    if args.config:
        base = UnlearnConfig.from_yaml(args.config).to_dict()
    elif given.get("resume") and given.get("out") and (Path(given["out"]) / "config.yaml").is_file():
        base = UnlearnConfig.from_yaml(Path(given["out"]) / "config.yaml").to_dict()
    base.update(given)
    base["notes"] = {**base.get("notes", {}), "argv": sys.argv[1:]}
    return UnlearnConfig.from_dict(base)


def run(args: argparse.Namespace) -> int:
    """Run ``snap-fast unlearn``; returns the process exit code (see the module docstring)."""
    from .recipe import NonFiniteLossError, unlearn

    try:
        config = config_from_args(args)
        result = unlearn(config)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"snap-fast unlearn: error: {exc}", file=sys.stderr)
        return EXIT_CODES["invalid"]
    except NonFiniteLossError as exc:
        print(f"snap-fast unlearn: {exc}", file=sys.stderr)
        return EXIT_CODES["diverged"]
    if result.status == "completed" and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.steps} steps; adapter/model in {result.final_dir}")
    return result.exit_code
