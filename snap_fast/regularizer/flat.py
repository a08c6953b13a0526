"""The regularizer's flat path: every term's projections in one buffer, one autograd node.

Compared with autograd over each term's ``project()`` plus transposes and ``torch.cat``, every
projected value is written once instead of three times, and the backward is a few small GEMMs
per term. Plain float32 parameters (``W Θ``) and LoRA terms (``W0 Θ + s · U (V Θ)``) qualify.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.backends import Backend
from ..ops.swd.layout import SegmentLayout
from ..ops.swd.naive import as_matrix
from .terms import RegularizedTerm

__all__ = ["FlatItem", "FlatPlan", "FlatProjection", "fill_projections", "flat_grads", "lora_fused_swd"]


@dataclass(frozen=True)
class FlatItem:
    """Where one term's (L, n) projections go in the flat buffer, and how to compute them."""

    kind: str  # "plain" (W Θ) or "lora" (W0 Θ + s · U (V Θ), see LoraTerm)
    start: int
    n: int
    term: RegularizedTerm


def fill_projections(
    items: list[FlatItem], thetas: list[torch.Tensor], tensors: tuple[torch.Tensor, ...], out: torch.Tensor,
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
            torch.addmm(item.term.w0_theta_t(theta), inner_s.t(), u.t(), out=block)
        else:
            torch.mm(inner_s.t(), u.t(), out=block)
        inners.append(inner_s)
        j += 2
    return inners


def flat_grads(
    items: list[FlatItem], thetas: list[torch.Tensor], inners: list[torch.Tensor | None],
    tensors: tuple[torch.Tensor, ...], grad: torch.Tensor, needs: tuple[bool, ...], c: float | None,
) -> list[torch.Tensor | None]:
    """Gradients of ``Σ grad · projections`` w.r.t. ``tensors``, times ``c`` if given.

    Per term, with G its (L, n) block of ``grad``: ``dW = Gᵀ Θᵀ``; LoRA ``dU = Gᵀ (s·VΘ)ᵀ`` and
    ``dV = s·(G U)ᵀ Θᵀ``. The scalar ``c`` is the GEMM's alpha for ``dW`` and is folded into the
    small operand (s·VΘ or U) for LoRA, so no extra pass over any n-sized tensor is spent on it.
    """
    no_input = grad.new_zeros(())  # addmm's ignored input (beta = 0)
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    j = 0
    for item, theta, inner_s in zip(items, thetas, inners):
        L = theta.shape[1]
        g = grad[item.start : item.start + L * item.n].view(L, item.n)
        if item.kind == "plain":
            if needs[j]:
                w = tensors[j]
                dw = torch.addmm(no_input, g.t(), theta.t(), beta=0, alpha=1.0 if c is None else c)
                grads[j] = dw.view(w.shape).to(w.dtype)
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


class FlatProjection(torch.autograd.Function):
    """Projections of every term written straight into one new flat float32 buffer.

    See :func:`fill_projections` (forward) and :func:`flat_grads` (backward). Compared with
    autograd over ``project()`` + transposes + ``torch.cat`` every value is written once instead
    of three times, and the backward is a few small GEMMs per term.
    """

    @staticmethod
    def forward(ctx, items, thetas, with_base, total, *tensors):  # type: ignore[override]
        out = torch.empty(total, dtype=torch.float32, device=tensors[0].device)
        ctx.items, ctx.thetas = items, thetas
        ctx.inners = fill_projections(items, thetas, tensors, out, with_base)
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grads = flat_grads(ctx.items, ctx.thetas, ctx.inners, ctx.saved_tensors, grad.float().contiguous(),
                            ctx.needs_input_grad[4:], None)
        return (None, None, None, None, *grads)


def lora_fused_swd(
    plan: FlatPlan, thetas: list[torch.Tensor], sorted_ref: torch.Tensor, state: dict | None, offset: torch.Tensor,
    tensors: tuple[torch.Tensor, ...], needs: tuple[bool, ...],
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The whole call for a plan of LoRA terms only, with the cached ``W0 Θ`` as ``offset``.

    One call of the backend's ``lora_swd_forward``: per layer it forms the projections from
    ``offset`` and the factors, sorts and reduces them and turns their gradient into the factor
    gradients, so neither the projections nor their gradient exist as (layout.total,) buffers.
    Returns the float64 value and the gradients of ``tensors`` ((U, V) per term; None where
    ``needs`` is false).
    """
    value, du, dv = plan.backend.lora_swd_forward(
        offset, sorted_ref, plan.layout,
        [t.detach().float() for t in tensors[0::2]], [t.detach().float() for t in tensors[1::2]], thetas,
        [item.term.factors.scaling for item in plan.items],
        p=plan.p, scale=1.0 / plan.n_projections, state=state,
    )
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    for j in range(len(plan.items)):
        u, v = tensors[2 * j], tensors[2 * j + 1]
        grads[2 * j] = du[j].to(u.dtype) if needs[2 * j] else None
        grads[2 * j + 1] = dv[j].to(v.dtype) if needs[2 * j + 1] else None
    return value, grads


class _FusedFlatSWD(torch.autograd.Function):
    """The whole call on the C++ backend: projections, fused sort + reduction, gradients.

    When every term is a plain weight and whole weights keep the threads busy
    (:meth:`FlatPlan.terms_spread_over_threads`), the backend's per-term kernel forms the
    projections itself and sorts them while they are in cache; otherwise they go into a buffer
    the plan keeps (nothing else reads it after the kernel), and the kernel adds the cached W0 Θ
    offset itself. The incoming scalar gradient is folded into small operands. When every term is a LoRA term, the factor gradients (r×d and
    n×r: small) are computed right here and only scaled in backward: by the backend's LoRA kernel
    (:func:`lora_fused_swd`) when the W0 Θ offset is cached (fixed and refresh modes), which
    writes no (layout.total,) buffer at all, else from a kept gradient buffer, so a call allocates
    no buffer of n×L values (a fresh one costs a page fault per 4 KiB).
    Otherwise the gradient buffer is lent from the plan's pool (:meth:`FlatPlan.lend`) to the
    backward, which runs the GEMMs and gives it back: a call in a training loop reuses one buffer,
    while graphs kept alive together each hold their own.
    """

    @staticmethod
    def forward(ctx, plan, thetas, sorted_ref, state, offset, need_grad, ref_sorted, *tensors):  # type: ignore[override]
        eager = all(it.kind == "lora" for it in plan.items)
        needs = tuple(t.requires_grad for t in tensors) if need_grad else (False,) * len(tensors)
        ctx.eager = eager
        if eager and offset is not None and plan.backend.lora_fused and ref_sorted:
            value, ctx.grads = lora_fused_swd(plan, thetas, sorted_ref, state, offset, tensors, needs)
            return value.to(torch.float32)
        lent = need_grad and not eager
        grad_out = plan.lend(ctx) if lent else plan.workspace("grad")
        if plan.backend.plain_fused and not plan.has_lora and offset is None and plan.terms_spread_over_threads():
            # the kernel forms each weight's projections itself and sorts them while in cache
            inners = [None] * len(plan.items)
            value, grad = plan.backend.plain_swd_forward(
                sorted_ref, plan.layout, [as_matrix(t) for t in tensors], [th.t() for th in thetas], p=plan.p,
                scale=1.0 / plan.n_projections, state=state, grad_out=grad_out, ref_sorted=ref_sorted,
            )
        else:
            proj = plan.workspace("proj")
            inners = fill_projections(plan.items, thetas, tensors, proj, with_base=offset is None)
            value, grad = plan.backend.swd_forward(
                proj, sorted_ref, plan.layout, p=plan.p, scale=1.0 / plan.n_projections, state=state,
                offset=offset, grad_out=grad_out, ref_sorted=ref_sorted,
            )
        if eager:
            ctx.grads = flat_grads(plan.items, thetas, inners, tensors, grad, needs, None) if need_grad else None
        else:
            ctx.plan, ctx.thetas, ctx.inners = plan, thetas, inners
            # resample redraws into kept buffers: their version counters tell a redraw apart
            ctx.theta_versions = [th._version for th in thetas]
            ctx.save_for_backward(grad, *tensors)
        return value.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        if ctx.eager:
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads]
        else:
            grad, *tensors = ctx.saved_tensors
            ctx.plan.check_lent(ctx, grad)
            if any(th._version != v for th, v in zip(ctx.thetas, ctx.theta_versions)):
                raise RuntimeError(
                    "the directions of this regularizer value were redrawn by a later call: run its "
                    "backward before calling the regularizer again"
                )
            # the C++ path is CPU-only: reading the incoming scalar costs no device sync
            grads = flat_grads(ctx.plan.items, ctx.thetas, ctx.inners, tuple(tensors), grad,
                               ctx.needs_input_grad[7:], float(grad_output))
            ctx.plan.give_back(grad)
        return (None, None, None, None, None, None, None, *grads)


class FlatPlan:
    """Every term's block in one flat (L·Σn,) buffer, and the two ways to compute over it.

    Built by :meth:`build` when every term is one the flat path knows (``flat_kind()`` not None).

    Attributes:
        items: one :class:`FlatItem` per term, in term order.
        layout, p, n_projections, backend: as the regularizer's.
    """

    def __init__(self, items: list[FlatItem], layout: SegmentLayout, p: float, n_projections: int, backend: Backend):
        self.items = items
        self.layout = layout
        self.p = p
        self.n_projections = n_projections
        self.backend = backend
        # Flat float32 work buffers reused by every fused call (not a cache: their contents never
        # outlive a call).
        self._buffers: dict[str, torch.Tensor] = {}
        # Gradient buffers not lent to a pending backward (see lend/give_back). A fresh buffer of
        # tens of megabytes costs a page fault per 4 KiB on first touch: ~10 % of a call.
        self._free: list[torch.Tensor] = []
        self._lent_to: dict[int, int] = {}  # buffer address -> id of the autograd context holding it

    @classmethod
    def build(
        cls, terms: list[RegularizedTerm], layout: SegmentLayout, p: float, n_projections: int, backend: Backend
    ) -> FlatPlan | None:
        """The plan for ``terms``, or None when a term needs its own ``project()``."""
        kinds = [t.flat_kind() for t in terms]
        if any(k is None for k in kinds):
            return None
        starts = [0]
        for t in terms[:-1]:
            starts.append(starts[-1] + t.n * n_projections)
        items = [FlatItem(k, s, t.n, t) for k, s, t in zip(kinds, starts, terms)]
        return cls(items, layout, p, n_projections, backend)

    def terms_spread_over_threads(self) -> bool:
        """Whether whole terms keep every torch thread busy: the largest weight holds at most
        1/threads of all values. The per-term kernel runs each weight's GEMM on one thread, so a
        plan dominated by one weight (a single regularized layer) would leave the others idle;
        such a plan runs its GEMMs multi-threaded into the flat buffer instead."""
        sizes = [item.n * item.term.d for item in self.items]
        return max(sizes) * torch.get_num_threads() <= sum(sizes)

    @property
    def has_lora(self) -> bool:
        return any(it.kind == "lora" for it in self.items)

    def tensors(self) -> list[torch.Tensor]:
        """The differentiable inputs: W per plain term, (U, V) per LoRA term."""
        tensors: list[torch.Tensor] = []
        for item in self.items:
            tensors.extend([item.term.param] if item.kind == "plain" else item.term.factors.uv())
        return tensors

    def workspace(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A (layout.total,) buffer of ``dtype`` kept across calls (one per name)."""
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype:
            device = self.items[0].term.device
            buf = self._buffers[name] = torch.empty(self.layout.total, dtype=dtype, device=device)
        return buf

    def lend(self, borrower: object) -> torch.Tensor:
        """A (layout.total,) float32 buffer for one call's gradient, owned by ``borrower`` until
        :meth:`give_back` (a graph dropped without backward simply lets it be freed)."""
        buffer = self._free.pop() if self._free else torch.empty(
            self.layout.total, dtype=torch.float32, device=self.items[0].term.device
        )
        self._lent_to[buffer.data_ptr()] = id(borrower)
        return buffer

    def check_lent(self, borrower: object, buffer: torch.Tensor) -> None:
        """Refuse to read a buffer that was given back and lent again since ``borrower`` got it
        (a second backward through a retained graph after a newer call)."""
        if self._lent_to.get(buffer.data_ptr()) != id(borrower):
            raise RuntimeError(
                "this regularizer value's gradient buffer was reused by a later call: run its backward "
                "again (retain_graph=True) only before calling the regularizer again"
            )

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return a buffer from :meth:`lend` once nothing reads it any more (it stays assigned to
        its last borrower until lent again, so a retained graph may read it until then)."""
        if not self._free:  # one spare is all a training loop needs
            self._free.append(buffer)

    def project(self, thetas: list[torch.Tensor], offset: torch.Tensor | None) -> torch.Tensor:
        """Flat current projections with autograd; without ``offset`` (the caller adds it) when
        one is given, else including every LoRA term's ``W0 Θ``."""
        return FlatProjection.apply(self.items, thetas, offset is None, self.layout.total, *self.tensors())

    def fused_swd(
        self, thetas: list[torch.Tensor], sorted_ref: torch.Tensor, state: dict | None, offset: torch.Tensor | None,
        ref_sorted: bool = True,
    ) -> torch.Tensor:
        """The whole SWD in one fused backend call (``backend.fused``), with autograd.

        ``ref_sorted=False``: ``sorted_ref`` holds the initial projections unsorted (the kernel
        sorts them; see the backend's ``swd_forward``)."""
        tensors = self.tensors()
        need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        return _FusedFlatSWD.apply(self, thetas, sorted_ref, state, offset, need_grad, ref_sorted, *tensors)
