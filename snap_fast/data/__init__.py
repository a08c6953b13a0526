"""SNAP data: target specs, forget / hard-positive / held-out sets, collator, TOFU loader.

Submodules are imported lazily (``from snap_fast.data import build_dataset`` works), so importing
``snap_fast.data.collator`` from a training loop does not pull in the whole builder.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TargetSpec": "target",
    "builtin_target": "target",
    "build_dataset": "build",
    "DatasetSummary": "build",
    "QA_SETS": "sets",
    "ChatCollator": "collator",
    "render_prompt": "collator",
    "EndpointGenerator": "generators",
    "EndpointError": "generators",
    "ModelGenerator": "generators",
    "load_tofu": "tofu",
    "read_jsonl": "..io",
    "write_jsonl": "..io",
}

__all__ = [  # noqa: RUF022 (grouped by submodule, like _EXPORTS)
    "TargetSpec",
    "builtin_target",
    "build_dataset",
    "DatasetSummary",
    "QA_SETS",
    "ChatCollator",
    "render_prompt",
    "EndpointGenerator",
    "EndpointError",
    "ModelGenerator",
    "load_tofu",
    "read_jsonl",
    "write_jsonl",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if module.startswith(".") else f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
