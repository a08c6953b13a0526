"""The naive sliced-Wasserstein distance (SNAP.md §2): the float64-capable oracle of every kernel.

This module is the oracle every kernel is tested against and the CPU fallback. It favours
clarity over speed: one tensor at a time, ``torch.sort`` with autograd.

For a tensor with current value ``W`` (n×d) and initial value ``W0`` (n×d), directions
``Θ`` (d×L, unit columns) and exponent ``p``::

    SWD(W0, W) = (1/L) · Σ_l Σ_k | sort(W0 θ_l)_k − sort(W θ_l)_k |^p

Rows are the samples, summed (no 1/n, no p-th root). A 1-D tensor is a 1×d matrix.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

__all__ = [
    "as_matrix", "copy_projections_t", "fast_bf16_matmul", "matched_targets", "power_sum", "projections_t",
    "random_projections", "sliced_wasserstein_reference",
]


def random_projections(
    d: int,
    n_projections: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw ``n_projections`` directions uniformly on the unit sphere of R^d.

    Returns a (d, L) tensor whose columns are standard normal vectors normalised to unit length
    (the layout POT's ``projections`` argument uses). Drawn in float32 and then cast, so the same
    generator state gives the same directions for every dtype.
    """
    theta = torch.randn(d, n_projections, generator=generator, device=device, dtype=torch.float32)
    theta = theta / theta.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return theta.to(dtype)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View a parameter as the (n, d) matrix whose rows are the samples.

    A 1-D tensor is one sample (1×d); a tensor of rank > 2 keeps its first dimension as rows
    (n = shape[0]) and flattens the rest, as the authors' code does for conv kernels.
    """
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(1, -1)
    # explicit width (not -1) so an empty tensor still gets a shape and a clear error later
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def sliced_wasserstein_reference(
    w0: torch.Tensor, w: torch.Tensor, projections: torch.Tensor, p: float = 2.0
) -> torch.Tensor:
    """SWD(W0, W) for one tensor, differentiable in both arguments through ``torch.sort``.

    Args:
        w0: initial value, any shape; viewed with :func:`as_matrix` as (n, d).
        w: current value, same shape as ``w0``.
        projections: (d, L) directions, unit columns.
        p: exponent, > 0.

    Returns a 0-dim tensor in the promoted dtype of the inputs (use float64 for an oracle).
    """
    a0, a = as_matrix(w0), as_matrix(w)
    dtype = torch.promote_types(torch.promote_types(a0.dtype, a.dtype), projections.dtype)
    proj0 = a0.to(dtype) @ projections.to(dtype)
    proj = a.to(dtype) @ projections.to(dtype)
    sorted0 = torch.sort(proj0, dim=0).values
    sorted1 = torch.sort(proj, dim=0).values
    return (sorted1 - sorted0).abs().pow(p).sum() / projections.shape[1]


def matched_targets(proj: torch.Tensor, sorted_ref: torch.Tensor) -> torch.Tensor:
    """The optimal 1-D coupling, expressed as a target per projected sample.

    ``proj`` and ``sorted_ref`` are (..., n) with ``sorted_ref`` ascending along the last
    dimension. Returns ``T`` with ``T[..., perm[k]] = sorted_ref[..., k]`` where ``perm`` sorts
    ``proj``; then ``Σ |proj − T|^p`` equals ``Σ |sort(proj) − sorted_ref|^p``, and because the
    permutation is locally constant, its gradient with ``T`` held fixed is the SWD gradient
    (SNAP.md §2). Every backend computes exactly this map.
    """
    order = torch.argsort(proj, dim=-1)
    return torch.empty_like(sorted_ref).scatter_(-1, order, sorted_ref)


def power_sum(diff: torch.Tensor, p: float) -> torch.Tensor:
    """``Σ |diff|^p``, with the exact square for p = 2 (the common case, one cheap pass)."""
    return diff.square().sum() if p == 2 else diff.abs().pow(p).sum()


def projections_t(theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Θᵀ Wᵀ``, (L, n) float32, for directions Θ (d, L) and a matrix W (n, d) of any float dtype.

    Accumulated and returned in float32: bfloat16 / float16 weights then lose only their own
    rounding. Rounding the projections to the weights' dtype would cost far more, because the
    regularizer reads *differences* of sorted projections, ‖W − W0‖ / ‖W‖ times smaller than the
    projections themselves. Autograd reaches W (its gradient in W's dtype).
    """
    w_t = w.t() if w.dtype == torch.float32 else w.t().float()
    return theta.t().float() @ w_t


@functools.cache
def _cpu_has_bf16_dot() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_bf16_matmul(device: torch.device) -> bool:
    """Whether a bfloat16 GEMM on ``device`` beats converting its operands to float32 first.

    True on a CPU with bfloat16 dot-product instructions (there a bf16 GEMM accumulates in
    float32 at about twice the float32 rate; elsewhere it is emulated and slower than the
    conversion). False on other devices, where the conversion is cheap next to the GEMM.
    """
    return device.type == "cpu" and _cpu_has_bf16_dot()


def copy_projections_t(theta: torch.Tensor, w0: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Θᵀ W0ᵀ``, (L, n), for a kept copy ``w0`` of the initial weights (into ``out`` when given:
    a contiguous (L, n) tensor of any float dtype, rounded to it).

    For a bfloat16 copy on a machine with :func:`fast_bf16_matmul`, one bf16 GEMM with float32
    accumulation, returned in bfloat16: exact when ``theta`` is bf16-representable, up to the
    output's rounding. Only for a caller that rounds the result to bf16 anyway (the bf16 cache of
    sorted projections); rounding matters elsewhere (see :func:`projections_t`). Otherwise
    :func:`projections_t` (float32).
    """
    if w0.dtype == torch.bfloat16 and fast_bf16_matmul(w0.device):
        theta_t = theta.t().to(torch.bfloat16)
        if out is not None and out.dtype == torch.bfloat16:
            return torch.mm(theta_t, w0.t(), out=out)
        result = theta_t @ w0.t()
    else:
        result = projections_t(theta, w0)
    return result if out is None else out.copy_(result)
