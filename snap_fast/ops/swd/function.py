"""The sliced-Wasserstein distance with autograd: one tensor pair, or a flat buffer of projections.

The fast paths all share one shape of computation, written once in :func:`swd_from_projections`:
project (a GEMM, done by PyTorch so autograd gives ``∂/∂W = G Θᵀ``), then — without autograd —
match every projected value to its sorted initial counterpart (a backend's sort), then reduce
``Σ |P − T|^p / L``. With the matched targets ``T`` held fixed, autograd of that sum is the exact
SWD (sub)gradient, because the sorting permutation is locally constant.
"""

from __future__ import annotations

import torch

from ...checks import check_int, check_number, check_tensor
from ..backends import Backend, choose_backend, get_backend
from .layout import SegmentLayout
from .naive import (
    as_matrix,
    projections_t,
    random_projections,
    sliced_wasserstein_reference,
)

__all__ = ["check_swd_args", "sliced_wasserstein", "swd_from_projections"]


def check_swd_args(n_projections: int, p: float) -> None:
    """Validate the two scalar hyper-parameters shared by every entry point."""
    check_int("n_projections", n_projections, minimum=1)
    check_number("p", p, positive=True)


def swd_from_projections(
    proj: torch.Tensor,
    sorted_ref: torch.Tensor,
    layout: SegmentLayout,
    *,
    n_projections: int,
    p: float,
    backend: str | Backend,
    state: dict | None = None,
    offset: torch.Tensor | None = None,
    ref_sorted: bool = True,
) -> torch.Tensor:
    """Σ over segments of Σ_k |sort(x)_k − sorted_ref_k|^p, divided by L, x = proj (+ offset).

    Args:
        proj: flat (layout.total,) projections of the current weights, carrying autograd.
        sorted_ref: flat (layout.total,) sorted initial projections (no gradient), float32 or
            bfloat16 (the C++ backend reads bf16 as stored; other backends convert it).
        layout: the segment layout of both buffers.
        n_projections: L, the divisor.
        p: exponent > 0.
        backend: a concrete backend name or object (see :mod:`snap_fast.ops.backends`).
        state: optional cache dict for backends that reuse permutations.
        offset: optional flat (layout.total,) constant added to ``proj`` (no gradient; float32
            or bfloat16): the regularizer's cached constant part of the projections (LoRA
            ``W0 Θ``). The C++ backend adds it inside its kernel; the others add it first.
        ref_sorted: False when ``sorted_ref`` holds the initial projections unsorted: the C++
            backend sorts each segment inside its fused pass and seeds the sort of ``x`` with
            that order; the others sort the buffer first.

    Returns a float32 0-dim tensor. Non-finite projections give a non-finite value (NaN
    propagates; it is never silently dropped).
    """
    return get_backend(backend).swd_sum(
        proj, sorted_ref, layout, p=float(p), n_projections=n_projections, state=state, offset=offset,
        ref_sorted=ref_sorted,
    )


def sliced_wasserstein(
    w0: torch.Tensor,
    w: torch.Tensor,
    n_projections: int = 100,
    p: float = 2,
    projections: torch.Tensor | None = None,
    seed: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sliced-Wasserstein regularizer SWD(W0, W) of SNAP.md §2, with autograd.

    ``SWD = (1/L) Σ_l Σ_k |sort(W0 θ_l)_k − sort(W θ_l)_k|^p`` where rows are samples (summed,
    no 1/n, no p-th root); equals ``n · SW_p^p`` between the empirical row distributions, i.e.
    ``n * ot.sliced_wasserstein_distance(W0, W, projections=Θ, p=p) ** p``.

    Args:
        w0: initial weights, float, shape (n, d), (d,) (one row) or higher rank (rows = dim 0).
        w: current weights, same shape as ``w0`` (may differ in float dtype).
        n_projections: L, number of directions when ``projections`` is not given.
        p: exponent, > 0.
        projections: optional (d, L) directions with unit columns (POT's layout); when given,
            ``n_projections`` and ``seed`` are ignored.
        seed: seed for drawing the directions (``None``: from the global torch RNG).
        backend: force ``"torch"``, ``"triton"`` or ``"cpp"`` (default: auto, see
            :func:`snap_fast.ops.backends.choose_backend`).

    Returns:
        float32 0-dim tensor (float64 if an input is float64 and the reference path is used).
        Differentiable in ``w``; if ``w0`` requires grad the reference path (autograd through
        ``torch.sort``) runs so both get gradients.

    Raises:
        TypeError / ValueError naming the argument on non-tensor, integer, empty or mismatched
        inputs, ``n_projections < 1`` or ``p <= 0``.
    """
    check_tensor("w0", w0)
    check_tensor("w", w)
    if w0.shape != w.shape:
        raise ValueError(f"w0 and w must have the same shape, got {tuple(w0.shape)} and {tuple(w.shape)}")
    if w0.device != w.device:
        raise ValueError(f"w0 and w must be on the same device, got {w0.device} and {w.device}")
    check_swd_args(n_projections, p)
    check_int("seed", seed, allow_none=True)
    a0, a = as_matrix(w0), as_matrix(w)
    n, d = a.shape
    if projections is None:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=w.device).manual_seed(seed)
        projections = random_projections(d, n_projections, generator=generator, device=w.device)
    else:
        check_tensor("projections", projections)
        if projections.dim() != 2 or projections.shape[0] != d:
            raise ValueError(
                f"projections must have shape (d, L) = ({d}, L) for inputs of shape "
                f"{tuple(w.shape)}, got {tuple(projections.shape)}"
            )
        projections = projections.to(w.device)
    n_dirs = projections.shape[1]

    if w0.requires_grad or torch.float64 in (w0.dtype, w.dtype, projections.dtype):
        return sliced_wasserstein_reference(w0, w, projections, p)

    chosen = choose_backend(w.device, backend)
    layout = SegmentLayout.from_blocks([(n_dirs, n)])
    proj = projections_t(projections, a).reshape(-1)  # float32 whatever the weights' dtype
    with torch.no_grad():
        proj0 = projections_t(projections, a0).reshape(-1)
        sorted_ref = chosen.sort_segments(proj0, layout)
    return swd_from_projections(proj, sorted_ref, layout, n_projections=n_dirs, p=float(p), backend=chosen)
