"""The Python face of the C++/CUDA extension in ``csrc/``: compiled on first use, cached, validated.

Nothing is compiled when snap_fast is installed. The first call of :func:`available` (made by the
backend registry for CPU tensors) compiles ``csrc/swd_cpu.cpp`` with
``torch.utils.cpp_extension.load`` (pybind11, ninja) into a cache folder keyed by the torch
version, the Python version and a hash of the sources and flags::

    $SNAP_FAST_CACHE/ext/<key>/      or   ~/.cache/snap_fast/ext/<key>/

Later processes load the cached library in well under a second; concurrent first builds are
serialised by torch's lock file in that folder. When the build fails (no compiler, no ninja, ...)
or ``SNAP_FAST_DISABLE_EXT=1`` is set, :func:`available` returns False, one warning per process
says why, and the registry falls back to the PyTorch path.

The CUDA segmented sort (``csrc/segmented_sort_cuda.cu``, CUB) is a separate extension, built only
when torch has CUDA and ``nvcc`` is found; see :func:`cuda_available`. The CPU build never touches
it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from .layout import SegmentLayout

__all__ = [
    "DISABLE_ENV",
    "available",
    "cuda_available",
    "cuda_segmented_argsort",
    "cuda_sort_rows",
    "lora_swd_forward",
    "match_sorted",
    "plain_swd_forward",
    "sort_segments",
    "swd_forward",
    "unavailable_reason",
]

DISABLE_ENV = "SNAP_FAST_DISABLE_EXT"
CPU_SOURCES = ("swd_cpu.cpp",)
CUDA_SOURCES = ("segmented_sort_cuda.cu",)

_lock = threading.Lock()
_modules: dict[str, Any] = {}
_reasons: dict[str, str] = {}
_warned: set[str] = set()


def _source_dir() -> Path:
    """Folder of the installed ``snap_fast.csrc`` package data (the repo's csrc/ when editable)."""
    return Path(str(importlib.resources.files("snap_fast.csrc")))


def _cache_root() -> Path:
    base = os.environ.get("SNAP_FAST_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "snap_fast"
    return root / "ext"


def _cpu_flags() -> tuple[list[str], list[str]]:
    # -O3 and no -march=native: the cache folder may be shared between machines (home on NFS),
    # and a binary built for a newer CPU would crash on an older one. at::parallel_for is an
    # inline template that uses OpenMP pragmas, so the extension itself needs -fopenmp.
    cflags = ["-O3"]
    ldflags: list[str] = []
    if platform.system() == "Linux":
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _build_key(sources: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    h.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    h.update(platform.machine().encode())
    h.update(" ".join(flags).encode())
    for src in sources:
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _build(kind: str) -> Any:
    """Compile (or load from the cache) the ``kind`` extension ("cpu" or "cuda"); raises on failure."""
    from torch.utils import cpp_extension

    src_dir = _source_dir()
    if kind == "cpu":
        sources = [src_dir / s for s in CPU_SOURCES]
        cflags, ldflags = _cpu_flags()
        cuda_flags: list[str] = []
    else:
        sources = [src_dir / s for s in CUDA_SOURCES]
        cflags, ldflags = ["-O3"], []
        cuda_flags = ["-O3"]
    key = _build_key(sources, cflags + ldflags + cuda_flags)
    build_dir = _cache_root() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "name": f"snap_fast_{kind}_{key}",
        "sources": [str(s) for s in sources],
        "extra_cflags": cflags,
        "extra_ldflags": ldflags,
        "build_directory": str(build_dir),
        "verbose": False,
    }
    if kind == "cuda":
        kwargs["extra_cuda_cflags"] = cuda_flags
    return cpp_extension.load(**kwargs)


def _load(kind: str) -> Any | None:
    with _lock:
        if kind in _modules:
            return _modules[kind]
        if kind in _reasons:
            return None
        reason = _unavailable_before_build(kind)
        module = None
        if reason is None:
            try:
                module = _build(kind)
            except Exception as exc:  # noqa: BLE001 - any build/import failure means "use the PyTorch path"
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                reason = f"building it failed ({type(exc).__name__}: {first_line[:300]})"
        if module is None:
            _reasons[kind] = reason or "unknown"
            what = "C++ CPU extension" if kind == "cpu" else "CUDA segmented-sort extension"
            _warn_once(kind, f"snap_fast: the {what} is unavailable: {_reasons[kind]}; the PyTorch path is used instead.")
            return None
        _modules[kind] = module
        return module


def _unavailable_before_build(kind: str) -> str | None:
    if os.environ.get(DISABLE_ENV, "0").strip() not in ("", "0"):
        return f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} is set"
    if kind == "cuda":
        from torch.utils import cpp_extension

        if not torch.cuda.is_available():
            return "torch has no usable CUDA device"
        if cpp_extension.CUDA_HOME is None:
            return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def available() -> bool:
    """True when the CPU extension is loaded (built on first call and cached; never raises).

    On failure, or with ``SNAP_FAST_DISABLE_EXT=1``, returns False and warns once per process.
    """
    return _load("cpu") is not None


def cuda_available() -> bool:
    """True when the CUDA segmented-sort extension is loaded (needs CUDA torch and nvcc)."""
    return _load("cuda") is not None


def unavailable_reason(kind: str = "cpu") -> str | None:
    """Why the ``kind`` ("cpu" / "cuda") extension is unavailable, or None if it loaded or was not tried."""
    return _reasons.get(kind)


def _module() -> Any:
    module = _load("cpu")
    if module is None:
        raise RuntimeError(f"the snap_fast C++ extension is unavailable: {_reasons.get('cpu')}")
    return module


def _check_flat_buffer(name: str, t: object, layout: SegmentLayout) -> torch.Tensor:
    """Validate a flat buffer argument: a 1-D floating CPU tensor of ``layout.total`` values."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor for the C++ extension, got device {t.device}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (a flat segment buffer), got shape {tuple(t.shape)}")
    if t.numel() != layout.total:
        raise ValueError(f"{name} has {t.numel()} elements but the layout describes {layout.total}")
    return t.detach()


def _check_out_buffer(
    name: str, t: object, layout: SegmentLayout, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> None:
    """Validate a buffer the kernel writes: a contiguous CPU tensor of ``layout.total`` values, of
    one of ``dtypes``."""
    _check_flat_buffer(name, t, layout)
    if t.dtype not in dtypes or not t.is_contiguous():
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be a contiguous {names} buffer, got {t.dtype}"
                         + ("" if t.is_contiguous() else " (not contiguous)"))


def _flat_cpu_float(name: str, t: object, layout: SegmentLayout) -> torch.Tensor:
    """Validate a flat buffer argument; return it as a contiguous float32 CPU tensor."""
    return _check_flat_buffer(name, t, layout).to(torch.float32).contiguous()


def _flat_cpu_ref(name: str, t: object, layout: SegmentLayout) -> torch.Tensor:
    """Validate a flat read-only buffer; float32 and bfloat16 are kept as they are (the kernels
    read both: the regularizer's cache is bf16 and a per-call conversion would cost a full pass),
    other float dtypes become float32."""
    t = _check_flat_buffer(name, t, layout)
    if t.dtype not in (torch.float32, torch.bfloat16):
        t = t.to(torch.float32)
    return t.contiguous()


def _check_layout(layout: object) -> SegmentLayout:
    if not isinstance(layout, SegmentLayout):
        raise TypeError(f"layout must be a SegmentLayout, got {type(layout).__name__}")
    if layout.total == 0:
        raise ValueError("layout is empty: there is nothing to sort")
    if layout.max_length > 2**31 - 1:
        raise ValueError(f"layout has a segment of length {layout.max_length} > 2^31 - 1")
    return layout


def sort_segments(
    x: torch.Tensor, layout: SegmentLayout, out: torch.Tensor | None = None, state: dict | None = None
) -> torch.Tensor:
    """Sort every segment of the flat buffer ``x`` ascending.

    Args:
        x: (layout.total,) floating CPU tensor (float32 and bfloat16 are read as stored; other
            dtypes and strides are converted to contiguous float32 first).
        layout: the segments of ``x``.
        out: optional contiguous float32 or bfloat16 (layout.total,) CPU buffer for the result
            (bf16 values of a bf16 ``x`` are exact; a float32 ``x`` is rounded after sorting,
            which keeps the order); may be ``x`` itself (sorted in place).
        state: optional dict of :func:`swd_forward`: receives the sorting permutation of every
            segment, which the next ``swd_forward`` with this state starts from (a buffer whose
            order is close to ``x``'s, such as ``W Θ`` next to ``W0 Θ``, is then checked or
            repaired instead of sorted from scratch).

    Returns ``out``, or a new contiguous float32 (layout.total,) tensor. NaNs sort after +inf
    (positive NaN) or before -inf (negative NaN) and are kept.
    """
    layout = _check_layout(layout)
    x = _flat_cpu_ref("x", x, layout)
    if out is not None:
        _check_out_buffer("out", out, layout, dtypes=(torch.float32, torch.bfloat16))
    perm = _perm_buffer(state, layout)[0] if state is not None else None
    return _module().sort_segments(x, layout.offsets("cpu"), out, perm)


def _check_state(state: object) -> None:
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state must be a dict or None, got {type(state).__name__}")


def _perm_buffer(state: dict | None, layout: SegmentLayout) -> tuple[torch.Tensor | None, bool]:
    """The permutation buffer kept in ``state`` and whether it holds a previous permutation."""
    _check_state(state)
    if state is None:
        return None, False
    kept_layout = state.get("cpp_layout")
    perm = state.get("cpp_perm")
    if perm is not None and (kept_layout is layout or kept_layout == layout):
        return perm, True
    perm = torch.empty(layout.total, dtype=torch.int32)
    state["cpp_perm"] = perm
    state["cpp_layout"] = layout
    return perm, False


def _record(state: dict | None, counts: torch.Tensor) -> None:
    if state is not None:
        already, repaired, resorted = (int(c) for c in counts.tolist())
        state["cpp_stats"] = {"already_sorted": already, "repaired": repaired, "resorted": resorted}


def match_sorted(
    proj: torch.Tensor, sorted_ref: torch.Tensor, layout: SegmentLayout, state: dict | None = None
) -> torch.Tensor:
    """Matched targets ``T[perm[k]] = sorted_ref[k]`` per segment, ``perm`` sorting ``proj``.

    Same map as :func:`snap_fast.ops.swd.naive.matched_targets` applied to every segment.

    Args:
        proj: (layout.total,) floating CPU tensor, the current projections.
        sorted_ref: (layout.total,) floating CPU tensor, ascending within each segment; float32
            and bfloat16 are read as stored (no conversion pass), other dtypes become float32.
        layout: the segments.
        state: None, or a dict kept by the caller while the directions do not change (cleared when
            they do). The extension keeps each segment's sorting permutation there
            (``state["cpp_perm"]``, int32) and starts the next call from it: a segment still sorted
            by it costs one pass, a slightly disordered one a bounded insertion sort, and only a
            strongly changed one a full radix sort. ``state["cpp_stats"]`` then counts the
            segments of each kind. Results never depend on the state, only the speed does.

    Returns a new float32 (layout.total,) tensor.
    """
    layout = _check_layout(layout)
    proj = _flat_cpu_float("proj", proj, layout)
    sorted_ref = _flat_cpu_ref("sorted_ref", sorted_ref, layout)
    perm, reuse = _perm_buffer(state, layout)
    out, counts = _module().match_sorted(proj, sorted_ref, layout.offsets("cpu"), perm, reuse)
    _record(state, counts)
    return out


def swd_forward(
    proj: torch.Tensor,
    sorted_ref: torch.Tensor,
    layout: SegmentLayout,
    *,
    p: float,
    scale: float,
    state: dict | None = None,
    offset: torch.Tensor | None = None,
    grad_out: torch.Tensor | None = None,
    ref_sorted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``scale · Σ_k |sort(x)_k − sorted_ref_k|^p`` and its gradient w.r.t. ``proj``.

    ``x = proj``, or ``x = proj + offset`` (added in float32 inside the kernel) when ``offset``
    is given.

    Args:
        proj, sorted_ref, layout, state: as in :func:`match_sorted`.
        p: exponent > 0.
        scale: factor of the sum (1/L for the regularizer).
        offset: optional (layout.total,) constant part of the projections (float32 or bfloat16,
            read as stored; no gradient), e.g. the regularizer's cached LoRA base projections.
        grad_out: optional contiguous float32 (layout.total,) CPU buffer the gradient is written
            into (and returned): lets a caller reuse one buffer across calls.
        ref_sorted: False when ``sorted_ref`` holds the reference values unsorted: the kernel
            sorts each segment itself and seeds the sort of ``x`` with that order (resample's
            fresh ``W0 Θ``); ``state`` then only receives the counts, no permutations.

    Returns ``(value, grad)``: a float64 0-dim tensor (per-segment float64 partial sums, added in
    a fixed order) and a float32 (layout.total,) gradient. At a zero difference the subgradient 0
    is used. NaN projections give a NaN value and NaN gradients where they occur.
    """
    layout = _check_layout(layout)
    proj = _flat_cpu_float("proj", proj, layout)
    sorted_ref = _flat_cpu_ref("sorted_ref", sorted_ref, layout)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    if offset is not None:
        offset = _flat_cpu_ref("offset", offset, layout)
    if grad_out is not None:
        _check_out_buffer("grad_out", grad_out, layout)
    _check_state(state)
    perm, reuse = _perm_buffer(state, layout) if ref_sorted else (None, False)
    value, grad, counts = _module().swd_forward(
        proj, sorted_ref, layout.offsets("cpu"), perm, reuse, float(p), float(scale), offset, grad_out,
        not ref_sorted,
    )
    _record(state, counts)
    return value, grad


def _float32_matrices(name: str, mats: object) -> list[torch.Tensor]:
    """``mats`` checked to be a non-empty list of 2-D float32 CPU tensors, detached."""
    if not isinstance(mats, (list, tuple)) or not mats:
        raise TypeError(f"{name} must be a non-empty list of tensors, got {type(mats).__name__}")
    for t, m in enumerate(mats):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.float32 or m.dim() != 2 or m.device.type != "cpu":
            what = f"{m.dtype} of shape {tuple(m.shape)} on {m.device}" if isinstance(m, torch.Tensor) else type(m)
            raise ValueError(f"{name}[{t}] must be a 2-D float32 CPU tensor, got {what}")
    return [m.detach() for m in mats]


def plain_swd_forward(
    sorted_ref: torch.Tensor,
    layout: SegmentLayout,
    weights: list[torch.Tensor],
    theta_t: list[torch.Tensor],
    *,
    p: float,
    scale: float,
    state: dict | None = None,
    grad_out: torch.Tensor | None = None,
    ref_sorted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`swd_forward` for plain weights, with the projections formed inside the kernel.

    Term t (of T) is a weight W_t (n_t, d_t); its projections on the L directions are the (L, n_t)
    block ``Θ_tᵀ W_tᵀ`` of the flat layout. The kernel forms each block in a per-thread buffer and
    sorts it while it is in cache (threads take whole terms, each running its GEMMs
    single-threaded), so no (layout.total,) buffer of projections is written; the gradient with
    respect to the projections is (the backward's ``dW = Gᵀ Θᵀ`` reads it).

    Args:
        sorted_ref, state, grad_out, ref_sorted, p, scale: as in :func:`swd_forward`.
        layout: T·L segments, term t's L segments of n_t values each, in term order.
        weights: T float32 CPU matrices W_t (n_t, d_t), any strides (no gradient is taken).
        theta_t: T float32 CPU matrices Θ_tᵀ (L, d_t), any strides.

    Returns ``(value, grad)`` as :func:`swd_forward`, for the projections ``Θ_tᵀ W_tᵀ``.
    """
    layout = _check_layout(layout)
    sorted_ref = _flat_cpu_ref("sorted_ref", sorted_ref, layout)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    weights, theta_t = _float32_matrices("weights", weights), _float32_matrices("theta_t", theta_t)
    if len(weights) != len(theta_t):
        raise ValueError(f"weights and theta_t must hold one matrix per term, got {len(weights)} and {len(theta_t)}")
    if grad_out is not None:
        _check_out_buffer("grad_out", grad_out, layout)
    _check_state(state)
    perm, reuse = _perm_buffer(state, layout) if ref_sorted else (None, False)
    value, grad, counts = _module().plain_swd_forward(
        sorted_ref, layout.offsets("cpu"), weights, theta_t, perm, reuse, float(p), float(scale), grad_out,
        not ref_sorted,
    )
    _record(state, counts)
    return value, grad


def _check_factors(
    u: object, v: object, theta: object, scaling: object, layout: SegmentLayout
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[float]]:
    """The per-term checks of :func:`lora_swd_forward` that cost no pass over the segments (the
    kernel checks each term's segment lengths against its ``u`` itself)."""
    lists = {name: _float32_matrices(name, mats) for name, mats in (("u", u), ("v", v), ("theta", theta))}
    if not isinstance(scaling, (list, tuple)) or not all(isinstance(c, (int, float)) for c in scaling):
        raise TypeError("scaling must be a list of numbers, one per term")
    counts = {len(lists["u"]), len(lists["v"]), len(lists["theta"]), len(scaling)}
    if len(counts) != 1:
        raise ValueError(
            f"u, v, theta and scaling must hold one entry per term, got {len(lists['u'])}, {len(lists['v'])}, "
            f"{len(lists['theta'])} and {len(scaling)}"
        )
    n_dirs = lists["theta"][0].shape[1]
    if layout.num_segments != len(lists["u"]) * n_dirs:
        raise ValueError(
            f"layout has {layout.num_segments} segments, not {len(lists['u'])} terms × {n_dirs} directions "
            f"(theta[0] is {tuple(lists['theta'][0].shape)})"
        )
    for t, (a, b, th) in enumerate(zip(lists["u"], lists["v"], lists["theta"])):
        if b.shape[0] != a.shape[1] or th.shape != (b.shape[1], n_dirs):
            raise ValueError(
                f"term {t}: u {tuple(a.shape)}, v {tuple(b.shape)} and theta {tuple(th.shape)} are not (n, r), (r, d) "
                f"and (d, {n_dirs})"
            )
    return lists["u"], lists["v"], lists["theta"], [float(c) for c in scaling]


def lora_swd_forward(
    base: torch.Tensor,
    sorted_ref: torch.Tensor,
    layout: SegmentLayout,
    u: list[torch.Tensor],
    v: list[torch.Tensor],
    theta: list[torch.Tensor],
    scaling: list[float],
    *,
    p: float,
    scale: float,
    state: dict | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """:func:`swd_forward` for LoRA terms, with the factor gradients and no flat buffers.

    Term t (of T) is a LoRA layer ``W = W0 + s_t·U_t V_t``; its projections on the L directions
    Θ_t are ``W0 Θ_t + s_t·U_t (V_t Θ_t)``. The kernel forms them one layer at a time from
    ``base`` (the cached W0 Θ) and the factors, in a buffer that stays in cache, so no
    (layout.total,) buffer of projections or gradients is written.

    Args:
        base: (layout.total,) float32 or bfloat16 ``W0 Θ`` of every term, laid out like the
            regularizer's flat buffer: term t's (L, n_t) block, one segment per direction.
        sorted_ref, state: as in :func:`swd_forward`.
        layout: T·L segments, term t's L segments of n_t values each, in term order.
        u: T float32 (n_t, r_t) factors U (PEFT's ``lora_B`` weight of a linear layer).
        v: T float32 (r_t, d_t) factors V (``lora_A``).
        theta: T float32 (d_t, L) directions (any strides).
        scaling: T LoRA scalings s_t.
        p, scale: as in :func:`swd_forward`.

    Returns ``(value, du, dv)``: the float64 0-dim value, and per term the float32 gradients of
    the value w.r.t. ``u[t]`` (n_t, r_t) and ``v[t]`` (r_t, d_t).
    """
    layout = _check_layout(layout)
    base = _flat_cpu_ref("base", base, layout)
    sorted_ref = _flat_cpu_ref("sorted_ref", sorted_ref, layout)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    u, v, theta, scaling = _check_factors(u, v, theta, scaling, layout)
    perm, reuse = _perm_buffer(state, layout)
    value, du, dv, counts = _module().lora_swd_forward(
        base, sorted_ref, layout.offsets("cpu"), u, v, theta, scaling, perm, reuse, float(p), float(scale)
    )
    _record(state, counts)
    return value, du, dv


# ------------------------------------------------------------------------------------ CUDA
def _cuda_module() -> Any:
    module = _load("cuda")
    if module is None:
        raise RuntimeError(f"the snap_fast CUDA extension is unavailable: {_reasons.get('cuda')}")
    return module


def _check_cuda_segments(x: object, offsets: object) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(offsets, torch.Tensor):
        raise TypeError("x and offsets must be torch.Tensors")
    if x.device.type != "cuda":
        raise ValueError(f"x must be a CUDA tensor, got device {x.device}")
    if x.dtype != torch.float32 or x.dim() != 1:
        raise ValueError(f"x must be a 1-D float32 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if offsets.dtype != torch.int64 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError("offsets must be a non-empty 1-D int64 tensor")


def cuda_segmented_argsort(x: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort every segment of a flat CUDA float32 buffer with CUB's segmented radix sort.

    Args:
        x: (total,) float32 CUDA tensor.
        offsets: (S + 1,) int64 segment starts, ``offsets[0] = 0``, ``offsets[-1] = total``
            (any device; moved to ``x``'s device).

    Returns ``(values, indices)``: float32 (total,) sorted within each segment, and int32 (total,)
    segment-local indices with ``values[k] = x[start + indices[k]]``.
    """
    _check_cuda_segments(x, offsets)
    return _cuda_module().segmented_argsort(x.contiguous(), offsets.to(x.device).contiguous())


def cuda_sort_rows(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise sort of a (count, n) CUDA block with CUB: a drop-in for ``torch.sort(block, dim=1)``.

    The contract of ``snap_fast.kernels.segmented_sort.sort_long_segments`` (the Triton
    launchers' ``long_sort``): ``block`` is any float dtype and strides; returns float32 (count, n)
    ascending values and int64 (count, n) row positions. Unlike ``torch.sort``, NaNs with the
    sign bit set sort first (radix order of the bits); the regularizer's value is NaN either way.
    """
    if not isinstance(block, torch.Tensor) or block.dim() != 2:
        raise ValueError(f"block must be a 2-D tensor, got {getattr(block, 'shape', type(block).__name__)}")
    count, n = block.shape
    x = block.float().contiguous().view(-1)
    offsets = torch.arange(count + 1, device=block.device, dtype=torch.int64) * n
    values, idx = cuda_segmented_argsort(x, offsets)
    return values.view(count, n), idx.view(count, n).long()
