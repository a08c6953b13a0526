"""Segmented sort and sorted matching in Triton: the sorting step of the regularizer on the GPU.

The regularizer (SNAP.md §2) projects every weight tensor onto L directions and sorts the n
projected rows of each direction. All those 1-D problems ("segments") live back to back in one
flat buffer described by :class:`snap_fast.ops.swd.layout.SegmentLayout`. This file holds the kernels,
their launchers and the one function to swap for long segments:

* :func:`sort_segments_triton` sorts every segment ascending (used once per direction draw, on
  the initial projections).
* :func:`match_sorted_triton` computes the matched targets ``T`` with ``T[perm[k]] =
  sorted_ref[k]`` within every segment, ``perm`` sorting the current projections (the map of
  :func:`snap_fast.ops.swd.naive.matched_targets`). With ``T`` fixed, ``Σ |proj − T|^p`` and its
  autograd are the exact SWD value and gradient, so the backward pass is the projection GEMM's.

How a launch is organised
-------------------------
One program sorts one segment entirely in registers with ``tl.sort`` (a bitonic network), the
segment padded to a power-of-two ``BLOCK`` with keys that sort last. Segments are grouped by
``BLOCK`` (the next power of two of their length, at least :data:`MIN_BLOCK`), and each group is
one launch over an int64 table of segment ids, whatever the number of tensors: a whole model is
a handful of launches (one per distinct power of two), not a loop over its tensors. Grouping
keeps a length-1 segment (a norm weight) from being padded to the block of a 1536-row matrix.

Segments longer than :data:`MAX_BLOCK` (4096) elements do not fit one program's registers; they
go to the launchers' ``long_sort`` (by default :func:`sort_long_segments`: ``torch.sort`` over
each run of equal-length segments, one call per run); the backend registry passes the CUDA
segmented sort of ``csrc/`` there where it builds.

No argsort in Triton: the match kernel packs each value's order-preserving 32-bit key and its
position into one int64 (key in the high half, position in the low half), sorts those, and
reads the positions back from the low half.

Numerics: inputs may be float32, float16, bfloat16 or float64; they are cast to float32 right
after loading and outputs are float32. NaN: a NaN projection keeps a NaN ``proj − T`` (so the
regularizer is NaN, never a silently finite number); NaN keys sort after +inf (or before -inf
for a negative-signed NaN), exactly like the order of their bit patterns. A NaN in the
reference gives a NaN target, hence a NaN regularizer too.

Devices: CUDA tensors, or CPU tensors when the Triton interpreter was switched on
(``TRITON_INTERPRET=1`` set before ``triton`` was imported). Anything else raises a
``ValueError`` naming the device before any launch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from snap_fast.ops.swd.layout import SegmentLayout

__all__ = [
    "MAX_BLOCK",
    "MIN_BLOCK",
    "match_sorted_triton",
    "sort_long_segments",
    "sort_segments_triton",
]

#: Longest segment one program sorts in registers: 4096 int64 keys over 16 warps are 8 keys per
#: thread, well inside the register file. It covers every matrix of Llama-3.1-8B but the
#: 14336-row MLP and the embedding/head; longer segments go to :func:`sort_long_segments`.
MAX_BLOCK = 4096
#: Smallest block; shorter segments are padded up to it (tiny blocks gain nothing on a GPU).
MIN_BLOCK = 16

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------- kernels
@triton.jit
def _orderable_key(v):
    """float32 -> int32 whose signed order is the float order (NaN by bit pattern).

    Non-negative floats already order like their bits; negative floats order in reverse, so
    their 31 low bits are flipped (the sign bit stays, keeping them below the positives).
    """
    bits = v.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_to_float(key):
    """Inverse of :func:`_orderable_key` (the map is an involution on the bits)."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _sort_segments_kernel(
    x_ptr, x_stride, out_ptr, seg_ids_ptr, offsets_ptr, BLOCK: tl.constexpr
):
    # One program = one segment; its id comes from the group's table, its bounds from the
    # layout's int64 offset table (int64 so buffers over 2^31 elements index correctly).
    seg = tl.load(seg_ids_ptr + tl.program_id(0))
    start = tl.load(offsets_ptr + seg)
    length = tl.load(offsets_ptr + seg + 1) - start
    k = tl.arange(0, BLOCK)
    mask = k < length
    v = tl.load(x_ptr + (start + k) * x_stride, mask=mask, other=0.0).to(tl.float32)
    # Sorting integer keys instead of floats makes NaN placement deterministic; padding gets the
    # largest key so it lands after every real value and is never stored.
    key = tl.where(mask, _orderable_key(v), 0x7FFFFFFF)
    key = tl.sort(key)
    tl.store(out_ptr + start + k, _key_to_float(key), mask=mask)


