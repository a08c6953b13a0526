"""Regularized terms as one rank holds them under FSDP2: row shards, column shards, replicas, LoRA."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.swd.naive import as_matrix, projections_t
from ..regularizer.terms import LoraTerm, RegularizedTerm
from .context import collective_guard

__all__ = ["COLS", "REPLICATED", "ROWS", "AllReduceSum", "ShardedLoraTerm", "ShardedTerm", "classify", "local_tensor"]

try:  # DTensor is public since torch 2.5; FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


ROWS, COLS, REPLICATED = "rows", "cols", "replicated"


class ShardedTerm(RegularizedTerm):
    """A regularized tensor as one rank holds it.

    ``kind`` says how its n×d matrix (see :func:`snap_fast.ops.swd.naive.as_matrix`) is split:

    * ``"rows"``: a DTensor ``Shard(0)`` of rank ≥ 2; this rank holds rows
      ``[row_offset, row_offset + n_local)``;
    * ``"cols"``: a 1-D DTensor ``Shard(0)``: the one row is split along d; this rank holds
      columns ``[col_offset, col_offset + d_local)``;
    * ``"replicated"``: a plain tensor or a ``Replicate()`` DTensor, fully present everywhere.

    ``n``/``d`` are the *global* sizes, so directions are drawn exactly as in the single-process
    regularizer. The kept initial copy (``resample``/``refresh``) is the local shard only
    (:meth:`local_matrix`).
    """

    def __init__(self, name: str, param: torch.Tensor, initial_dtype: torch.dtype | None, kind: str):
        self.kind = kind
        shape = tuple(param.shape)
        n = shape[0] if len(shape) >= 2 else 1
        self.d = param.numel() // n if n else 0  # local_matrix needs it before the base sets it
        # The global (n, d) is passed so that the base never reshapes the DTensor (a collective).
        super().__init__(name, param, initial_dtype, shape=(n, self.d))
        local = self.local_matrix(param.detach())
        self.n_local = local.shape[0] if kind != COLS else 1
        self.d_local = local.shape[1]
        self.row_offset = 0
        self.col_offset = 0

    def local_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The part of the n×d matrix this rank holds: rows (``rows``), 1×d_local (``cols``)."""
        loc = t.to_local() if DTensor is not None and isinstance(t, DTensor) else t
        if self.kind == ROWS:
            return loc.reshape(loc.shape[0], self.d)
        if self.kind == COLS:
            return loc.reshape(1, loc.numel())
        return as_matrix(loc)

    def _local_theta(self, theta: torch.Tensor) -> torch.Tensor:
        if self.kind == COLS:
            return theta[self.col_offset : self.col_offset + self.d_local]
        return theta

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """Local projections with autograd: (n_local, L); for ``cols`` a partial sum (1, L)."""
        return projections_t(self._local_theta(theta), self.local_matrix(self.param)).t()

    @torch.no_grad()
    def initial_projection(self, theta: torch.Tensor, keep_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Same as :meth:`project` for the initial weights, float32 whatever ``keep_dtype``, no
        autograd."""
        w0 = self.initial if self.initial is not None else self.local_matrix(self.param.detach())
        return projections_t(self._local_theta(theta), w0).t()


class AllReduceSum(torch.autograd.Function):
    """``Σ_ranks x`` with autograd: the gradient of a sum of per-rank inputs is the summed
    upstream gradient (each rank's loss is a partial of the global one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone()
        with collective_guard("all_reduce LoRA factors"):
            dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.contiguous().clone()
        with collective_guard("all_reduce LoRA factor gradients"):
            dist.all_reduce(g, group=ctx.group)
        return g, None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


class ShardedLoraTerm(ShardedTerm):
    """A LoRA layer ``W = W0 + s · U V`` whose frozen base FSDP2 sharded by rows.

    The base rows stay where they are (``W0 Θ`` of the local rows, pinned while directions stay
    fixed). The factors are small (``r · (n + d)`` values against ``n · d``): the regularizer
    assembles them whole on every rank with one all-reduce of zero-padded shards per call
    (autograd: the backward all-reduces their gradients, so each rank's factor shard receives the
    gradient of the global value), then ``P_local = W0_local Θ + s · U[local rows] (V Θ)``.
    """

    def __init__(self, term: LoraTerm):
        self.factors = term.factors
        super().__init__(term.name, term.factors.base, None, ROWS)
        self.full_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pinned: torch.Tensor | None = None
        # rows of each factor parameter this rank holds (offsets filled by the regularizer)
        self.factor_rows = [(local_tensor(f).shape[0] if f.dim() else 1) for f in self.factors.factor_params()]
        self.factor_offsets = [0, 0]

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """(n_local, L) float32 with autograd to the factors; needs :attr:`full_factors` set."""
        u, v = self.factors.uv_of(*self.full_factors)
        u_local = u[self.row_offset : self.row_offset + self.n_local].float()
        w0_theta = self._pinned.float() if self._pinned is not None else self.initial_projection(theta)
        return torch.addmm(w0_theta, u_local, v.float() @ theta.float(), alpha=self.factors.scaling)

    @torch.no_grad()
    def pin_directions(self, theta: torch.Tensor, dtype: torch.dtype) -> None:
        self._pinned = None
        self._pinned = self.initial_projection(theta).to(dtype)

    def nbytes_kept(self) -> int:
        return 0 if self._pinned is None else self._pinned.numel() * self._pinned.element_size()


def classify(name: str, param: torch.Tensor) -> str:
    """How a parameter is split (ROWS, COLS, REPLICATED); ValueError for other layouts."""
    if DTensor is None or not isinstance(param, DTensor):
        return REPLICATED
    mesh = param.device_mesh
    placements = tuple(param.placements)
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            f"parameter {name!r} is a DTensor on a {mesh.ndim}-D device mesh with placements "
            f"{placements}; the sharded regularizer supports 1-D meshes (FSDP2 fully_shard)"
        )
    (pl,) = placements
    if isinstance(pl, Replicate):
        return REPLICATED
    if isinstance(pl, Shard) and pl.dim == 0 and param.dim() >= 1:
        return ROWS if param.dim() >= 2 else COLS
    raise ValueError(
        f"parameter {name!r} has placement {pl}; the sharded regularizer supports Shard(0) "
        "(FSDP2's row sharding) and Replicate()"
    )
