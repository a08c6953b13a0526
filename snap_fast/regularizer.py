"""The object a training loop holds: SNAP's sliced-Wasserstein regularizer over a whole model.

Build it once from the model before training; call it every step and add ``λ ·`` its value to
the loss::

    reg = SlicedWassersteinRegularizer(model, mode="resample")
    loss = task_loss + 0.1 * reg()

It selects the trainable parameters (or those a filter keeps), snapshots what the chosen
direction mode needs, and on each call projects the current weights of *all* selected tensors
into one flat buffer, sorts every segment with one backend call (see :mod:`snap_fast.dispatch`)
and returns the summed SWD of SNAP.md §2 as a differentiable scalar.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .dispatch import resolve_backend, sort_segments
from .functional import check_swd_args, swd_from_projections
from .layout import SegmentLayout
from .reference import as_matrix

__all__ = ["MODES", "RegularizedTerm", "SlicedWassersteinRegularizer"]

MODES = ("resample", "refresh", "fixed")

ParamFilter = Callable[[str, torch.nn.Parameter], bool]


class RegularizedTerm:
    """One regularized weight matrix W (n×d) and how to project it.

    The base class regularizes a parameter directly. Subclasses (the LoRA term in
    :mod:`snap_fast.lora`) express W through other tensors; the regularizer only needs
    :meth:`project` and :meth:`initial_projection`.
    """

    def __init__(self, name: str, param: torch.Tensor, keep_initial: torch.dtype | None):
        self.name = name
        self.param = param
        self.n, self.d = as_matrix(param).shape
        # A copy of W0 is kept only when a mode must re-project the initial weights later.
        self.initial = None
        if keep_initial is not None:
            self.initial = as_matrix(param.detach()).to(keep_initial, copy=True)

    @property
    def device(self) -> torch.device:
        return self.param.device

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """Current projections W Θ, (n, L), carrying autograd to the parameter."""
        w = as_matrix(self.param)
        # (Θᵀ Wᵀ)ᵀ: the very GEMM of the initial projection and of the regularizer's flat path
        # (which writes Θᵀ Wᵀ into its buffer), so W = W0 gives bitwise equal projections.
        return (theta.t().to(w.dtype) @ w.t()).t()

    @torch.no_grad()
    def initial_projection(self, theta: torch.Tensor) -> torch.Tensor:
        """Initial projections W0 Θ, (n, L) float32, without autograd."""
        w0 = self.initial if self.initial is not None else as_matrix(self.param)
        compute = self.param.dtype if self.param.is_floating_point() else torch.float32
        return (theta.t().to(compute) @ w0.to(compute).t()).t().float()

    def pin_directions(self, theta: torch.Tensor, dtype: torch.dtype) -> None:
        """Called when ``theta`` (d, L) will be reused by every call until the next pin.

        A term whose projection has a constant part caches it here in ``dtype`` (the LoRA term
        keeps ``W0 Θ``); a plain parameter has nothing to cache.
        """

    def flat_kind(self) -> str | None:
        """How the regularizer's flat path (:class:`_FlatProjection`) may project this term.

        ``"plain"`` (``W Θ``) only for a float32 parameter of exactly this class (subclasses
        project differently); ``"lora"`` for :class:`snap_fast.lora.LoraTerm`; None: the
        regularizer calls :meth:`project` for every term instead.
        """
        if type(self) is RegularizedTerm and self.param.dtype == torch.float32:
            return "plain"
        return None

    def nbytes_kept(self) -> int:
        return 0 if self.initial is None else self.initial.numel() * self.initial.element_size()


@dataclass(frozen=True)
class _FlatItem:
    """Where one term's (L, n) projections go in the flat buffer, and how to compute them."""

    kind: str  # "plain" (W Θ) or "lora" (W0 Θ + s · U (V Θ), see snap_fast.lora.LoraTerm)
    start: int
    n: int
    term: RegularizedTerm