@triton.jit
def _match_sorted_kernel(
    proj_ptr, proj_stride, ref_ptr, ref_stride, out_ptr, seg_ids_ptr, offsets_ptr,
    BLOCK: tl.constexpr,
):
    seg = tl.load(seg_ids_ptr + tl.program_id(0))
    start = tl.load(offsets_ptr + seg)
    length = tl.load(offsets_ptr + seg + 1) - start
    k = tl.arange(0, BLOCK)
    mask = k < length
    v = tl.load(proj_ptr + (start + k) * proj_stride, mask=mask, other=0.0).to(tl.float32)
    # (key << 32) | position: sorting these sorts the values and carries each one's position.
    # The key is sign-extended, so the signed int64 order is (key, position) lexicographic.
    packed = (_orderable_key(v).to(tl.int64) << 32) | k.to(tl.int64)
    packed = tl.where(mask, packed, 0x7FFFFFFFFFFFFFFF)
    packed = tl.sort(packed)
    # The low 32 bits hold the position of the rank-k value (truncating cast keeps them).
    pos = packed.to(tl.int32)
    ref = tl.load(ref_ptr + (start + k) * ref_stride, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + start + pos, ref, mask=mask)


# ------------------------------------------------------------------------------ long segments
def sort_long_segments(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the rows of a (count, n) block of segments too long for one Triton program.

    Args:
        block: (count, n) view of ``count`` equal-length segments, any float dtype, any strides.

    Returns:
        ``(values, indices)``: float32 (count, n) ascending rows and int64 (count, n) positions
        (``values = block[indices]`` row-wise). NaN sorts last, as in ``torch.sort``.

    The launchers' default ``long_sort``. The backend registry (:mod:`snap_fast.ops.backends`)
    passes CUB's segmented sort instead where that extension builds; the contract is this one.
    """
    return torch.sort(block.float(), dim=1)


LongSort = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


# ------------------------------------------------------------------------------- launch plans
@dataclass(frozen=True)
class _Plan:
    """How one layout is launched on one device with one block limit."""

    groups: tuple[tuple[int, torch.Tensor], ...]  # (BLOCK, int64 segment ids on the device)
    long_runs: tuple[tuple[int, int, int], ...]  # (start, count, length) runs sorted by torch
    offsets: torch.Tensor  # int64 (num_segments + 1,) on the device


# Plans are cached per layout object (layouts are immutable and reused every step), so the
# per-call cost is a dictionary lookup, not a pass over tens of thousands of segments.
_PLANS: weakref.WeakKeyDictionary[SegmentLayout, dict] = weakref.WeakKeyDictionary()


def _block_for(length: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(length))


def _plan(layout: SegmentLayout, device: torch.device, max_block: int) -> _Plan:
    per_layout = _PLANS.setdefault(layout, {})
    key = (str(device), max_block)
    if key in per_layout:
        return per_layout[key]
    ids: dict[int, list[torch.Tensor]] = {}
    long_runs = []
    first_segment = 0
    for start, count, length in layout.runs:
        if length > max_block:
            long_runs.append((start, count, length))
        else:
            ids.setdefault(_block_for(length), []).append(
                torch.arange(first_segment, first_segment + count, dtype=torch.int64)
            )
        first_segment += count
    groups = tuple(
        (block, torch.cat(parts).to(device)) for block, parts in sorted(ids.items())
    )
    plan = _Plan(groups, tuple(long_runs), layout.offsets(device))
    per_layout[key] = plan
    return plan


def _num_warps(block: int) -> int:
    # 8 keys per thread at the top size (4096 over 16 warps), at least one warp for small blocks.
    return min(16, max(1, block // 256))


# --------------------------------------------------------------------------------- validation
def _interpreted() -> bool:
    return not isinstance(_sort_segments_kernel, JITFunction)


def _check_device(device: torch.device, name: str) -> None:
    # The interpreter runs on host copies of any tensor; compiled kernels need CUDA memory.
    if device.type == "cuda" or (device.type == "cpu" and _interpreted()):
        return
    raise ValueError(
        f"the Triton kernels need CUDA tensors, but {name} is on device {device}; to run them "
        "on the CPU set TRITON_INTERPRET=1 before triton is first imported, or use "
        "backend='torch'"
    )


def _check_buffer(name: str, t: object, layout: SegmentLayout) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if t.dim() != 1 or t.numel() != layout.total:
        raise ValueError(
            f"{name} must be a flat buffer of shape ({layout.total},) for this layout, "
            f"got {tuple(t.shape)}"
        )
    return t


def _output(out: torch.Tensor | None, layout: SegmentLayout, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(layout.total, dtype=torch.float32, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.float32 or out.shape != (layout.total,) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape ({layout.total},), got "
            f"{out.dtype} {tuple(out.shape)} contiguous={out.is_contiguous()}"
        )
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the input is on {device}")
    return out


def _check_layout(layout: object) -> SegmentLayout:
    if not isinstance(layout, SegmentLayout):
        raise TypeError(f"layout must be a SegmentLayout, got {type(layout).__name__}")
    return layout


def _check_max_block(max_block: int) -> int:
    if isinstance(max_block, bool) or not isinstance(max_block, int) or max_block < 1:
        raise ValueError(f"max_block must be a positive int, got {max_block!r}")
    if max_block > MAX_BLOCK:
        raise ValueError(f"max_block must be <= MAX_BLOCK={MAX_BLOCK}, got {max_block}")
    return max_block


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device; make it the tensors' device (e.g. cuda:1).
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run_view(t: torch.Tensor, start: int, count: int, length: int) -> torch.Tensor:
    # Splitting one dimension is always a view, whatever the stride of the flat buffer.
    return t[start : start + count * length].view(count, length)


# ---------------------------------------------------------------------------------- launchers
def sort_segments_triton(
    x: torch.Tensor,
    layout: SegmentLayout,
    *,
    out: torch.Tensor | None = None,
    max_block: int = MAX_BLOCK,
    long_sort: LongSort | None = None,
) -> torch.Tensor:
    """Sort every segment of a flat buffer ascending.

    Args:
        x: (layout.total,) float32/float16/bfloat16/float64, CUDA (or CPU under the Triton
            interpreter); any stride.
        layout: the segments of ``x``.
        out: optional contiguous float32 (layout.total,) buffer to write into (every element is
            written); allocated with ``torch.empty`` when omitted.
        max_block: segments longer than this go to ``long_sort`` (at most
            :data:`MAX_BLOCK`; smaller values are for tests).
        long_sort: sorts the rows of a (count, n) block, with the contract of
            :func:`sort_long_segments` (the default).

    Returns:
        float32 (layout.total,) buffer, ascending within every segment (``out`` if given).

    Raises:
        TypeError / ValueError naming the argument for a wrong type, dtype, shape or device.
    """
    layout = _check_layout(layout)
    x = _check_buffer("x", x, layout)
    _check_device(x.device, "x")
    max_block = _check_max_block(max_block)
    out = _output(out, layout, x.device)
    if layout.total == 0:
        return out
    plan = _plan(layout, x.device, max_block)
    with _on_device(x.device):
        for block, seg_ids in plan.groups:
            _sort_segments_kernel[(seg_ids.numel(),)](
                x, x.stride(0), out, seg_ids, plan.offsets, BLOCK=block, num_warps=_num_warps(block)
            )
    for start, count, length in plan.long_runs:
        values, _ = (long_sort or sort_long_segments)(_run_view(x, start, count, length))
        _run_view(out, start, count, length).copy_(values)
    return out


def match_sorted_triton(
    proj: torch.Tensor,
    sorted_ref: torch.Tensor,
    layout: SegmentLayout,
    *,
    out: torch.Tensor | None = None,
    max_block: int = MAX_BLOCK,
    long_sort: LongSort | None = None,
) -> torch.Tensor:
    """Matched targets: ``T[perm[k]] = sorted_ref[k]`` in every segment, ``perm`` sorting ``proj``.

    Args:
        proj: (layout.total,) projections of the current weights, float32/float16/bfloat16/
            float64, any stride, CUDA (or CPU under the Triton interpreter).
        sorted_ref: (layout.total,) sorted initial projections, ascending within each segment,
            same dtypes allowed, same device as ``proj``.
        layout: the segments of both buffers.
        out: optional contiguous float32 (layout.total,) buffer to write into (every element is
            written); allocated with ``torch.empty`` when omitted.
        max_block: segments longer than this go to ``long_sort``.
        long_sort: as in :func:`sort_segments_triton`.

    Returns:
        float32 (layout.total,) targets ``T`` (``out`` if given). ``Σ |proj − T|^p`` equals
        ``Σ |sort(proj) − sorted_ref|^p`` per segment. Ties in ``proj`` are broken by position;
        any tie-break gives the same value.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, dtype, shape or device.
    """
    layout = _check_layout(layout)
    proj = _check_buffer("proj", proj, layout)
    sorted_ref = _check_buffer("sorted_ref", sorted_ref, layout)
    _check_device(proj.device, "proj")
    if sorted_ref.device != proj.device:
        raise ValueError(f"sorted_ref is on {sorted_ref.device} but proj is on {proj.device}")
    max_block = _check_max_block(max_block)
    out = _output(out, layout, proj.device)
    if layout.total == 0:
        return out
    plan = _plan(layout, proj.device, max_block)
    with _on_device(proj.device):
        for block, seg_ids in plan.groups:
            _match_sorted_kernel[(seg_ids.numel(),)](
                proj, proj.stride(0), sorted_ref, sorted_ref.stride(0), out, seg_ids, plan.offsets,
                BLOCK=block, num_warps=_num_warps(block),
            )
    for start, count, length in plan.long_runs:
        _, order = (long_sort or sort_long_segments)(_run_view(proj, start, count, length))
        ref = _run_view(sorted_ref, start, count, length).float()
        _run_view(out, start, count, length).scatter_(1, order, ref)
    return out
