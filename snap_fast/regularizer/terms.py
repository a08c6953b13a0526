"""Regularized terms: one weight matrix W (n×d) each, and how to project it onto directions.

:class:`RegularizedTerm` is a parameter regularized directly; :class:`LoraTerm` is a PEFT LoRA
layer ``W = W0 + s · U V`` regularized through its factors (``W Θ = W0 Θ + s · U (V Θ)``: the
weight is never formed, the cost is O((n + d)·r·L) instead of O(n·d·L), and ``W0 Θ`` is a
constant while the directions are fixed). :func:`select_terms` decides which tensors of a model
are regularized, for the plain and the sharded regularizer alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..adapters import LoraFactors, find_lora_factors
from ..ops.swd.naive import as_matrix, copy_projections_t, projections_t

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None

__all__ = ["LoraTerm", "ParamFilter", "RegularizedTerm", "build_lora_terms", "select_terms"]

ParamFilter = Callable[[str, torch.nn.Parameter], bool]


#: float32 values per block of rows that :func:`converted_projections_t` converts at a time
CONVERT_BLOCK_VALUES = 2**20


@torch.no_grad()
def converted_projections_t(theta: torch.Tensor, w0: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Θᵀ W0ᵀ``, (L, n) float32, for a low-precision CPU copy ``w0`` (n, d), without autograd
    (into ``out``, a contiguous (L, n) float32 tensor, when given).

    The same float32 GEMM as :func:`projections_t`, but ``w0`` is converted a block of rows at a
    time into one small buffer that stays in cache, and each block's product is written into its
    columns of the output. Converting the whole copy first writes a float32 matrix as large as the
    weight, whose fresh pages the CPU faults in one by one: for the embedding of SmolLM2 that pass
    costs more than the GEMM itself, and ``resample`` pays it for every tensor at every call.
    """
    n, d = w0.shape
    theta_t = theta.t().float()
    if out is None:
        out = torch.empty(theta_t.shape[0], n, dtype=torch.float32)
    rows = max(1, CONVERT_BLOCK_VALUES // d)
    buf = torch.empty(min(rows, n), d, dtype=torch.float32)
    for r0 in range(0, n, rows):
        block = buf[: min(rows, n - r0)]
        block.copy_(w0[r0 : r0 + block.shape[0]])
        torch.mm(theta_t, block.t(), out=out[:, r0 : r0 + block.shape[0]])
    return out


class RegularizedTerm:
    """One regularized weight matrix W (n×d) and how to project it.

    The base class regularizes a parameter directly. Subclasses (:class:`LoraTerm`) express W through other tensors; the regularizer only needs
    :meth:`project` and :meth:`initial_projection`.
    """

    def __init__(
        self, name: str, param: torch.Tensor, initial_dtype: torch.dtype | None,
        *, shape: tuple[int, int] | None = None,
    ):
        """Args:
            name: the parameter's qualified name.
            param: the tensor whose current value is W (or from which subclasses derive it).
            initial_dtype: keep a copy of W0 (this process's part, :meth:`local_matrix`) in this
                dtype, for modes that re-project the initial weights later; None keeps nothing.
            shape: the (n, d) of W when it is not ``as_matrix(param).shape`` (a sharded tensor
                gives its global shape here, so nothing is gathered).
        """
        self.name = name
        self.param = param
        self.n, self.d = shape if shape is not None else as_matrix(param).shape
        self.initial = None
        if initial_dtype is not None:
            self.initial = self.local_matrix(param.detach()).to(initial_dtype, copy=True)

    def local_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The part of the n×d matrix this process holds (here: all of it)."""
        return as_matrix(t)

    @property
    def device(self) -> torch.device:
        return self.param.device

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """Current projections W Θ, (n, L), carrying autograd to the parameter."""
        # (Θᵀ Wᵀ)ᵀ in float32: the very GEMM of the initial projection and of the regularizer's
        # flat path (which writes Θᵀ Wᵀ into its buffer), so W = W0 gives bitwise equal projections.
        return projections_t(theta, as_matrix(self.param)).t()

    @torch.no_grad()
    def initial_projection(self, theta: torch.Tensor, keep_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Initial projections W0 Θ, (n, L), without autograd.

        ``keep_dtype`` is the dtype the caller rounds the result to: for bfloat16, a bf16 copy of
        W0 may be projected by one bf16 GEMM (:func:`copy_projections_t`; ``theta`` must then be
        bf16-representable) and the result comes back in bf16. Otherwise float32.
        """
        if self.initial is not None and keep_dtype == torch.bfloat16:
            return copy_projections_t(theta, self.initial).t()
        if self.initial is not None and self.initial.dtype != torch.float32 and self.initial.device.type == "cpu":
            return converted_projections_t(theta, self.initial).t()
        w0 = self.initial if self.initial is not None else as_matrix(self.param)
        return projections_t(theta, w0).t()

    def pin_directions(self, theta: torch.Tensor, dtype: torch.dtype) -> None:
        """Called when ``theta`` (d, L) will be reused by every call until the next pin.

        A term whose projection has a constant part caches it here in ``dtype`` (the LoRA term
        keeps ``W0 Θ``); a plain parameter has nothing to cache.
        """

    def flat_kind(self) -> str | None:
        """How the regularizer's flat path (:class:`_FlatProjection`) may project this term.

        ``"plain"`` (``W Θ``) only for a float32 parameter of exactly this class (subclasses
        project differently); ``"lora"`` for :class:`LoraTerm`; None: the regularizer calls
        :meth:`project` for every term instead.
        """
        if type(self) is RegularizedTerm and self.param.dtype == torch.float32:
            return "plain"
        return None

    def nbytes_kept(self) -> int:
        return 0 if self.initial is None else self.initial.numel() * self.initial.element_size()


class LoraTerm(RegularizedTerm):
    """The regularized matrix ``W = W0 + s · U V`` of one LoRA layer, never materialised.

    ``project(Θ) = W0 Θ + s · U (V Θ)``: gradients reach only PEFT's factors. ``W0`` is the
    frozen base weight itself (no copy, whatever the mode); ``initial_projection`` reads it.

    Caching of ``W0 Θ`` (n×L), so the base is read as rarely as possible:

    * :meth:`pin_directions` (the regularizer calls it whenever directions stay fixed across
      calls: ``fixed`` mode once, ``refresh`` mode at every redraw) keeps ``W0 Θ`` in the
      regularizer's reference dtype; later calls never read the base weight again. Until the
      next pin, :meth:`project` assumes it is given those same directions.
    * otherwise (``resample``), ``initial_projection(Θ)`` hands its ``W0 Θ`` to the next
      ``project(Θ)`` with the very same ``Θ`` object, so the base is read once per call.
    """

    def __init__(self, factors: LoraFactors):
        # No copy of W0 in any mode: the frozen base is the initial weight. The shape is passed
        # so that an FSDP2-sharded base (a DTensor) is never reshaped.
        super().__init__(factors.weight_name, factors.base, None, shape=tuple(factors.base.shape))
        self.factors = factors
        self._pinned: torch.Tensor | None = None
        self._handoff: tuple[torch.Tensor, torch.Tensor] | None = None

    # Projections are computed as (L, n) and returned as their (n, L) transpose view: the
    # regularizer flattens terms direction by direction, so this layout packs without a copy.
    @torch.no_grad()
    def _base_projection_t(self, theta: torch.Tensor) -> torch.Tensor:
        return projections_t(theta, self.factors.base)

    def w0_theta_t(self, theta: torch.Tensor) -> torch.Tensor:
        """(W0 Θ)ᵀ, (L, n) float32: pinned, handed off by initial_projection, or computed."""
        if self._pinned is not None:
            return self._pinned.float()
        if self._handoff is not None and self._handoff[0] is theta:
            proj0_t = self._handoff[1]
            self._handoff = None
            return proj0_t
        return self._base_projection_t(theta)

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """Current projections ``W0 Θ + s · U (V Θ)``, (n, L) float32, autograd to the factors."""
        u, v = self.factors.uv()
        inner = v.float() @ theta.float()  # (r, L): the only use of d
        out_t = torch.addmm(self.w0_theta_t(theta), inner.t(), u.float().t(), alpha=self.factors.scaling)
        return out_t.t()

    @torch.no_grad()
    def initial_projection(self, theta: torch.Tensor, keep_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Initial projections ``W0 Θ``, (n, L) float32 whatever ``keep_dtype``, read from the
        frozen base weight."""
        proj0_t = self._base_projection_t(theta)
        self._handoff = (theta, proj0_t)
        return proj0_t.t()

    @torch.no_grad()
    def pin_directions(self, theta: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> None:
        """Keep ``(W0 Θ)ᵀ`` (in ``dtype``) for every later call until the next pin.

        Args:
            theta: (d, L) directions.
            dtype: dtype of the cache.
            out: optional (L, n) ``dtype`` tensor to hold the cache (the regularizer passes a
                block of its flat offset buffer, so the cache is not stored twice).
        """
        self._pinned = None
        proj0_t = self.w0_theta_t(theta)
        if out is None:
            self._pinned = proj0_t.to(dtype)
        else:
            self._pinned = out.copy_(proj0_t)

    def flat_kind(self) -> str | None:
        """``"lora"``: the regularizer's flat path computes ``W0 Θ + s · U (V Θ)`` itself
        (None for an FSDP2-sharded base, which only the sharded regularizer projects)."""
        if DTensor is not None and isinstance(self.factors.base, DTensor):
            return None
        return "lora"

    def nbytes_kept(self) -> int:
        return 0 if self._pinned is None else self._pinned.numel() * self._pinned.element_size()


def build_lora_terms(model: torch.nn.Module, param_filter: ParamFilter | None) -> tuple[list[LoraTerm], set[int]]:
    """Regularized terms for the LoRA-adapted layers of ``model``'s active adapter.

    Args:
        model: any module; PEFT LoRA layers are detected inside it (a ``PeftModel`` or a model
            with adapters injected).
        param_filter: ``f(name, base_weight) -> bool`` applied to the base weight's qualified
            parameter name (``...q_proj.base_layer.weight``); a rejected layer is not
            regularized at all.

    Returns:
        ``(terms, covered)``: one :class:`LoraTerm` per adapted layer whose factors are trainable,
        and the ``id`` of every base weight and factor parameter accounted for, which the plain
        parameter scan then skips. A model without LoRA layers gives ``([], set())``.

    Raises:
        ValueError naming the module for unsupported adapters (see
        :func:`snap_fast.adapters.find_lora_factors`).
    """
    terms: list[LoraTerm] = []
    covered: set[int] = set()
    for f in find_lora_factors(model):
        a, b = f.factor_params()
        covered.update((id(f.base), id(a), id(b)))
        if not (a.requires_grad or b.requires_grad):
            continue  # a frozen adapter is as constant as any frozen parameter
        if param_filter is not None and not param_filter(f.weight_name, f.base):
            continue
        terms.append(LoraTerm(f))
    return terms, covered


def select_terms(
    model: torch.nn.Module,
    param_filter: ParamFilter | None,
    *,
    plain: Callable[[str, torch.nn.Parameter], RegularizedTerm],
    lora: Callable[[LoraTerm], RegularizedTerm] = lambda term: term,
) -> list[RegularizedTerm]:
    """The regularized terms of ``model``: its LoRA layers, then its other trainable parameters.

    Trainable floating parameters are taken in ``named_parameters`` order, tied ones once,
    those ``param_filter`` rejects skipped. ``plain(name, param)`` builds a parameter's term and
    ``lora(term)`` may wrap a LoRA term (the sharded regularizer's variants plug in here).

    Raises:
        ValueError: no trainable parameter, a filter that selects nothing, an empty parameter, or
            an unsupported LoRA adapter.
    """
    lora_terms, covered = build_lora_terms(model, param_filter)
    terms = [lora(t) for t in lora_terms]
    seen = set(covered)
    trainable = bool(covered)
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        trainable = True
        seen.add(id(param))
        if not param.is_floating_point():
            continue
        if param_filter is not None and not param_filter(name, param):
            continue
        terms.append(plain(name, param))
    if not terms:
        if not trainable:
            raise ValueError("model has no trainable parameters (requires_grad=True) to regularize")
        raise ValueError("param_filter selected no parameter: nothing to regularize")
    for t in terms:
        if t.n * t.d == 0:
            raise ValueError(f"parameter {t.name!r} is empty (shape {tuple(t.param.shape)})")
    return terms