def _fill_projections(
    items: list[_FlatItem], thetas: list[torch.Tensor], tensors: tuple[torch.Tensor, ...], out: torch.Tensor,
    with_base: bool,
) -> list[torch.Tensor | None]:
    """Write every term's (L, n) projections into its block of the flat float32 ``out``.

    A GEMM with ``out=`` per term: ``Θᵀ Wᵀ`` for a plain parameter; ``(s·VΘ)ᵀ Uᵀ`` for a LoRA
    term, plus its ``(W0 Θ)ᵀ`` when ``with_base`` (else the caller adds the cached W0 Θ as an
    offset). ``tensors`` holds W per plain term and (U, V) per LoRA term, in order. Returns the
    LoRA terms' ``s·VΘ`` (r, L) (None for plain terms), which the gradients reuse.
    """
    inners: list[torch.Tensor | None] = []
    j = 0
    for item, theta in zip(items, thetas):
        L = theta.shape[1]
        block = out[item.start : item.start + L * item.n].view(L, item.n)
        if item.kind == "plain":
            torch.mm(theta.t(), as_matrix(tensors[j]).t(), out=block)
            inners.append(None)
            j += 1
            continue
        u, v = tensors[j].float(), tensors[j + 1].float()
        # s folded into the r×L inner product: no extra pass over the n×L block
        inner_s = (v @ theta).mul_(item.term.factors.scaling)
        if with_base:
            torch.addmm(item.term._w0_theta_t(theta), inner_s.t(), u.t(), out=block)
        else:
            torch.mm(inner_s.t(), u.t(), out=block)
        inners.append(inner_s)
        j += 2
    return inners


def _flat_grads(
    items: list[_FlatItem], thetas: list[torch.Tensor], inners: list[torch.Tensor | None],
    tensors: tuple[torch.Tensor, ...], grad: torch.Tensor, needs: tuple[bool, ...], c: torch.Tensor | None,
) -> list[torch.Tensor | None]:
    """Gradients of ``Σ grad · projections`` w.r.t. ``tensors``, times ``c`` if given.

    Per term, with G its (L, n) block of ``grad``: ``dW = Gᵀ Θᵀ``; LoRA ``dU = Gᵀ (s·VΘ)ᵀ`` and
    ``dV = s·(G U)ᵀ Θᵀ``. The scalar ``c`` is folded into the small operand (Θ, s·VΘ or U), so no
    pass over the n×L gradient is spent on it.
    """
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    j = 0
    for item, theta, inner_s in zip(items, thetas, inners):
        L = theta.shape[1]
        g = grad[item.start : item.start + L * item.n].view(L, item.n)
        if item.kind == "plain":
            if needs[j]:
                w = tensors[j]
                th = theta if c is None else theta * c
                grads[j] = torch.mm(g.t(), th.t()).view(w.shape).to(w.dtype)
            j += 1
            continue
        u, v = tensors[j], tensors[j + 1]
        # Both products are formed with the long n dimension innermost ((r, L) @ (L, n) and
        # (r, n) @ (n, L)): MKL runs these skinny shapes 3-8x faster than their transposes.
        if needs[j]:
            inner = inner_s if c is None else inner_s * c
            grads[j] = torch.mm(inner, g).t().to(u.dtype)  # (n, r)
        if needs[j + 1]:
            uf = u.float() if c is None else u.float() * c
            d_inner = torch.mm(uf.t(), g.t()).mul_(item.term.factors.scaling)  # (r, L)
            grads[j + 1] = torch.mm(d_inner, theta.t()).to(v.dtype)  # (r, d)
        j += 2
    return grads


class _FlatProjection(torch.autograd.Function):
    """Projections of every term written straight into one new flat float32 buffer.

    See :func:`_fill_projections` (forward) and :func:`_flat_grads` (backward). Compared with
    autograd over ``project()`` + transposes + ``torch.cat`` every value is written once instead
    of three times, and the backward is a few small GEMMs per term.
    """

    @staticmethod
    def forward(ctx, items, thetas, with_base, total, *tensors):  # type: ignore[override]
        out = torch.empty(total, dtype=torch.float32, device=tensors[0].device)
        ctx.items, ctx.thetas = items, thetas
        ctx.inners = _fill_projections(items, thetas, tensors, out, with_base)
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grads = _flat_grads(ctx.items, ctx.thetas, ctx.inners, ctx.saved_tensors, grad.float().contiguous(),
                            ctx.needs_input_grad[4:], None)
        return (None, None, None, None, *grads)


