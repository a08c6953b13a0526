"""SlicedWassersteinRegularizer: direction modes, the flat call, caches and resume state.

Build it once from the model before training; call it every step and add ``λ ·`` its value to
the loss::

    reg = SlicedWassersteinRegularizer(model, mode="resample")
    loss = task_loss + 0.1 * reg()

It selects the trainable parameters (or those a filter keeps), snapshots what the chosen
direction mode needs, and on each call projects the current weights of *all* selected tensors
into one flat buffer (:mod:`.flat`), sorts every segment with one backend call (see
:mod:`snap_fast.ops.backends`) and returns the summed SWD of SNAP.md §2 as a differentiable
scalar. Which tensors are regularized, and how each is projected, is :mod:`.terms`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..checks import check_choice, check_int
from ..ops.backends import choose_backend
from ..ops.swd.function import check_swd_args, swd_from_projections
from ..ops.swd.layout import SegmentLayout
from ..ops.swd.naive import copy_projections_t
from .flat import FlatPlan
from .terms import ParamFilter, RegularizedTerm, converted_projections_t, select_terms

__all__ = ["MODES", "SlicedWassersteinRegularizer"]

#: Direction modes: how the L directions of every tensor are chosen from call to call.
MODES = ("resample", "refresh", "fixed")


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
        normalize: the scale-free form. Each tensor's SWD is divided by the p-th power sum of its
            initial projections, ``Σ_l Σ_k |W0 θ_l|_k^p``: a relative distance, unchanged when W0
            and W are scaled together, so one λ means the same for every tensor, model, adapter
            type and full fine-tuning. Implemented by scaling each tensor's directions by
            ``(L / Σ|W0 Θ|^p)^(1/p)`` when they are drawn (the kernels are unchanged). Default
            False: the paper's unnormalised sum over rows.

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
        normalize: bool = False,
    ):
        _check_arguments(model, n_projections, p, mode, refresh_every, seed, param_filter, reference_dtype)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        # normalize: the factor each term's fixed directions are scaled by (see _reference); kept
        # so directions regenerated from their seed (cache_directions=False) are scaled alike
        self._direction_scale: list[float] | None = None
        self.n_projections = n_projections
        self.p = float(p)
        self.mode = mode
        self.refresh_every = refresh_every
        self.seed = seed
        self.reference_dtype = reference_dtype
        # A copy of W0 is kept only when a mode re-projects the initial weights later.
        initial_dtype = None if mode == "fixed" else reference_dtype
        self.terms: list[RegularizedTerm] = self._select_terms(model, param_filter, initial_dtype)
        # Refresh mode with a bf16 copy of W0 keeps its sorted projections in bf16 too: its
        # directions are rounded to bf16 values (a relative change of at most 2^-9 per
        # component), so W0 Θ can run as one exact bf16 GEMM with float32 accumulation on CPUs
        # that have one (4x cheaper than converting the copy to float32), rounded only where the
        # cache rounds anyway. Resample keeps exact float32 projections of W0.
        self._bf16_directions = mode == "refresh" and reference_dtype == torch.bfloat16
        self.device = self.terms[0].device
        if any(t.device != self.device for t in self.terms):
            raise ValueError("all regularized parameters must be on one device")
        self._ops = choose_backend(self.device, backend)
        self.backend = self._ops.name
        self.cache_directions = (self.device.type == "cpu") if cache_directions is None else cache_directions
        self.layout = SegmentLayout.from_blocks([(n_projections, t.n) for t in self.terms])
        # values per term in the flat buffers (normalize sums each term's block)
        self._term_sizes = torch.tensor([n_projections * t.n for t in self.terms], device=self.device)
        widths: dict[int, list[int]] = {}
        for i, t in enumerate(self.terms):
            widths.setdefault(t.d, []).append(i)
        self._groups = [_WidthGroup(d, idx) for d, idx in widths.items()]
        # The flat path needs every term to be one it knows; otherwise (subclassed terms, bf16
        # parameters) each term's project() is called and the results concatenated.
        self._flat = FlatPlan.build(self.terms, self.layout, self.p, n_projections, self._ops)
        self._fused_flat = self._ops.fused and self._flat is not None
        # resample hands the fused kernel its fresh W0 projections unsorted (see _sorted_initial)
        self._kernel_sorts_reference = mode == "resample" and self._fused_flat
        # resample's and refresh's kept direction buffers (raw (g, d, L) draw, (g, L, d) directions)
        # per width group; see _draw
        self._draw_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Flat (layout.total,) reference_dtype buffer of the pinned constant parts of the
        # projections (LoRA W0 Θ; zeros for plain terms), added inside the sort kernel.
        self._offset: torch.Tensor | None = None

        self.calls = 0
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._theta: list[torch.Tensor] | None = None
        self._sorted_ref: torch.Tensor | None = None
        self._sort_state: dict = {}
        # Generator state right before the latest resample draw: lets last_directions() redraw
        # them on demand instead of holding d×L floats per tensor between calls.
        self._last_draw_state: torch.Tensor | None = None
        # Fixed-mode directions are a function of (seed, the device type they are drawn on): a
        # CUDA generator draws other numbers than a CPU one. Both are saved in state_dict(), so a
        # resume on another device draws the same directions (on the saved device, then moved).
        self._fixed_draw_device = self.device.type
        if mode == "fixed":
            self._rebuild_cache()

    def _select_terms(
        self, model: torch.nn.Module, param_filter: ParamFilter | None, initial_dtype: torch.dtype | None
    ) -> list[RegularizedTerm]:
        """The regularized terms (the sharded regularizer overrides this to shard them)."""
        return select_terms(model, param_filter, plain=lambda name, param: RegularizedTerm(name, param, initial_dtype))

    # ------------------------------------------------------------------ directions
    def _draw(self, generator: torch.Generator, keep: bool = False) -> list[torch.Tensor]:
        """(d, L) unit directions for every term, one RNG call per distinct width, drawn on the
        generator's device and moved to the regularizer's.

        Each Θ is a transposed view of a contiguous (L, d) Θᵀ: the projection GEMMs read Θᵀ, and
        with a contiguous Θᵀ MKL runs them up to 1.6x faster (a 1536×576 weight) than through a
        transposed (d, L) operand. The numbers drawn, and their order, are those of a (d, L) draw.

        ``keep``: draw into buffers kept across draws (``resample`` and ``refresh`` on the fused
        path): fresh buffers of all directions cost a page fault per 4 KiB, about a third of the
        draw. The directions of the previous draw are then overwritten: the fused backward
        refuses to run on redrawn directions (see ``_FusedFlatSWD``), and what leaves the object
        (:meth:`last_directions`, :meth:`state_dict`) is copied.
        """
        theta: list[torch.Tensor | None] = [None] * len(self.terms)
        tiny = torch.finfo(torch.float32).tiny
        for gi, g in enumerate(self._groups):
            shape = (len(g.indices), g.d, self.n_projections)
            if keep:
                if gi not in self._draw_buffers:
                    self._draw_buffers[gi] = (
                        torch.empty(shape, device=generator.device),
                        torch.empty(shape[0], shape[2], shape[1], device=self.device),
                    )
                raw, block_t = self._draw_buffers[gi]
                raw.normal_(generator=generator)  # the same numbers as torch.randn(shape, generator)
            else:
                raw = torch.randn(shape, generator=generator, device=generator.device)
                block_t = torch.empty(shape[0], shape[2], shape[1], device=self.device)  # (g, L, d)
            # one transposing copy, then the normalisation along the contiguous d, both in place
            block_t.copy_(raw.transpose(1, 2))
            block_t.div_(block_t.norm(dim=2, keepdim=True).clamp_min_(tiny))
            if self._bf16_directions:
                block_t.copy_(block_t.to(torch.bfloat16))
            for j, i in enumerate(g.indices):
                theta[i] = block_t[j].t()
        return theta  # type: ignore[return-value]

    def _fixed_directions(self) -> list[torch.Tensor]:
        if self._theta is not None:
            return self._theta
        theta = self._draw(torch.Generator(device=self._fixed_draw_device).manual_seed(self.seed))
        if self._direction_scale is not None:
            theta = [th * c for th, c in zip(theta, self._direction_scale)]
        if self.cache_directions:
            self._theta = theta
        return theta

    @torch.no_grad()
    def _sorted_initial(self, theta: list[torch.Tensor], keep_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Flat sorted W0 projections, float32; ``keep_dtype``: see ``RegularizedTerm.initial_projection``.

        On the fused path they are projected straight into a work buffer kept across calls (a
        fresh buffer of all projections costs a page fault per 4 KiB):

        * ``resample`` (:attr:`_kernel_sorts_reference`) returns them unsorted, float32: the
          fused kernel sorts each segment itself and seeds the sort of ``W Θ`` with that order
          (``W Θ`` along the same directions nearly keeps ``W0 Θ``'s), so neither the sorted
          values nor their permutations go through memory;
        * ``refresh`` sorts them in place, in ``keep_dtype`` when that is bfloat16 (the cache's
          dtype: the buffer becomes the cache, no conversion pass), and the sort's permutations
          start the next call's permutation reuse.
        """
        if self._fused_flat and self.mode != "fixed":
            proj0 = self._flat.workspace("initial", torch.bfloat16 if keep_dtype == torch.bfloat16 else torch.float32)
            self._project_initial(proj0, theta, keep_dtype)
            if self._kernel_sorts_reference:
                return proj0
            return self._ops.sort_segments(proj0, self.layout, out=proj0, state=self._call_state())
        proj0 = torch.cat([t.initial_projection(th, keep_dtype).t().reshape(-1) for t, th in zip(self.terms, theta)])
        # fixed: the built cache's permutations start the next call's permutation reuse
        return self._ops.sort_segments(proj0, self.layout, state=self._call_state())

    def _project_initial(self, out: torch.Tensor, theta: list[torch.Tensor], keep_dtype: torch.dtype) -> None:
        """Every term's (L, n) ``W0 Θ`` into its block of the flat ``out`` (float32 or bfloat16).

        A plain term's low-precision copy of W0 goes through one bf16 GEMM into a bf16 ``out``
        (refresh: its directions are bf16 values) or a block-wise conversion into a float32 one.
        """
        for item, t, th in zip(self._flat.items, self.terms, theta):
            block = out[item.start : item.start + th.shape[1] * item.n].view(th.shape[1], item.n)
            if item.kind == "plain" and t.initial is not None and t.initial.dtype != torch.float32:
                if out.dtype == torch.bfloat16:
                    copy_projections_t(th, t.initial, out=block)
                else:
                    converted_projections_t(th, t.initial, out=block)
            else:
                block.copy_(t.initial_projection(th, keep_dtype).t())

    @torch.no_grad()
    def _reference(
        self, theta: list[torch.Tensor], keep_dtype: torch.dtype = torch.float32
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The directions of this draw and the flat sorted W0 projections along them.

        Without ``normalize`` the directions are ``theta``. With it, each term's directions are
        scaled by ``c = (L / Σ|W0 Θ|^p)^(1/p)``, which multiplies its SWD by ``c^p``: the term
        becomes ``Σ|Δ|^p / Σ|W0 Θ|^p`` over all its directions (a ratio, the same for W0 and W
        scaled together). Sorting commutes with a positive scale, so the reference is the
        scaled sorted projections.
        """
        sorted_ref = self._sorted_initial(theta, keep_dtype)
        if not self.normalize:
            return theta, sorted_ref
        # Σ|W0 Θ|^p of every term from one running sum over the flat buffer (its blocks are the
        # terms, in order): no Python loop over tensors, no host sync on a GPU.
        power = sorted_ref.double().square() if self.p == 2 else sorted_ref.double().abs().pow(self.p)
        ends = power.cumsum(0)[self._term_sizes.cumsum(0) - 1]
        power = torch.diff(ends, prepend=ends.new_zeros(1))
        # a tensor whose initial projections are all zero has no scale to keep: left as is
        scale = torch.where(power > 0, (self.n_projections / power) ** (1 / self.p), 1.0)
        sorted_ref = sorted_ref * torch.repeat_interleave(scale.to(sorted_ref.dtype), self._term_sizes,
                                                          output_size=sorted_ref.numel())
        if self.mode == "fixed":  # kept (one host copy per rebuild) to scale directions redrawn from the seed
            self._direction_scale = scale.tolist()
        return [th * c for th, c in zip(theta, scale)], sorted_ref

    def _rebuild_cache(self) -> None:
        if self.mode == "fixed":
            self._direction_scale = None  # the reference below measures the unscaled directions
            self._theta = None
            theta = self._fixed_directions()
        else:
            theta = self._draw(self._generator, keep=self._fused_flat)
        self._sort_state = {}  # the permutations of the old directions mean nothing for the new ones
        theta, sorted_ref = self._reference(theta, self.reference_dtype)
        if self.mode != "fixed" or self.cache_directions:
            self._theta = theta
        self._sorted_ref = sorted_ref.to(self.reference_dtype)
        self._pin(theta)

    def _pin(self, theta: list[torch.Tensor]) -> None:
        """Tell every term that ``theta`` stays until the next redraw (LoRA terms cache W0 Θ).

        On the flat path the LoRA terms cache W0 Θ inside one flat offset buffer (their blocks
        of it), which the sort kernel adds to the flat projections: no per-call conversion or
        copy of those n×L values.
        """
        if self._flat is None or not self._flat.has_lora:
            for t, th in zip(self.terms, theta):
                t.pin_directions(th, self.reference_dtype)
            return
        if self._offset is None:
            self._offset = torch.zeros(self.layout.total, dtype=self.reference_dtype, device=self.device)
        for item, th in zip(self._flat.items, theta):
            if item.kind == "lora":
                block = self._offset[item.start : item.start + th.shape[1] * item.n].view(th.shape[1], item.n)
                item.term.pin_directions(th, self.reference_dtype, out=block)

    def _directions_and_reference(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Directions of this call and the flat sorted initial projections (float32, or the
        cache's ``reference_dtype`` for the C++ backend, which reads bf16 directly; unsorted when
        :attr:`_kernel_sorts_reference`).

        Advances the call counter: the stages of one call are this, :meth:`_project`, then
        :func:`snap_fast.ops.swd.function.swd_from_projections` (the benchmark times them apart).
        """
        if self.mode == "resample":
            self._last_draw_state = self._generator.get_state()
            self.calls += 1
            return self._reference(self._draw(self._generator, keep=self._fused_flat))
        if self.mode == "refresh" and self.calls % self.refresh_every == 0:
            self._rebuild_cache()
        self.calls += 1
        theta = self._fixed_directions() if self.mode == "fixed" else self._theta
        # Kernels that read the bf16 cache as stored are spared a full conversion pass.
        return theta, self._sorted_ref if self._ops.reads_bf16_reference else self._sorted_ref.float()

    def _project(self, theta: list[torch.Tensor]) -> torch.Tensor:
        """Flat (layout.total,) current projections, term by term, direction by direction.

        Without :meth:`_projection_offset` (which the caller must add; None in ``resample``).
        """
        if self._flat is None:
            return torch.cat([t.project(th).t().reshape(-1) for t, th in zip(self.terms, theta)])
        return self._flat.project(theta, self._projection_offset())

    def _call_state(self) -> dict | None:
        """The sort state a call hands to the backend: kept permutations across calls in
        ``fixed``/``refresh``; in ``resample`` only on the fused path, where it receives the
        counts of the kernel's sorts (seeded by the order of the fresh W0 projections, see
        :meth:`_sorted_initial`), else none."""
        if self.mode != "resample" or self._fused_flat:
            return self._sort_state
        return None

    def _projection_offset(self) -> torch.Tensor | None:
        """The constant flat buffer to add to :meth:`_project`'s output, or None."""
        return None if self.mode == "resample" else self._offset

    # ------------------------------------------------------------------ call
    def __call__(self) -> torch.Tensor:
        """Σ over regularized tensors of SWD(W0, W) for the current weights (float32, 0-dim)."""
        theta, sorted_ref = self._directions_and_reference()
        state = self._call_state()
        if self._fused_flat:
            return self._flat.fused_swd(theta, sorted_ref, state, self._projection_offset(),
                                        ref_sorted=not self._kernel_sorts_reference)
        proj = self._project(theta)
        return swd_from_projections(
            proj, sorted_ref, self.layout, n_projections=self.n_projections, p=self.p,
            backend=self._ops, state=state, offset=self._projection_offset(),
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
        if self.mode == "refresh":  # copies: the next redraw overwrites the kept buffers
            return [th.clone() for th in self._theta]
        generator = torch.Generator(device=self.device)
        generator.set_state(self._last_draw_state)
        return self._reference(self._draw(generator))[0]

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
            "seed": self.seed,
            "fixed_draw_device": self._fixed_draw_device,
            "normalize": self.normalize,
            "direction_scale": self._direction_scale,
            **self._state_owner(),
        }
        if self.mode == "refresh":
            # Copies, as the next redraw overwrites the kept buffers in place. deepcopy keeps the
            # directions views of one buffer per width at their offsets: the projection GEMMs read
            # them at the same alignment after a resume, hence round exactly alike.
            state["theta"] = copy.deepcopy(self._theta)
            state["sorted_ref"] = self._sorted_ref.clone()
        if include_initial:
            if self.mode == "fixed":
                state["sorted_ref"] = self._sorted_ref
            else:
                state["initial"] = [t.initial for t in self.terms]
        return state

    def _state_owner(self) -> dict:
        """Keys naming whose state this is (the sharded regularizer adds rank and world size)."""
        return {}

    def _check_state_owner(self, state: dict) -> None:
        """Refuse a state saved by another owner (see :meth:`_state_owner`)."""

    def _reference_numel(self) -> int:
        """Values of the sorted initial projections this object holds."""
        return self.layout.total

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; the next call continues the saved sequence.

        A fixed-mode state carries the seed and the generator's device type of its directions:
        loaded into a regularizer built with another seed, or on another device, the saved
        directions are drawn again (on the saved device type, then moved), so the values are the
        saved run's.

        Raises:
            ValueError: the state is for another mode or another set of parameters, or for other
                fixed directions without the sorted initial projections that belong to them.
        """
        if state.get("mode") != self.mode:
            raise ValueError(f"state is for mode {state.get('mode')!r}, this regularizer is {self.mode!r}")
        if state.get("normalize", False) != self.normalize:
            raise ValueError(f"state is for normalize={state.get('normalize', False)}, this regularizer has "
                             f"normalize={self.normalize}")
        self._check_state_owner(state)
        if "names" in state and list(state["names"]) != self.parameter_names:
            raise ValueError(
                f"state is for {len(state['names'])} parameters {state['names'][:3]}..., this "
                f"regularizer has {len(self.terms)} {self.parameter_names[:3]}..."
            )
        if self.mode == "fixed":
            self._load_fixed_directions(state)
        for t, w0 in zip(self.terms, state.get("initial") or []):
            if w0 is not None:
                expected = tuple(t.initial.shape) if t.initial is not None else (t.n, t.d)
                if tuple(w0.shape) != expected:
                    raise ValueError(f"state initial for {t.name!r} has shape {tuple(w0.shape)}, expected {expected}")
                t.initial = w0.to(self.device)
        self.calls = int(state["calls"])
        self._generator.set_state(state["generator"])
        if self.mode == "refresh":
            self._theta = state["theta"]
            if self._theta is not None:
                self._pin(self._theta)
        if "sorted_ref" in state and state["sorted_ref"] is not None:
            if state["sorted_ref"].numel() != self._reference_numel():
                raise ValueError(
                    f"state sorted_ref has {state['sorted_ref'].numel()} values, expected {self._reference_numel()}"
                )
            self._sorted_ref = state["sorted_ref"].to(self.device)
        self._sort_state = {}

    def _load_fixed_directions(self, state: dict) -> None:
        """Adopt the saved seed and draw device of fixed-mode directions (the saved sorted
        initial projections belong to them)."""
        seed = state.get("seed", self.seed)
        draw_device = state.get("fixed_draw_device", self._fixed_draw_device)
        scale = state.get("direction_scale")
        if (seed, draw_device, scale) == (self.seed, self._fixed_draw_device, self._direction_scale):
            return
        if state.get("sorted_ref") is None:
            raise ValueError(
                f"state is for seed {seed} (directions drawn on {draw_device}) but holds no sorted initial "
                f"projections (include_initial=False): build the regularizer with seed={seed} on a "
                f"{draw_device} device, or save the state with include_initial=True"
            )
        if draw_device == "cuda" and not torch.cuda.is_available():
            raise ValueError("state's fixed directions were drawn by a CUDA generator; this machine has no CUDA")
        self.seed, self._fixed_draw_device, self._direction_scale = seed, draw_device, scale
        self._theta = None
        self.cache_directions = self.cache_directions or draw_device != self.device.type
        self._pin(self._fixed_directions())

    def __iter__(self) -> Iterator[RegularizedTerm]:
        return iter(self.terms)

    def __repr__(self) -> str:
        return (
            f"SlicedWassersteinRegularizer(tensors={len(self.terms)}, L={self.n_projections}, "
            f"p={self.p}, mode={self.mode!r}, backend={self.backend!r})"
        )


def _check_arguments(model, n_projections, p, mode, refresh_every, seed, param_filter, reference_dtype) -> None:
    """The constructor's argument checks, before any weight is read."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_swd_args(n_projections, p)
    check_choice("mode", mode, MODES)
    check_int("refresh_every", refresh_every, minimum=1)
    check_int("seed", seed)
    if not (isinstance(reference_dtype, torch.dtype) and reference_dtype.is_floating_point):
        raise TypeError(f"reference_dtype must be a floating torch.dtype, got {reference_dtype!r}")
    if param_filter is not None and not callable(param_filter):
        raise TypeError(f"param_filter must be callable (name, param) -> bool, got {type(param_filter).__name__}")
