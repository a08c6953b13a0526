"""The backend registry: one object per backend, and the one function that chooses among them.

The regularizer's heavy work is (1) projecting weights onto directions — a GEMM that PyTorch
already does well on every device — and (2) sorting the projected values of every segment (see
:class:`snap_fast.ops.swd.layout.SegmentLayout`) and matching them to the sorted initial
projections. Step (2), and the Gram matrices of the LoRA statistics, have several
implementations:

==========  ===========================================================================
``torch``   ``torch.sort`` per run of equal-length segments; ``torch.mm`` Grams; any device
``triton``  Triton kernels in ``snap_fast.kernels``: one launch for all segments, one for all
            Grams (CUDA, or the Triton interpreter when ``TRITON_INTERPRET=1``); segments too
            long for one program use CUB's segmented sort (``csrc/``) where it builds, else
            ``torch.sort``
``cpp``     the C++ extension in ``csrc/`` (CPU): parallel segment sorts with permutation
            reuse between calls, and a fused sort + reduction + gradient; Grams by ``torch.mm``
==========  ===========================================================================

Choice, first match wins: the ``backend=`` argument, the ``SNAP_FAST_BACKEND`` environment
variable, then ``auto`` (CUDA tensors → ``triton``; CPU tensors → ``cpp`` when the extension
builds, else ``torch``). :func:`choose_backend` is the only place that compares backend names;
everything else calls the chosen object's methods.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .swd.layout import SegmentLayout
from .swd.naive import matched_targets, power_sum

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Backend",
    "choose_backend",
    "choose_gram_backend",
    "get_backend",
    "match_sorted",
    "resolve_backend",
    "sort_segments",
]

BACKENDS = ("auto", "torch", "triton", "cpp")
ENV_VAR = "SNAP_FAST_BACKEND"

class Backend:
    """What every backend offers; the base implementation is plain PyTorch.

    Attributes:
        name: the registry name.
        reads_bf16_reference: the sort kernels read a bfloat16 sorted reference as stored, so
            callers skip a conversion pass.
        fused: the backend offers :meth:`swd_forward` (value and gradient in one pass).
        lora_fused: the backend offers :meth:`lora_swd_forward` (the fused pass for LoRA terms,
            projections formed from the factors inside the kernel).
        plain_fused: the backend offers :meth:`plain_swd_forward` (the fused pass for plain
            weights, projections formed inside the kernel).
    """

    name = "torch"
    reads_bf16_reference = False
    fused = False
    lora_fused = False
    plain_fused = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``'s tensors, or None when it can."""
        return None

    def sort_segments(
        self, x: torch.Tensor, layout: SegmentLayout, out: torch.Tensor | None = None, state: dict | None = None
    ) -> torch.Tensor:
        """Sort every segment of the flat buffer ``x`` ascending into ``out`` (a float32
        (layout.total,) buffer, which may be ``x`` itself) or a new float32 buffer. A backend that
        reuses permutations between calls stores the sorting permutation in ``state`` (the
        others ignore it)."""
        out = torch.empty(layout.total, dtype=torch.float32, device=x.device) if out is None else out
        for src, dst in zip(layout.views(x), layout.views(out)):
            dst.copy_(torch.sort(src, dim=1).values)
        return out

    def match_sorted(
        self, proj: torch.Tensor, sorted_ref: torch.Tensor, layout: SegmentLayout, state: dict | None
    ) -> torch.Tensor:
        """Matched targets ``T[perm[k]] = sorted_ref[k]`` per segment (a new float32 buffer)."""
        out = torch.empty(layout.total, dtype=torch.float32, device=proj.device)
        for p, r, o in zip(layout.views(proj), layout.views(sorted_ref), layout.views(out)):
            o.copy_(matched_targets(p, r.float()))
        return out

    def swd_sum(
        self, proj: torch.Tensor, sorted_ref: torch.Tensor, layout: SegmentLayout, *, p: float,
        n_projections: int, state: dict | None, offset: torch.Tensor | None, ref_sorted: bool = True,
    ) -> torch.Tensor:
        """``Σ |sort(x) − sorted_ref|^p / L``, x = proj (+ offset), differentiable in ``proj``.

        Matched targets held fixed make autograd of the sum the exact SWD (sub)gradient: the
        sorting permutation is locally constant. ``ref_sorted=False``: ``sorted_ref`` holds the
        reference unsorted (sorted here first; the C++ backend sorts it inside its fused pass).
        """
        if not ref_sorted:
            sorted_ref = self.sort_segments(sorted_ref.float(), layout)
        if offset is not None:
            proj = proj.float() + offset  # one promoting pass, no separate conversion of offset
        with torch.no_grad():
            targets = self.match_sorted(proj.detach(), sorted_ref, layout, state)
        return power_sum(proj.float() - targets, p) / n_projections

    def gram_matrices(self, mats: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[MᵀM]`` float32 (r, r) for every (m, r) matrix: one batched GEMM per shape."""
        out: list[torch.Tensor | None] = [None] * len(mats)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(mats):
            by_shape.setdefault(tuple(m.shape), []).append(i)
        for idx in by_shape.values():
            stacked = torch.stack([mats[i].detach() for i in idx]).float()  # (g, m, r)
            grams = torch.bmm(stacked.transpose(1, 2), stacked)
            for i, g in zip(idx, grams):
                out[i] = g
        return out  # type: ignore[return-value]


class TorchBackend(Backend):
    """``torch.sort`` and ``torch.mm``: any device; the fallback."""


class TritonBackend(Backend):
    """The Triton kernels of ``snap_fast.kernels`` (CUDA, or the interpreter)."""

    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return (
            f"backend='triton' needs CUDA tensors (got device {device}); to run the Triton "
            "kernels on the CPU set TRITON_INTERPRET=1 before triton is imported"
        )

    @staticmethod
    def _long_sort(device: torch.device) -> Callable | None:
        """The sort for segments too long for one Triton program: CUB where it builds."""
        if device.type != "cuda":
            return None
        from .swd import cpp

        return cpp.cuda_sort_rows if cpp.cuda_available() else None

    def sort_segments(self, x, layout, out=None, state=None):
        from snap_fast.kernels.segmented_sort import sort_segments_triton

        return sort_segments_triton(x, layout, out=out, long_sort=self._long_sort(x.device))

    def match_sorted(self, proj, sorted_ref, layout, state):
        from snap_fast.kernels.segmented_sort import match_sorted_triton

        return match_sorted_triton(proj, sorted_ref, layout, long_sort=self._long_sort(proj.device))

    def gram_matrices(self, mats):
        from snap_fast.kernels.lora_gram import gram_matrices_triton

        return list(gram_matrices_triton([m.detach() for m in mats]))


class CppBackend(Backend):
    """The C++ extension (CPU): sorts with permutation reuse, and the fused value + gradient."""

    name = "cpp"
    reads_bf16_reference = True
    fused = True
    lora_fused = True
    plain_fused = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cpu":
            return f"backend='cpp' runs on CPU tensors only (got device {device})"
        from .swd import cpp

        if not cpp.available():
            return f"the C++ extension is unavailable: {cpp.unavailable_reason('cpu')}"
        return None

    def sort_segments(self, x, layout, out=None, state=None):
        from .swd import cpp

        return cpp.sort_segments(x, layout, out=out, state=state)

    def match_sorted(self, proj, sorted_ref, layout, state):
        from .swd import cpp

        return cpp.match_sorted(proj, sorted_ref, layout, state)

    def swd_forward(self, proj, sorted_ref, layout, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused value and gradient; see :func:`snap_fast.ops.swd.cpp.swd_forward`."""
        from .swd import cpp

        return cpp.swd_forward(proj, sorted_ref, layout, **kwargs)

    def plain_swd_forward(self, sorted_ref, layout, weights, theta_t, **kwargs):
        """Fused value and gradient, projections formed per term; see
        :func:`snap_fast.ops.swd.cpp.plain_swd_forward`."""
        from .swd import cpp

        return cpp.plain_swd_forward(sorted_ref, layout, weights, theta_t, **kwargs)

    def lora_swd_forward(self, base, sorted_ref, layout, u, v, theta, scaling, **kwargs):
        """Fused value and LoRA factor gradients; see :func:`snap_fast.ops.swd.cpp.lora_swd_forward`."""
        from .swd import cpp

        return cpp.lora_swd_forward(base, sorted_ref, layout, u, v, theta, scaling, **kwargs)

    def swd_sum(self, proj, sorted_ref, layout, *, p, n_projections, state, offset, ref_sorted=True):
        return _CppFusedSWD.apply(proj, sorted_ref, layout, float(p), 1.0 / n_projections, state, offset, ref_sorted)


class _CppFusedSWD(torch.autograd.Function):
    """The C++ backend's :meth:`Backend.swd_sum`: sort, differences, reduction and gradient in
    one pass over the buffer (the C++ sum is accumulated in float64), instead of several
    full-buffer passes (difference, power, sum and their backward)."""

    @staticmethod
    def forward(ctx, proj, sorted_ref, layout, p, scale, state, offset, ref_sorted):  # type: ignore[override]
        from .swd import cpp

        value, grad = cpp.swd_forward(proj.detach(), sorted_ref, layout, p=p, scale=scale, state=state, offset=offset,
                                      ref_sorted=ref_sorted)
        ctx.save_for_backward(grad)
        ctx.proj_dtype = proj.dtype
        return value.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.proj_dtype), None, None, None, None, None, None, None