class _FusedFlatSWD(torch.autograd.Function):
    """The whole call on the C++ backend: projections, fused sort + reduction, gradients.

    The projections go into a buffer the regularizer keeps (nothing else reads it after the
    kernel), the kernel adds the cached W0 Θ offset itself, and the incoming scalar gradient is
    folded into small operands. When every term is a LoRA term, the factor gradients (r×d and
    n×r: small) are computed right here from a kept gradient buffer and only scaled in backward,
    so a call allocates no buffer of n×L values at all (a fresh one costs a page fault per 4 KiB).
    Otherwise the per-call gradient buffer is saved and the GEMMs run in backward.
    """

    @staticmethod
    def forward(ctx, reg, thetas, sorted_ref, state, need_grad, *tensors):  # type: ignore[override]
        from . import _ext

        items = reg._flat_items
        offset = reg._projection_offset()
        proj = reg._workspace("proj")
        inners = _fill_projections(items, thetas, tensors, proj, with_base=offset is None)
        eager = all(it.kind == "lora" for it in items)
        value, grad = _ext.swd_forward(
            proj, sorted_ref, reg.layout, p=reg.p, scale=1.0 / reg.n_projections, state=state, offset=offset,
            grad_out=reg._workspace("grad") if eager else None,
        )
        needs = tuple(t.requires_grad for t in tensors) if need_grad else (False,) * len(tensors)
        ctx.eager = eager
        if eager:
            ctx.grads = _flat_grads(items, thetas, inners, tensors, grad, needs, None) if need_grad else None
        else:
            ctx.items, ctx.thetas, ctx.inners = items, thetas, inners
            ctx.save_for_backward(grad, *tensors)
        return value.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.eager:
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads]
        else:
            grad, *tensors = ctx.saved_tensors
            grads = _flat_grads(ctx.items, ctx.thetas, ctx.inners, tuple(tensors), grad,
                                ctx.needs_input_grad[5:], grad_output)
        return (None, None, None, None, None, *grads)


@dataclass
class _WidthGroup:
    """All terms sharing a width d: their directions are drawn in one call."""

    d: int
    indices: list[int]


