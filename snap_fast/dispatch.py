"""Which backend runs the sorting step: the one place that decides.

The regularizer's heavy work is (1) projecting weights onto directions — a GEMM that PyTorch
already does well on every device — and (2) sorting the projected values of every segment (see
:mod:`snap_fast.layout`) and matching them to the sorted initial projections. Step (2) has
several implementations:

==========  ===========================================================================
``torch``   ``torch.sort`` per run of equal-length segments; any device; the fallback
``triton``  Triton kernels in ``snap_fast.kernels``: one launch for all segments (CUDA, or
            the Triton interpreter when ``TRITON_INTERPRET=1``)
``cpp``     the C++ extension in ``csrc/`` (CPU): parallel segment sorts with permutation
            reuse between calls
==========  ===========================================================================

Choice, first match wins: the ``backend=`` argument, the ``SNAP_FAST_BACKEND`` environment
variable, then ``auto`` (CUDA tensors → ``triton``; CPU tensors → ``cpp`` when the extension
builds, else ``torch``).
"""

from __future__ import annotations

import os

import torch

from .layout import SegmentLayout
from .reference import matched_targets

__all__ = ["BACKENDS", "resolve_backend", "sort_segments", "match_sorted"]

BACKENDS = ("auto", "torch", "triton", "cpp")
ENV_VAR = "SNAP_FAST_BACKEND"


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Return the concrete backend name for tensors on ``device``.

    Raises:
        ValueError: unknown name, or a backend that cannot run on ``device`` (for example
            ``triton`` for CPU tensors without ``TRITON_INTERPRET=1``).
    """
    device = torch.device(device)
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    requested = requested.strip().lower()
    if requested not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={requested!r} is not one of {BACKENDS}")
    if requested == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and _cpp_available():
            return "cpp"
        return "torch"
    if requested == "triton" and not _triton_usable(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); to run the Triton "
            "kernels on the CPU set TRITON_INTERPRET=1 before triton is imported"
        )
    if requested == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors only (got device {device})")
    if requested == "cpp" and not _cpp_available():
        raise RuntimeError("backend='cpp' was requested but the C++ extension is unavailable")
    return requested


def _cpp_available() -> bool:
    try:
        from . import _ext
    except ImportError:
        return False
    return _ext.available()


def sort_segments(x: torch.Tensor, layout: SegmentLayout, backend: str) -> torch.Tensor:
    """Sort every segment of the flat buffer ``x`` ascending; returns a new float32 buffer."""
    if backend == "triton":
        from .kernels.segmented_sort import sort_segments_triton

        return sort_segments_triton(x, layout)
    if backend == "cpp":
        from . import _ext

        return _ext.sort_segments(x, layout)
    out = torch.empty(layout.total, dtype=torch.float32, device=x.device)
    for src, dst in zip(layout.views(x), layout.views(out)):
        dst.copy_(torch.sort(src, dim=1).values)
    return out


def match_sorted(
    proj: torch.Tensor,
    sorted_ref: torch.Tensor,
    layout: SegmentLayout,
    backend: str,
    state: dict | None = None,
) -> torch.Tensor:
    """Matched targets per segment (see :func:`snap_fast.reference.matched_targets`).

    Args:
        proj: flat (layout.total,) projections of the current weights, any float dtype.
        sorted_ref: flat (layout.total,) float32, ascending within each segment.
        layout: the segments.
        backend: a name returned by :func:`resolve_backend`.
        state: a dict the caller keeps between calls while the directions do not change, and
            clears when they do; backends may cache there (the C++ backend keeps the previous
            permutations). ``None`` disables caching.

    Returns a new float32 (layout.total,) buffer ``T`` with ``T[perm[k]] = sorted_ref[k]`` within
    each segment, ``perm`` sorting ``proj``.
    """
    if backend == "triton":
        from .kernels.segmented_sort import match_sorted_triton

        return match_sorted_triton(proj, sorted_ref, layout)
    if backend == "cpp":
        from . import _ext

        return _ext.match_sorted(proj, sorted_ref, layout, state)
    out = torch.empty(layout.total, dtype=torch.float32, device=proj.device)
    for p, r, o in zip(layout.views(proj), layout.views(sorted_ref), layout.views(out)):
        o.copy_(matched_targets(p, r.float()))
    return out
