"""SNAP's regularizer and small process-group helpers for ``torch.distributed`` (DDP, FSDP2).

Under DDP every rank holds all weights, so the ordinary
:class:`~snap_fast.regularizer.SlicedWassersteinRegularizer` runs unchanged on each rank: DDP
averages the gradients, and the average of W identical regularizer gradients is that gradient
once (no double counting).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` sharded on
dim 0 (``Shard(0)``): each rank holds a block of *rows*. :class:`ShardedSlicedWassersteinRegularizer`
never gathers a weight. Per call:

1. every rank projects the rows it holds on all L directions, ``P_r = W_r Θ`` (``n_r × L``;
   Θ is identical on every rank: same seed, same generator state);
2. **segment ownership**: the L directions of every tensor are split into W contiguous ranges,
   rank q owns directions ``[qL/W, (q+1)L/W)``. One ``all_to_all`` sends every owner the
   projections of its directions (all n rows, detached, float32);
3. each owner matches its segments against the sorted initial projections it holds (the
   ``fixed``/``refresh`` cache is therefore sharded by directions: Σ n·L/W values per rank) with
   the usual backend (:func:`snap_fast.dispatch.match_sorted`);
4. a second ``all_to_all`` returns to every rank the matched targets of its own rows;
5. ``loss_r = Σ |P_r − T_r|^p / L`` carries autograd to the local shard only, and the returned
   value is the global sum (one scalar ``all_reduce``) — identical on every rank, for logging.

Traffic per call and rank: ``2 · (W−1)/W · n_r · L`` floats each way, against ``n_r · d`` weight
values held: a fraction ``≈ 2L/d`` of the weights (see ``benchmarks/bench_comm.py``). The sort
work is split W ways too, unlike an all-gather of all projections followed by a redundant sort.

A 1-D parameter (bias, norm) is a single 1×d row that FSDP2 shards along d: its projection is a
sum of per-rank partial dot products, combined by one ``all_reduce`` of L floats per tensor. A
parameter that is not a DTensor (or is ``Replicate()``) is computed redundantly on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .dispatch import match_sorted, sort_segments
from .functional import swd_from_projections
from .layout import SegmentLayout
from .reference import as_matrix
from .regularizer import ParamFilter, RegularizedTerm, SlicedWassersteinRegularizer

__all__ = [
    "DistributedContext",
    "DistributedFailure",
    "ShardedLoraTerm",
    "ShardedSlicedWassersteinRegularizer",
    "ShardedTerm",
    "collective_guard",
    "direction_bounds",
    "fully_shard_model",
    "init_from_env",
    "predicted_comm_bytes",
]

try:  # DTensor is public since torch 2.5; FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch builds without distributed support
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


# ---------------------------------------------------------------------------- process groups
class DistributedFailure(RuntimeError):
    """A collective failed: a peer process died, or it did not answer within the timeout."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job.

    Attributes:
        rank, world_size, local_rank: from the launcher (``torchrun``, ``accelerate launch``).
        device: the device this rank computes on (``cuda:<local_rank>`` or ``cpu``).
        backend: the process-group backend (``nccl`` or ``gloo``), ``None`` for a single process.
        owns_group: True when :func:`init_from_env` created the default group (and so should
            destroy it at the end).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        """Destroy the default process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_from_env(
    *, backend: str | None = None, timeout_s: float = 600.0, device: str = "auto"
) -> DistributedContext:
    """Join the job described by the launcher's environment, or run as a single process.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by ``torchrun`` and
    ``accelerate launch``; ``MASTER_ADDR``/``MASTER_PORT`` are read by PyTorch itself). With
    ``WORLD_SIZE`` unset or 1 nothing is initialised. An already initialised default group is
    reused.

    Args:
        backend: ``"nccl"``/``"gloo"``; default: nccl when CUDA is available and the device is
            not ``cpu``, else gloo.
        timeout_s: collective timeout; a rank whose peer died fails after at most this long
            instead of hanging forever.
        device: ``"auto"`` (``cuda:<LOCAL_RANK>`` when CUDA is available), ``"cpu"`` or
            ``"cuda"``.

    Raises:
        ValueError: malformed environment, ``timeout_s <= 0``, or an unknown ``device``.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world} from the environment are inconsistent")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world == 1 and not dist.is_initialized():
        return DistributedContext(device=dev)
    if use_cuda:
        torch.cuda.set_device(local_rank)  # NCCL binds each rank to its own GPU
    owns = False
    if not dist.is_initialized():
        chosen = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
        backend=dist.get_backend(), owns_group=owns,
    )