_REGISTRY: dict[str, Backend] = {b.name: b for b in (TorchBackend(), TritonBackend(), CppBackend())}


def get_backend(backend: str | Backend) -> Backend:
    """The registered object for a concrete backend name (an object is returned as is)."""
    if isinstance(backend, Backend):
        return backend
    try:
        return _REGISTRY[backend]
    except KeyError:
        raise ValueError(f"backend={backend!r} is not one of {tuple(_REGISTRY)}") from None


def choose_backend(device: torch.device | str, backend: str | None = None) -> Backend:
    """The backend that runs the sorting step for tensors on ``device``.

    Args:
        device: where the tensors live.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cpp"`` (any case, spaces ignored);
            None reads ``$SNAP_FAST_BACKEND``, default ``auto``.

    Raises:
        ValueError: unknown name, or a backend that cannot run on ``device`` (for example
            ``triton`` for CPU tensors without ``TRITON_INTERPRET=1``).
        RuntimeError: ``cpp`` was asked for on the CPU but the extension does not build.
    """
    device = torch.device(device)
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    requested = requested.strip().lower()
    if requested not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={requested!r} is not one of {BACKENDS}")
    if requested == "auto":
        if device.type == "cuda":
            return _REGISTRY["triton"]
        if device.type == "cpu" and _REGISTRY["cpp"].unavailable_reason(device) is None:
            return _REGISTRY["cpp"]
        return _REGISTRY["torch"]
    chosen = _REGISTRY[requested]
    reason = chosen.unavailable_reason(device)
    if reason is not None:
        if requested == "cpp" and device.type == "cpu":
            raise RuntimeError(f"backend='cpp' was requested but {reason}")
        raise ValueError(reason)
    return chosen


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The name of :func:`choose_backend`'s choice."""
    return choose_backend(device, backend).name


