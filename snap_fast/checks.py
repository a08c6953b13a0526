"""Argument validation with one contract: TypeError for a wrong type, ValueError for a wrong value.

Every message names the argument. Public entry points call these before any heavy work, so bad
input fails fast and leaves nothing half written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["check_choice", "check_int", "check_number", "check_str_list", "check_tensor"]


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """``value`` must be one of ``choices`` (ValueError listing them)."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")


def check_int(name: str, value: object, *, minimum: int | None = None, allow_none: bool = False) -> None:
    """An ``int`` (not a bool) ≥ ``minimum``; None passes when ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        if allow_none:
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_number(name: str, value: object, *, positive: bool = False, nonnegative: bool = False) -> None:
    """A finite real number (not a bool); ``> 0`` with ``positive``, ``>= 0`` with ``nonnegative``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if positive and not value > 0:  # also catches NaN
        raise ValueError(f"{name} must be > 0, got {value}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_str_list(name: str, values: object) -> None:
    """A sequence of ``str`` (a bare string is refused: it would be read character by character)."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of str")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(v).__name__}")


def check_tensor(name: str, t: object, *, floating: bool = True, nonempty: bool = True):
    """A ``torch.Tensor``, of a floating dtype and non-empty unless told otherwise; returns it."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t
