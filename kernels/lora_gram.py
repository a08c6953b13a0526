"""Gram matrices XᵢᵀXᵢ of many thin matrices in one Triton launch (LoRA-delta statistics).

:func:`snap_fast.ops.lora_stats.lora_delta_stats` needs, for every adapted layer, the r×r Gram matrices of
both LoRA factors (UᵀU and V Vᵀ = (Vᵀ)ᵀ(Vᵀ)). A model has hundreds of such factors, each tiny, so
a loop of ``torch.mm`` calls is launch-bound on a GPU. Here every factor is a "thin" matrix
``X`` (m × r, r ≤ :data:`MAX_RANK`) and one launch computes all of them:

* the factors are packed back to back into one float32 buffer, each in the order its storage
  already has (row-major m×r, or column-major when ``X`` is the transpose of a contiguous
  r×m factor, the usual case for V), so packing is one ``torch.cat`` without transposes;
* rows of long matrices are split into chunks of ``chunk_rows`` rows; an int64 offset table
  gives, per chunk, its matrix's start offset, row range, strides and rank;
* one program per chunk accumulates ``Xcᵀ Xc`` in float32 over tiles of ``BLOCK_M`` rows
  (``tl.dot`` with IEEE float32 precision, no TF32) and writes its full padded
  ``R_PAD × R_PAD`` partial, zeros outside r×r, so every output element is written;
* partials are summed per matrix with one ``index_add_`` (deterministic: no atomics).

Limits: r ≤ 64 (``R_PAD`` = next power of two ≥ 16, ≤ 64: one fp32 accumulator of at most 64×64
per program); any m; inputs float32 / float16 / bfloat16 (accumulated in float32, inputs cast
while packing, so the interpreter never does bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_RANK", "gram_matrices_triton"]

MAX_RANK = 64
BLOCK_M = 32


@triton.jit
def _gram_chunk_kernel(x_ptr, table_ptr, out_ptr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    chunk = tl.program_id(0)
    entry = table_ptr + chunk * 6  # a table row: offset, row_start, row_end, stride_row, stride_col, rank
    offset = tl.load(entry)
    row_start = tl.load(entry + 1)
    row_end = tl.load(entry + 2)
    stride_row = tl.load(entry + 3)
    stride_col = tl.load(entry + 4)
    rank = tl.load(entry + 5)

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, R_PAD)
    col_ok = cols < rank
    acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        r = m0 + rows
        ptrs = x_ptr + offset + r[:, None] * stride_row + cols[None, :] * stride_col
        tile = tl.load(ptrs, mask=(r < row_end)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(tile), tile, input_precision="ieee")
    out = out_ptr + chunk * R_PAD * R_PAD + cols[:, None] * R_PAD + cols[None, :]
    tl.store(out, acc)


def _padded_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def gram_matrices_triton(
    mats: list[torch.Tensor], *, chunk_rows: int = 4096, partials: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """``[Xᵢᵀ Xᵢ for Xᵢ in mats]`` in float32, with one kernel launch for all of them.

    Args:
        mats: 2-D float tensors ``Xᵢ`` of shape (mᵢ, rᵢ), 1 ≤ rᵢ ≤ :data:`MAX_RANK`, all on one
            device (CUDA, or CPU under ``TRITON_INTERPRET=1``); views such as ``V.t()`` are fine.
        chunk_rows: rows per program (positive multiple of ``BLOCK_M`` = 32); long factors are
            split so the launch has enough programs.
        partials: optional preallocated float32 (num_chunks, R_PAD, R_PAD) buffer for the
            per-chunk results (tests pass one poisoned with NaN: every element is overwritten).

    Returns a list of contiguous float32 (rᵢ, rᵢ) tensors.

    Raises:
        ValueError / TypeError naming the argument for an empty list, a non-2-D, non-float or
        empty matrix, a rank above 64, mixed devices, a bad ``chunk_rows`` or ``partials``.
    """
    if not isinstance(mats, (list, tuple)) or not mats:
        raise ValueError("mats must be a non-empty list of 2-D tensors")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < BLOCK_M or chunk_rows % BLOCK_M:
        raise ValueError(f"chunk_rows must be a positive multiple of {BLOCK_M}, got {chunk_rows!r}")
    device = mats[0].device
    for i, x in enumerate(mats):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise TypeError(f"mats[{i}] must be a 2-D float tensor")
        if x.numel() == 0:
            raise ValueError(f"mats[{i}] is empty (shape {tuple(x.shape)})")
        if not 1 <= x.shape[1] <= MAX_RANK:
            raise ValueError(f"mats[{i}] has rank (columns) {x.shape[1]}; the kernel handles 1..{MAX_RANK}")
        if x.device != device:
            raise ValueError(f"mats[{i}] is on {x.device}, mats[0] on {device}: use one device")

    r_pad = _padded_rank(max(x.shape[1] for x in mats))
    pieces: list[torch.Tensor] = []
    rows: list[list[int]] = []
    owner: list[int] = []
    offset = 0
    for i, x in enumerate(mats):
        m, r = x.shape
        # Keep the storage order: a transposed contiguous factor packs as its r×m original.
        if x.stride(0) == 1 and x.stride(1) == m:
            flat, stride_row, stride_col = x.t().reshape(-1), 1, m
        else:
            flat, stride_row, stride_col = x.reshape(-1), r, 1
        pieces.append(flat.to(torch.float32))
        for start in range(0, m, chunk_rows):
            rows.append([offset, start, min(start + chunk_rows, m), stride_row, stride_col, r])
            owner.append(i)
        offset += m * r
    packed = torch.cat(pieces)
    table = torch.tensor(rows, dtype=torch.int64, device=device)
    n_chunks = len(rows)
    if partials is None:
        partials = torch.empty(n_chunks, r_pad, r_pad, dtype=torch.float32, device=device)
    elif (
        not isinstance(partials, torch.Tensor)
        or partials.shape != (n_chunks, r_pad, r_pad)
        or partials.dtype != torch.float32
        or partials.device != device
        or not partials.is_contiguous()
    ):
        raise ValueError(f"partials must be a contiguous float32 ({n_chunks}, {r_pad}, {r_pad}) tensor on {device}")
    _gram_chunk_kernel[(n_chunks,)](packed, table, partials, R_PAD=r_pad, BLOCK_M=BLOCK_M)
    owner_t = torch.tensor(owner, dtype=torch.int64, device=device)
    sums = torch.zeros(len(mats), r_pad, r_pad, dtype=torch.float32, device=device).index_add_(0, owner_t, partials)
    return [sums[i, : x.shape[1], : x.shape[1]].contiguous() for i, x in enumerate(mats)]