@contextlib.contextmanager
def collective_guard(what: str) -> Iterator[None]:
    """Turn a failed collective into a :class:`DistributedFailure` that says what happened.

    Gloo and NCCL report a dead peer as a connection reset or a timeout deep inside the backend;
    this names the operation and the likely cause so the surviving ranks exit with a clear error.
    """
    try:
        yield
    except DistributedFailure:
        raise
    except (RuntimeError, dist.DistBackendError) as exc:  # DistBackendError subclasses RuntimeError
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise DistributedFailure(
            f"rank {rank}: collective '{what}' failed — another rank probably died or stopped "
            f"answering within the process-group timeout ({type(exc).__name__}: {exc})"
        ) from exc


def direction_bounds(n_projections: int, world_size: int) -> list[int]:
    """Owner q of the sharded regularizer owns directions ``[b[q], b[q+1])`` of every tensor."""
    return [q * n_projections // world_size for q in range(world_size + 1)]


# ---------------------------------------------------------------------------- terms
ROWS, COLS, REPLICATED = "rows", "cols", "replicated"


class ShardedTerm(RegularizedTerm):
    """A regularized tensor as one rank holds it.

    ``kind`` says how its n×d matrix (see :func:`snap_fast.reference.as_matrix`) is split:

    * ``"rows"``: a DTensor ``Shard(0)`` of rank ≥ 2; this rank holds rows
      ``[row_offset, row_offset + n_local)``;
    * ``"cols"``: a 1-D DTensor ``Shard(0)``: the one row is split along d; this rank holds
      columns ``[col_offset, col_offset + d_local)``;
    * ``"replicated"``: a plain tensor or a ``Replicate()`` DTensor, fully present everywhere.

    ``n``/``d`` are the *global* sizes, so directions are drawn exactly as in the single-process
    regularizer. The kept initial copy (``resample``/``refresh``) is the local shard only.
    """

    def __init__(self, name: str, param: torch.Tensor, keep_initial: torch.dtype | None, kind: str):
        # Not calling RegularizedTerm.__init__: it would reshape the DTensor (a collective).
        self.name = name
        self.param = param
        self.kind = kind
        shape = tuple(param.shape)
        self.n = shape[0] if len(shape) >= 2 else 1
        self.d = param.numel() // self.n if self.n else 0
        local = self.local_matrix(param.detach())
        self.n_local = local.shape[0] if kind != COLS else 1
        self.d_local = local.shape[1]
        self.row_offset = 0
        self.col_offset = 0
        self.initial = None if keep_initial is None else local.to(keep_initial, copy=True)

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
        w = self.local_matrix(self.param)
        return w @ self._local_theta(theta).to(w.dtype)

    @torch.no_grad()
    def initial_projection(self, theta: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`project` for the initial weights, float32, no autograd."""
        w0 = self.initial if self.initial is not None else self.local_matrix(self.param.detach())
        compute = self.param.dtype if self.param.is_floating_point() else torch.float32
        return (w0.to(compute) @ self._local_theta(theta).to(compute)).float()


class _AllReduceSum(torch.autograd.Function):
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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


class ShardedLoraTerm(ShardedTerm):
    """A LoRA layer ``W = W0 + s · U V`` whose frozen base FSDP2 sharded by rows.

    The base rows stay where they are (``W0 Θ`` of the local rows, pinned while directions stay
    fixed). The factors are small (``r · (n + d)`` values against ``n · d``): the regularizer
    assembles them whole on every rank with one all-reduce of zero-padded shards per call
    (autograd: the backward all-reduces their gradients, so each rank's factor shard receives the
    gradient of the global value), then ``P_local = W0_local Θ + s · U[local rows] (V Θ)``.
    """

    def __init__(self, term: RegularizedTerm):
        self.factors = term.factors
        super().__init__(term.name, term.factors.base, None, ROWS)
        self.full_factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pinned: torch.Tensor | None = None
        # rows of each factor parameter this rank holds (offsets filled by the regularizer)
        self.factor_rows = [(_local(f).shape[0] if f.dim() else 1) for f in self.factors.factor_params()]
        self.factor_offsets = [0, 0]

    def _uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        # the same (U, V) views as snap_fast.lora.LoraFactors.uv, applied to the assembled factors
        a, b = self.full_factors
        return (b, a) if self.factors.kind == "linear" else (a.t(), b.t())

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """(n_local, L) float32 with autograd to the factors; needs :attr:`full_factors` set."""
        u, v = self._uv()
        u_local = u[self.row_offset : self.row_offset + self.n_local].float()
        w0_theta = self._pinned.float() if self._pinned is not None else self.initial_projection(theta)
        return torch.addmm(w0_theta, u_local, v.float() @ theta.float(), alpha=self.factors.scaling)

    @torch.no_grad()
    def pin_directions(self, theta: torch.Tensor, dtype: torch.dtype) -> None:
        self._pinned = None
        self._pinned = self.initial_projection(theta).to(dtype)

    def nbytes_kept(self) -> int:
        return 0 if self._pinned is None else self._pinned.numel() * self._pinned.element_size()


def _classify(name: str, param: torch.Tensor) -> str:
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


def _ring_all_reduce_bytes(nbytes: int, world_size: int) -> int:
    return 4 * (world_size - 1) * nbytes // world_size


def _chunk_rows(n: int, world_size: int) -> list[int]:
    """Rows per rank of ``Shard(0)`` (``torch.chunk`` semantics, as FSDP2 splits)."""
    size = -(-n // world_size)
    return [max(0, min(size, n - r * size)) for r in range(world_size)]


def predicted_comm_bytes(
    shapes: list[tuple[int, ...]], n_projections: int, world_size: int, *, mode: str = "fixed", rank: int = 0
) -> dict[str, int]:
    """Bytes one call of :class:`ShardedSlicedWassersteinRegularizer` moves, from shapes alone.

    Counts what ``rank`` sends plus receives (its own share excluded), float32 payloads, ring
    all-reduce (2·(W−1)/W of the buffer each way), for parameters sharded by FSDP2 (rank ≥ 2:
    rows; 1-D: columns; 0-D: replicated, no traffic).

    Args:
        shapes: the regularized parameter shapes (global).
        n_projections: L.
        world_size: W.
        mode: ``"fixed"`` (and ``refresh`` between redraws) or ``"resample"`` (and a ``refresh``
            step that redraws): the latter also routes the initial projections.
        rank: whose traffic.

    Returns ``{"projections", "targets", "initial", "all_reduce", "total"}`` in bytes;
    ``total`` equals ``comm_bytes_last_call`` after such a call (tested).
    """
    L, W = n_projections, world_size
    if W == 1:
        return {"projections": 0, "targets": 0, "initial": 0, "all_reduce": 0, "total": 0}
    bounds = direction_bounds(L, W)
    mine = bounds[rank + 1] - bounds[rank]
    rows = [s for s in shapes if len(s) >= 2]
    n_cols = sum(1 for s in shapes if len(s) == 1)
    exchange = 0
    for s in rows:
        local = _chunk_rows(s[0], W)[rank]
        exchange += local * (L - mine) + mine * (s[0] - local)
    exchange *= 4
    initial = exchange if mode == "resample" else 0
    reduce = _ring_all_reduce_bytes(4, W)  # the value
    if n_cols:
        reduce += _ring_all_reduce_bytes(n_cols * L * 4, W) * (2 if mode == "resample" else 1)
    total = 2 * exchange + initial + reduce
    return {"projections": exchange, "targets": exchange, "initial": initial, "all_reduce": reduce, "total": total}


def _power_sum(diff: torch.Tensor, p: float) -> torch.Tensor:
    return diff.square().sum() if p == 2 else diff.abs().pow(p).sum()


# ---------------------------------------------------------------------------- regularizer
class ShardedSlicedWassersteinRegularizer(SlicedWassersteinRegularizer):
    """The SNAP regularizer for a model whose parameters FSDP2 sharded by rows.

    Same arguments, modes and value as :class:`~snap_fast.regularizer.SlicedWassersteinRegularizer`
    (same seed → same directions → the same number as the single-process regularizer on the
    unsharded model), plus ``process_group`` (default: the mesh group of the DTensor
    parameters, else the default group). Construction and every call are **collective**: all
    ranks of the group must construct it from the same model and call it in the same order.

    Calling it returns a float32 0-dim tensor whose *value* is the global regularizer (identical
    on every rank) and whose *gradient* reaches this rank's shards only, each with its exact
    share ``∂SWD/∂W_local``: add ``λ · reg()`` to the local loss. FSDP2 averages the data-loss
    gradients across ranks but does not touch these, so nothing is double counted.

    Memory per rank: the sorted initial projections of the directions it owns
    (``Σ_tensors n · L/W`` values in ``reference_dtype``), the initial copy of its own shards
    (``resample``/``refresh``), L floats per 1-D tensor, and — when ``cache_directions`` — the
    full d×L directions of every tensor (they are not sharded; on CUDA they are regenerated
    from the seed instead by default).

    LoRA (PEFT) layers are regularized through their factors (:class:`ShardedLoraTerm`): the
    sharded base is never gathered, the small factors are all-reduced whole once per call.

    Raises:
        ValueError / TypeError: as the base class, plus unsupported DTensor layouts, parameters
            on different meshes, or no initialised process group.
        DistributedFailure: a collective failed (a peer died or timed out).
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
        process_group: dist.ProcessGroup | None = None,
    ):
        self._group = process_group
        # _build_terms (called by the base constructor) needs the group and the world size;
        # the base constructor then builds the fixed-mode cache through our _sorted_initial.
        super().__init__(
            model, n_projections=n_projections, p=p, mode=mode, refresh_every=refresh_every,
            seed=seed, param_filter=param_filter, reference_dtype=reference_dtype, backend=backend,
            cache_directions=cache_directions,
        )

    # ------------------------------------------------------------------ selection
    def _build_terms(
        self, model: torch.nn.Module, param_filter: ParamFilter | None, keep_initial: torch.dtype | None
    ) -> list[RegularizedTerm]:
        from .lora import build_lora_terms  # the one module that knows PEFT

        self._join_group(model)
        lora_terms, covered = build_lora_terms(model, keep_initial, param_filter)
        terms: list[RegularizedTerm] = []
        for lt in lora_terms:
            kinds = [_classify(f"{lt.name} ({what})", tensor) for what, tensor in
                     (("base", lt.factors.base), *zip(("A", "B"), lt.factors.factor_params()))]
            if COLS in kinds:
                raise ValueError(f"LoRA layer {lt.name!r}: a 1-D sharded factor or base is not supported")
            # A plain base on several ranks is replicated: the ordinary LoRA term runs locally.
            sharded = kinds[0] == ROWS or self.world_size == 1
            terms.append(ShardedLoraTerm(lt) if sharded else lt)
        seen: set[int] = set(covered)
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
            terms.append(ShardedTerm(name, param, keep_initial, _classify(name, param)))
        if not terms:
            if not trainable:
                raise ValueError("model has no trainable parameters (requires_grad=True) to regularize")
            raise ValueError("param_filter selected no parameter: nothing to regularize")
        for t in terms:
            if t.n * t.d == 0:
                raise ValueError(f"parameter {t.name!r} is empty (shape {tuple(t.param.shape)})")
        self._init_sharding(terms)
        return terms

    def _join_group(self, model: torch.nn.Module) -> None:
        """Group, rank and world size: the DTensor parameters' mesh, else the default group."""
        meshes = {p.device_mesh for p in model.parameters() if DTensor is not None and isinstance(p, DTensor)}
        if len(meshes) > 1:
            raise ValueError("the model's DTensor parameters live on several device meshes; use one")
        mesh = next(iter(meshes), None)
        if self._group is None and mesh is not None:
            if mesh.ndim != 1:
                raise ValueError(f"the model's device mesh is {mesh.ndim}-D; the sharded regularizer needs a 1-D mesh")
            self._group = mesh.get_group()
        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(self._group)
            self.world_size = dist.get_world_size(self._group)
        elif mesh is not None:
            raise ValueError("DTensor parameters need an initialised process group")
        else:
            self.rank, self.world_size = 0, 1

    def _init_sharding(self, terms: list[RegularizedTerm]) -> None:
        """Exchange the local shard sizes once: row/column offsets and the owners' layouts."""
        L, world = self.n_projections, self.world_size
        kind = {id(t): getattr(t, "kind", REPLICATED) for t in terms}  # plain LoRA terms: replicated
        self.rows = [t for t in terms if kind[id(t)] == ROWS]
        self.cols = [t for t in terms if kind[id(t)] == COLS]
        self.replicated = [t for t in terms if kind[id(t)] == REPLICATED]
        self.lora = [t for t in self.rows if isinstance(t, ShardedLoraTerm)]
        sizes = torch.tensor(
            [t.n_local for t in self.rows] + [t.d_local for t in self.cols]
            + [rows for t in self.lora for rows in t.factor_rows],
            dtype=torch.int64,
            device=terms[0].device,  # NCCL collectives need CUDA tensors
        )
        if world > 1 and sizes.numel():
            gathered = [torch.empty_like(sizes) for _ in range(world)]
            with collective_guard("all_gather shard sizes"):
                dist.all_gather(gathered, sizes, group=self._group)
            table = torch.stack(gathered).cpu()  # (world, n_rows + n_cols + 2·n_lora)
        else:
            table = sizes.unsqueeze(0).cpu()
        # counts[r][i]: rows (or columns) rank r holds of the i-th sharded term
        self._row_counts = table[:, : len(self.rows)].tolist()
        col_counts = table[:, len(self.rows) : len(self.rows) + len(self.cols)]
        factor_counts = table[:, len(self.rows) + len(self.cols) :]
        for i, t in enumerate(self.lora):
            t.factor_offsets = [int(factor_counts[: self.rank, 2 * i + j].sum()) for j in (0, 1)]
        for i, t in enumerate(self.rows):
            total = sum(c[i] for c in self._row_counts)
            if total != t.n:
                raise ValueError(f"parameter {t.name!r}: shards hold {total} rows, expected {t.n}")
            t.row_offset = sum(c[i] for c in self._row_counts[: self.rank])
        for i, t in enumerate(self.cols):
            if int(col_counts[:, i].sum()) != t.d:
                raise ValueError(f"parameter {t.name!r}: shards hold {int(col_counts[:, i].sum())} values, expected {t.d}")
            t.col_offset = int(col_counts[: self.rank, i].sum())
        self._bounds = direction_bounds(L, world)
        self._my_dirs = self._bounds[self.rank + 1] - self._bounds[self.rank]
        # The segments this rank owns: its directions of every row-sharded term, all n rows.
        self.owned_layout = SegmentLayout.from_blocks([(self._my_dirs, t.n) for t in self.rows])
        self.replicated_layout = SegmentLayout.from_blocks([(L, t.n) for t in self.replicated])
        self._n_cols = len(self.cols) * L
        self.comm_bytes_last_call = 0

    # ------------------------------------------------------------------ exchange
    def _to_owners(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Route every (L, n_local) block's direction ranges to their owners.

        Returns this rank's owned segments as one flat float32 buffer in ``owned_layout`` order.
        """
        world, b, me = self.world_size, self._bounds, self.rank
        if world == 1:
            return torch.cat([blk.float().reshape(-1) for blk in blocks])
        send = torch.cat([blk[b[q] : b[q + 1]].float().reshape(-1) for q in range(world) for blk in blocks])
        in_splits = [(b[q + 1] - b[q]) * sum(t.n_local for t in self.rows) for q in range(world)]
        piece_sizes = [self._my_dirs * self._row_counts[r][i] for r in range(world) for i in range(len(self.rows))]
        out_splits = [sum(piece_sizes[r * len(self.rows) : (r + 1) * len(self.rows)]) for r in range(world)]
        recv = send.new_empty(sum(out_splits))
        with collective_guard("all_to_all projections"):
            dist.all_to_all_single(recv, send, out_splits, in_splits, group=self._group)
        self.comm_bytes_last_call += (send.numel() - in_splits[me] + recv.numel() - out_splits[me]) * 4
        pieces = recv.split(piece_sizes)
        T = len(self.rows)
        return torch.cat([
            torch.cat(
                [pieces[r * T + i].view(self._my_dirs, self._row_counts[r][i]) for r in range(world)], dim=1
            ).reshape(-1)
            for i in range(T)
        ])

    def _from_owners(self, owned: torch.Tensor) -> list[torch.Tensor]:
        """Inverse route: owned segments' values back to the ranks holding those rows.

        Returns one (L, n_local) float32 tensor per row-sharded term.
        """
        world, b, me, T = self.world_size, self._bounds, self.rank, len(self.rows)
        per_term = [v.view(self._my_dirs, t.n) for v, t in zip(owned.split([self._my_dirs * t.n for t in self.rows]), self.rows)]
        if world == 1:
            return per_term
        send_pieces = []
        for r in range(world):
            for i, v in enumerate(per_term):
                start = sum(c[i] for c in self._row_counts[:r])
                send_pieces.append(v[:, start : start + self._row_counts[r][i]].reshape(-1))
        send = torch.cat(send_pieces)
        in_splits = [sum(p.numel() for p in send_pieces[r * T : (r + 1) * T]) for r in range(world)]
        piece_sizes = [(b[q + 1] - b[q]) * t.n_local for q in range(world) for t in self.rows]
        out_splits = [sum(piece_sizes[q * T : (q + 1) * T]) for q in range(world)]
        recv = send.new_empty(sum(out_splits))
        with collective_guard("all_to_all targets"):
            dist.all_to_all_single(recv, send, out_splits, in_splits, group=self._group)
        self.comm_bytes_last_call += (send.numel() - in_splits[me] + recv.numel() - out_splits[me]) * 4
        pieces = recv.split(piece_sizes)
        return [
            torch.cat([pieces[q * T + i].view(b[q + 1] - b[q], t.n_local) for q in range(world)], dim=0)
            for i, t in enumerate(self.rows)
        ]

    def _all_reduce_sum(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if self.world_size > 1:
            with collective_guard(what):
                dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self._group)
            # ring all-reduce: each rank sends and receives 2·(W−1)/W of the buffer
            self.comm_bytes_last_call += _ring_all_reduce_bytes(x.numel() * x.element_size(), self.world_size)
        return x

    def _assemble_lora_factors(self) -> None:
        """Whole LoRA factors on every rank, with autograd to the local shards (one all-reduce)."""
        pieces, shapes = [], []
        for t in self.lora:
            for f, offset in zip(t.factors.factor_params(), t.factor_offsets):
                local = _local(f)
                row = f.numel() // f.shape[0]
                before, after = offset * row, f.numel() - offset * row - local.numel()
                pieces += [local.new_zeros(before), local.reshape(-1), local.new_zeros(after)]
                shapes.append(tuple(f.shape))
        flat = torch.cat(pieces).float()
        if self.world_size > 1:
            self.comm_bytes_last_call += _ring_all_reduce_bytes(flat.numel() * 4, self.world_size)
            flat = _AllReduceSum.apply(flat, self._group)
        full = flat.split([math.prod(shape) for shape in shapes])
        for i, t in enumerate(self.lora):
            t.full_factors = (full[2 * i].view(shapes[2 * i]), full[2 * i + 1].view(shapes[2 * i + 1]))

    # ------------------------------------------------------------------ reference
    @torch.no_grad()
    def _sorted_initial(self, theta: list[torch.Tensor]) -> torch.Tensor:
        """This rank's flat reference: [owned sorted segments | 1-D terms' W0Θ | replicated sorted].

        Collective (it routes the initial projections to their owners).
        """
        index = {id(t): i for i, t in enumerate(self.terms)}
        parts = []
        if self.rows:
            owned = self._to_owners([t.initial_projection(theta[index[id(t)]]).t() for t in self.rows])
            parts.append(sort_segments(owned, self.owned_layout, self.backend))
        if self.cols:
            partial = torch.cat([t.initial_projection(theta[index[id(t)]]).reshape(-1) for t in self.cols])
            parts.append(self._all_reduce_sum(partial, "all_reduce initial projections"))
        if self.replicated:
            proj0 = torch.cat([t.initial_projection(theta[index[id(t)]]).t().reshape(-1) for t in self.replicated])
            parts.append(sort_segments(proj0, self.replicated_layout, self.backend))
        return torch.cat(parts) if parts else torch.empty(0, device=self.device)

    # ------------------------------------------------------------------ call
    def __call__(self) -> torch.Tensor:
        """Global Σ SWD(W0, W) (float32, 0-dim, same on every rank); gradient to local shards.

        Collective: every rank of the group must call it.
        """
        self.comm_bytes_last_call = 0
        theta, ref = self._directions_and_reference()
        index = {id(t): i for i, t in enumerate(self.terms)}
        ref_rows, ref_cols, ref_repl = ref.split([self.owned_layout.total, self._n_cols, self.replicated_layout.total])
        reuse = self.mode != "resample"  # permutations may be reused while directions stay fixed
        local = torch.zeros((), dtype=torch.float32, device=self.device)
        shared = torch.zeros((), dtype=torch.float32, device=self.device)  # same on every rank
        if self.lora:
            self._assemble_lora_factors()
        if self.rows:
            proj = [t.project(theta[index[id(t)]]).t() for t in self.rows]  # (L, n_local) each
            owned = self._to_owners([p.detach() for p in proj])
            with torch.no_grad():
                state = self._sort_state.setdefault("rows", {}) if reuse else None
                targets = match_sorted(owned, ref_rows, self.owned_layout, self.backend, state)
            for p, tgt in zip(proj, self._from_owners(targets)):
                local = local + _power_sum(p.float() - tgt, self.p)
        if self.cols:
            partial = torch.cat([t.project(theta[index[id(t)]]).reshape(-1) for t in self.cols]).float()
            full = self._all_reduce_sum(partial.detach().clone(), "all_reduce projections")
            # value of the full projection, gradient of this rank's partial dot products only
            shared = shared + _power_sum(partial + (full - partial.detach()) - ref_cols, self.p)
        if self.replicated:
            proj = torch.cat([t.project(theta[index[id(t)]]).t().reshape(-1) for t in self.replicated])
            state = self._sort_state.setdefault("replicated", {}) if reuse else None
            shared = shared + self.n_projections * swd_from_projections(
                proj, ref_repl, self.replicated_layout, n_projections=self.n_projections, p=self.p,
                backend=self.backend, state=state,
            )
        total = self._all_reduce_sum(local.detach().clone(), "all_reduce value") + shared.detach()
        carrier = local + shared
        return (carrier + (total - carrier.detach())) / self.n_projections

    # ------------------------------------------------------------------ resume / introspection
    def state_dict(self, include_initial: bool = True) -> dict:
        """This rank's state; save one file per rank (the cached reference is sharded).

        ``include_initial`` stores the initial shards (``resample``/``refresh``) or the owned
        sorted reference (``fixed``), as the base class does for the whole model.
        """
        state: dict = {
            "mode": self.mode, "calls": self.calls, "generator": self._generator.get_state(),
            "names": self.parameter_names, "rank": self.rank, "world_size": self.world_size,
        }
        if self.mode == "refresh":
            state["theta"] = self._theta
            state["sorted_ref"] = self._sorted_ref
        if include_initial:
            if self.mode == "fixed":
                state["sorted_ref"] = self._sorted_ref
            else:
                state["initial"] = [t.initial for t in self.terms]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's :meth:`state_dict` (same world size and rank).

        Raises:
            ValueError: another mode, parameter list, rank or world size.
        """
        if state.get("mode") != self.mode:
            raise ValueError(f"state is for mode {state.get('mode')!r}, this regularizer is {self.mode!r}")
        if (state.get("rank"), state.get("world_size")) != (self.rank, self.world_size):
            raise ValueError(
                f"state is for rank {state.get('rank')} of {state.get('world_size')}, this is rank "
                f"{self.rank} of {self.world_size}: resume with the same number of processes"
            )
        if list(state.get("names", self.parameter_names)) != self.parameter_names:
            raise ValueError("state is for another set of parameters")
        for t, w0 in zip(self.terms, state.get("initial") or []):
            if w0 is not None:
                if t.initial is not None and w0.shape != t.initial.shape:
                    raise ValueError(f"state initial for {t.name!r} has shape {tuple(w0.shape)}, expected {tuple(t.initial.shape)}")
                t.initial = w0.to(self.device)
        self.calls = int(state["calls"])
        self._generator.set_state(state["generator"])
        if self.mode == "refresh":
            self._theta = state["theta"]
        if state.get("sorted_ref") is not None:
            self._sorted_ref = state["sorted_ref"].to(self.device)
        self._sort_state = {}

    def __repr__(self) -> str:
        return (
            f"ShardedSlicedWassersteinRegularizer(rank={self.rank}/{self.world_size}, rows={len(self.rows)}, "
            f"cols={len(self.cols)}, replicated={len(self.replicated)}, L={self.n_projections}, "
            f"p={self.p}, mode={self.mode!r}, backend={self.backend!r})"
        )


# ---------------------------------------------------------------------------- FSDP2
def fully_shard_model(model: torch.nn.Module, *, mesh=None, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) the usual way: each block, then the root.

    Blocks are the modules whose class Hugging Face lists in ``model._no_split_modules`` (the
    decoder layers); a model without that list is sharded as one unit. Parameters become
    ``Shard(0)`` DTensors in place; build :class:`ShardedSlicedWassersteinRegularizer` *after*
    this call, from the same model.

    Args:
        model: the model, already on this rank's device.
        mesh: a 1-D ``DeviceMesh``; default: all ranks of the default group on the model's
            device type (``init_device_mesh("cpu"|"cuda", (world_size,))``).
        reshard_after_forward: FSDP2's option (free the gathered weights after forward).

    Returns the same ``model`` object (now an ``FSDPModule``).

    Raises:
        ValueError: no initialised process group.
    """
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("fully_shard_model needs an initialised process group (launch with torchrun)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if module is not model and type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