class SlicedWassersteinRegularizer:
    """Summed sliced-Wasserstein distance between a model's weights and their initial values.

    Args:
        model: the model; its parameters are read at construction (the snapshot) and at every
            call (the current weights).
        n_projections: L, directions per tensor (the authors use 100).
        p: exponent, > 0 (the authors use 2).
        mode: how directions are chosen:

            * ``"resample"`` (default, the authors' semantics): fresh directions for every tensor
              at every call. Keeps a copy of the initial weights in ``reference_dtype``.
            * ``"refresh"``: directions redrawn every ``refresh_every`` calls; in between the
              sorted initial projections are cached, amortising the cost while every direction
              is still visited over a run. Keeps the copy of the initial weights too.
            * ``"fixed"``: directions drawn once per tensor from ``seed``; only the sorted initial
              projections are cached (n×L per tensor), no copy of the initial weights. A fixed
              set of L directions leaves any weight change orthogonal to all of them unpenalised:
              each row has d − L free dimensions. Use it when memory or speed matter and the
              evaluation shows it unlearns as well.
        refresh_every: K for ``mode="refresh"``.
        seed: seed of the direction generator (reproducible runs, resumable with
            :meth:`state_dict`).
        param_filter: ``f(name, param) -> bool`` choosing among trainable parameters
            (default: all with ``requires_grad``). Tied parameters are counted once.
        reference_dtype: dtype of the kept initial weights and of the cached sorted projections
            (bf16 by default, as the authors' code; float32 for exactness).
        backend: force a sorting backend (``"torch"``, ``"triton"``, ``"cpp"``), else auto.
        cache_directions: keep fixed-mode directions in memory (d×L per tensor) instead of
            regenerating them from their seeds at each call; default: True on CPU, False on CUDA.

    Calling the object returns a float32 0-dim tensor: Σ over tensors of SWD(W0, W).

    Raises:
        TypeError / ValueError, before any heavy work, for a non-module ``model``, bad
        ``n_projections``/``p``/``mode``/``refresh_every``, a model with no trainable parameters
        or a filter that selects nothing.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        n_projections: int = 100,
        p: float = 2.0,
        mode: str = "resample",
        refresh_every: int = 10,
        seed: int = 0,
        param_filter: ParamFilter | None = None,
        reference_dtype: torch.dtype = torch.bfloat16,
        backend: str | None = None,
        cache_directions: bool | None = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_swd_args(n_projections, p)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
        if not (isinstance(reference_dtype, torch.dtype) and reference_dtype.is_floating_point):
            raise TypeError(f"reference_dtype must be a floating torch.dtype, got {reference_dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if param_filter is not None and not callable(param_filter):
            raise TypeError(f"param_filter must be callable (name, param) -> bool, got {type(param_filter).__name__}")

        self.n_projections = n_projections
        self.p = float(p)
        self.mode = mode
        self.refresh_every = refresh_every
        self.seed = seed
        self.reference_dtype = reference_dtype
        keep_initial = None if mode == "fixed" else reference_dtype
        self.terms: list[RegularizedTerm] = self._build_terms(model, param_filter, keep_initial)
        self.device = self.terms[0].device
        if any(t.device != self.device for t in self.terms):
            raise ValueError("all regularized parameters must be on one device")
        self.backend = resolve_backend(self.device, backend)
        self.cache_directions = (self.device.type == "cpu") if cache_directions is None else cache_directions
        self.layout = SegmentLayout.from_blocks([(n_projections, t.n) for t in self.terms])
        widths: dict[int, list[int]] = {}
        for i, t in enumerate(self.terms):
            widths.setdefault(t.d, []).append(i)
        self._groups = [_WidthGroup(d, idx) for d, idx in widths.items()]
        # The flat path (one autograd node writing all projections into one buffer) needs every
        # term to be one it knows; otherwise (subclassed terms, bf16 parameters) each term's
        # project() is called and the results concatenated.
        kinds = [t.flat_kind() for t in self.terms]
        self._flat_items: list[_FlatItem] | None = None
        if all(k is not None for k in kinds):
            starts = [0]
            for t in self.terms[:-1]:
                starts.append(starts[-1] + t.n * n_projections)
            self._flat_items = [_FlatItem(k, s, t.n, t) for k, s, t in zip(kinds, starts, self.terms)]
        # Flat (layout.total,) reference_dtype buffer of the pinned constant parts of the
        # projections (LoRA W0 Θ; zeros for plain terms), added inside the sort kernel.
        self._offset: torch.Tensor | None = None
        # Flat float32 work buffers reused by every call of the C++ flat path (not a cache: their
        # contents never outlive a call).
        self._buffers: dict[str, torch.Tensor] = {}

        self.calls = 0
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._theta: list[torch.Tensor] | None = None
        self._sorted_ref: torch.Tensor | None = None
        self._sort_state: dict = {}
        # Generator state right before the latest resample draw: lets last_directions() redraw
        # them on demand instead of holding d×L floats per tensor between calls.
        self._last_draw_state: torch.Tensor | None = None
        if mode == "fixed":
            self._rebuild_cache()

    # ------------------------------------------------------------------ selection
    def _build_terms(
        self, model: torch.nn.Module, param_filter: ParamFilter | None, keep_initial: torch.dtype | None
    ) -> list[RegularizedTerm]:
        from .lora import build_lora_terms  # the one module that knows PEFT

        terms, covered = build_lora_terms(model, keep_initial, param_filter)
        seen = set(covered)
        trainable = False
        for name, param in model.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            trainable = True
            seen.add(id(param))
            if not param.is_floating_point():
                continue
            if param_filter is not None and not param_filter(name, param):
                continue
            terms.append(RegularizedTerm(name, param, keep_initial))
        if not terms:
            if not trainable and not covered:
                raise ValueError("model has no trainable parameters (requires_grad=True) to regularize")
            raise ValueError("param_filter selected no parameter: nothing to regularize")
        for t in terms:
            if t.n * t.d == 0:
                raise ValueError(f"parameter {t.name!r} is empty (shape {t.n}×{t.d})")
        return terms

    # ------------------------------------------------------------------ directions
    def _draw(self, generator: torch.Generator) -> list[torch.Tensor]:
        """(d, L) directions for every term, one RNG call per distinct width."""
        theta: list[torch.Tensor | None] = [None] * len(self.terms)
        for g in self._groups:
            block = torch.randn(
                len(g.indices), g.d, self.n_projections, generator=generator, device=self.device
            )
            block = block / block.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            for j, i in enumerate(g.indices):
                theta[i] = block[j]
        return theta  # type: ignore[return-value]

    def _fixed_directions(self) -> list[torch.Tensor]:
        if self._theta is not None:
            return self._theta
        theta = self._draw(torch.Generator(device=self.device).manual_seed(self.seed))
        if self.cache_directions:
            self._theta = theta
        return theta

    @torch.no_grad()
    def _sorted_initial(self, theta: list[torch.Tensor]) -> torch.Tensor:
        proj0 = torch.cat([t.initial_projection(th).t().reshape(-1) for t, th in zip(self.terms, theta)])
        return sort_segments(proj0, self.layout, self.backend)

    def _rebuild_cache(self) -> None:
        if self.mode == "fixed":
            theta = self._fixed_directions()
        else:
            theta = self._draw(self._generator)
            self._theta = theta
        self._sorted_ref = self._sorted_initial(theta).to(self.reference_dtype)
        self._sort_state = {}
        self._pin(theta)

    def _pin(self, theta: list[torch.Tensor]) -> None:
        """Tell every term that ``theta`` stays until the next redraw (LoRA terms cache W0 Θ).

        On the flat path the LoRA terms cache W0 Θ inside one flat offset buffer (their blocks
        of it), which the sort kernel adds to the flat projections: no per-call conversion or
        copy of those n×L values.
        """
        lora = self._flat_items is not None and any(it.kind == "lora" for it in self._flat_items)
        if not lora:
            for t, th in zip(self.terms, theta):
                t.pin_directions(th, self.reference_dtype)
            return
        if self._offset is None:
            self._offset = torch.zeros(self.layout.total, dtype=self.reference_dtype, device=self.device)
        for item, th in zip(self._flat_items, theta):
            if item.kind == "lora":
                block = self._offset[item.start : item.start + th.shape[1] * item.n].view(th.shape[1], item.n)
                item.term.pin_directions(th, self.reference_dtype, out=block)

    def _directions_and_reference(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Directions of this call and the flat sorted initial projections (float32, or the
        cache's ``reference_dtype`` for the C++ backend, which reads bf16 directly).

        Advances the call counter: the stages of one call are this, :meth:`_project`, then
        :func:`snap_fast.functional.swd_from_projections` (the benchmark times them apart).
        """
        if self.mode == "resample":
            self._last_draw_state = self._generator.get_state()
            theta = self._draw(self._generator)
            self.calls += 1
            return theta, self._sorted_initial(theta)
        if self.mode == "refresh" and self.calls % self.refresh_every == 0:
            self._rebuild_cache()
        self.calls += 1
        theta = self._fixed_directions() if self.mode == "fixed" else self._theta
        # The C++ kernels read the bf16 cache as stored; a conversion here would be a full pass.
        return theta, self._sorted_ref if self.backend == "cpp" else self._sorted_ref.float()

    def _project(self, theta: list[torch.Tensor]) -> torch.Tensor:
        """Flat (layout.total,) current projections, term by term, direction by direction.

        Without :meth:`_projection_offset` (which the caller must add; None in ``resample``).
        """
        if self._flat_items is None:
            return torch.cat([t.project(th).t().reshape(-1) for t, th in zip(self.terms, theta)])
        return _FlatProjection.apply(self._flat_items, theta, self._projection_offset() is None,
                                     self.layout.total, *self._flat_tensors())

    def _projection_offset(self) -> torch.Tensor | None:
        """The constant flat buffer to add to :meth:`_project`'s output, or None."""
        return None if self.mode == "resample" else self._offset

    def _flat_tensors(self) -> list[torch.Tensor]:
        """The flat path's differentiable inputs: W per plain term, (U, V) per LoRA term."""
        tensors: list[torch.Tensor] = []
        for item in self._flat_items:
            tensors.extend([item.term.param] if item.kind == "plain" else item.term.factors.uv())
        return tensors

    def _workspace(self, name: str) -> torch.Tensor:
        """A (layout.total,) float32 buffer kept across calls (see :class:`_FusedFlatSWD`)."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.empty(self.layout.total, dtype=torch.float32, device=self.device)
        return buf

    # ------------------------------------------------------------------ call
    def __call__(self) -> torch.Tensor:
        """Σ over regularized tensors of SWD(W0, W) for the current weights (float32, 0-dim)."""
        theta, sorted_ref = self._directions_and_reference()
        state = None if self.mode == "resample" else self._sort_state
        if self.backend == "cpp" and self._flat_items is not None:
            tensors = self._flat_tensors()
            need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            return _FusedFlatSWD.apply(self, theta, sorted_ref, state, need_grad, *tensors)
        proj = self._project(theta)
        return swd_from_projections(
            proj, sorted_ref, self.layout, n_projections=self.n_projections, p=self.p,
            backend=self.backend, state=state, offset=self._projection_offset(),
        )

    # ------------------------------------------------------------------ introspection / resume
    @property
    def parameter_names(self) -> list[str]:
        return [t.name for t in self.terms]

    def cache_nbytes(self) -> int:
        """Bytes this object keeps besides the model: initial-weight copies and caches."""
        if self._offset is not None:  # the LoRA terms' W0 Θ caches are blocks of it
            total = self._offset.numel() * self._offset.element_size()
            total += sum(t.nbytes_kept() for t in self.terms if t.flat_kind() != "lora")
        else:
            total = sum(t.nbytes_kept() for t in self.terms)
        if self._sorted_ref is not None:
            total += self._sorted_ref.numel() * self._sorted_ref.element_size()
        if self._theta is not None and (self.mode != "fixed" or self.cache_directions):
            total += sum(th.numel() * th.element_size() for th in self._theta)
        return total

    def last_directions(self) -> list[torch.Tensor]:
        """The directions used by the most recent call, one (d, L) float32 tensor per term.

        In the order of :attr:`terms`. In ``resample`` mode they are redrawn from the saved
        generator state (nothing is kept between calls), so this costs one draw.

        Raises:
            RuntimeError: the regularizer has not been called yet.
        """
        if self.calls == 0:
            raise RuntimeError("last_directions() needs at least one call of the regularizer")
        if self.mode == "fixed":
            return self._fixed_directions()
        if self.mode == "refresh":
            return self._theta
        generator = torch.Generator(device=self.device)
        generator.set_state(self._last_draw_state)
        return self._draw(generator)

    def state_dict(self, include_initial: bool = True) -> dict:
        """What a checkpoint needs to continue the exact same sequence of values.

        Args:
            include_initial: also store the snapshot of the initial weights (the ``reference_dtype``
                copies in ``resample``/``refresh`` mode, the sorted initial projections in
                ``fixed`` mode), so a regularizer rebuilt from the *trained* model resumes with the
                original W0. Pass False only when the regularizer will be rebuilt from the
                initial weights anyway (it saves a ``reference_dtype`` copy of the model).
        """
        state: dict = {
            "mode": self.mode,
            "calls": self.calls,
            "generator": self._generator.get_state(),
            "names": self.parameter_names,
        }
        if self.mode == "refresh":
            state["theta"] = self._theta
            state["sorted_ref"] = self._sorted_ref
        if include_initial:
            if self.mode == "fixed":
                state["sorted_ref"] = self._sorted_ref
            else:
                state["initial"] = [getattr(t, "initial", None) for t in self.terms]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; the next call continues the saved sequence.

        Raises:
            ValueError: the state is for another mode or another set of parameters.
        """
        if state.get("mode") != self.mode:
            raise ValueError(f"state is for mode {state.get('mode')!r}, this regularizer is {self.mode!r}")
        if "names" in state and list(state["names"]) != self.parameter_names:
            raise ValueError(
                f"state is for {len(state['names'])} parameters {state['names'][:3]}..., this "
                f"regularizer has {len(self.terms)} {self.parameter_names[:3]}..."
            )
        if "initial" in state:
            for t, w0 in zip(self.terms, state["initial"]):
                if w0 is not None:
                    if tuple(w0.shape) != (t.n, t.d):
                        raise ValueError(f"state initial for {t.name!r} has shape {tuple(w0.shape)}, expected ({t.n}, {t.d})")
                    t.initial = w0.to(self.device)
        self.calls = int(state["calls"])
        self._generator.set_state(state["generator"])
        if self.mode == "refresh":
            self._theta = state["theta"]
            if self._theta is not None:
                self._pin(self._theta)
        if "sorted_ref" in state and state["sorted_ref"] is not None:
            if state["sorted_ref"].numel() != self.layout.total:
                raise ValueError(
                    f"state sorted_ref has {state['sorted_ref'].numel()} values, expected {self.layout.total}"
                )
            self._sorted_ref = state["sorted_ref"].to(self.device)
        self._sort_state = {}

    def __iter__(self) -> Iterator[RegularizedTerm]:
        return iter(self.terms)

    def __repr__(self) -> str:
        return (
            f"SlicedWassersteinRegularizer(tensors={len(self.terms)}, L={self.n_projections}, "
            f"p={self.p}, mode={self.mode!r}, backend={self.backend!r})"
        )
