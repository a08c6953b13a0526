"""Triton kernels of snap_fast, installed as ``snap_fast.kernels``.

One file per operation, each holding its kernels, launchers and documentation, for example
:mod:`snap_fast.kernels.segmented_sort`: :func:`sort_segments_triton` (sort every segment of a
flat buffer) and :func:`match_sorted_triton` (matched targets of the optimal 1-D coupling).

Backends are chosen in :mod:`snap_fast.ops.backends`, never here. Importing this package does not
import Triton: the names below load their module (and Triton) on first access, so
``import snap_fast.kernels`` works where Triton is not installed.
"""

from __future__ import annotations

import importlib

# Public name -> the submodule defining it.
_EXPORTS = {
    "MAX_BLOCK": "segmented_sort",
    "match_sorted_triton": "segmented_sort",
    "sort_long_segments": "segmented_sort",
    "sort_segments_triton": "segmented_sort",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