def choose_gram_backend(device: torch.device, backend: str | None, max_rank: int) -> Backend:
    """The backend computing the LoRA statistics' Gram matrices.

    Args:
        device: where the factors live.
        backend: ``"torch"``, ``"triton"``, or None (Triton on CUDA when ``max_rank`` is within
            the kernel's limit, 64, else torch).
        max_rank: the largest LoRA rank among the factors.

    Raises:
        ValueError: another name, Triton where it cannot run, or a rank above 64 for Triton.
    """
    if backend is None:
        use_triton = device.type == "cuda" and max_rank <= _triton_max_gram_rank()
        return _REGISTRY["triton" if use_triton else "torch"]
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be None, 'torch' or 'triton', got {backend!r}")
    chosen = choose_backend(device, backend)
    if chosen.name == "triton" and max_rank > _triton_max_gram_rank():
        raise ValueError(
            f"backend='triton' handles LoRA ranks up to {_triton_max_gram_rank()}, the model has rank {max_rank}"
        )
    return chosen


def _triton_max_gram_rank() -> int:
    from snap_fast.kernels.lora_gram import MAX_RANK

    return MAX_RANK


def sort_segments(x: torch.Tensor, layout: SegmentLayout, backend: str | Backend) -> torch.Tensor:
    """Sort every segment of the flat buffer ``x`` ascending; returns a new float32 buffer."""
    return get_backend(backend).sort_segments(x, layout)


def match_sorted(
    proj: torch.Tensor,
    sorted_ref: torch.Tensor,
    layout: SegmentLayout,
    backend: str | Backend,
    state: dict | None = None,
) -> torch.Tensor:
    """Matched targets per segment (see :func:`snap_fast.ops.swd.naive.matched_targets`).

    Args:
        proj: flat (layout.total,) projections of the current weights, any float dtype.
        sorted_ref: flat (layout.total,) float32, ascending within each segment.
        layout: the segments.
        backend: a concrete name (see :func:`resolve_backend`) or a :class:`Backend`.
        state: a dict the caller keeps between calls while the directions do not change, and
            clears when they do; backends may cache there (the C++ backend keeps the previous
            permutations). ``None`` disables caching.

    Returns a new float32 (layout.total,) buffer ``T`` with ``T[perm[k]] = sorted_ref[k]`` within
    each segment, ``perm`` sorting ``proj``.
    """
    return get_backend(backend).match_sorted(proj, sorted_ref, layout, state)
