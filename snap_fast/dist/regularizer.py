"""The sharded regularizer: SNAP's SWD over FSDP2 row shards, never gathering a weight.

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
   the usual backend (:mod:`snap_fast.ops.backends`);
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

import math
from typing import Any

import torch
import torch.distributed as dist

from ..ops.swd.function import swd_from_projections
from ..ops.swd.layout import SegmentLayout
from ..ops.swd.naive import power_sum
from ..regularizer import SlicedWassersteinRegularizer
from ..regularizer.terms import ParamFilter, RegularizedTerm, select_terms
from .comm import direction_bounds, ring_all_reduce_bytes
from .context import collective_guard
from .terms import (
    COLS,
    REPLICATED,
    ROWS,
    AllReduceSum,
    DTensor,
    ShardedLoraTerm,
    ShardedTerm,
    classify,
    local_tensor,
)

__all__ = ["ShardedSlicedWassersteinRegularizer"]


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

    def __init__(self, model: torch.nn.Module, *, process_group: dist.ProcessGroup | None = None, **kwargs: Any):
        if kwargs.get("normalize"):
            raise ValueError("normalize=True is not supported by the sharded regularizer yet (its "
                             "reference is split across ranks); use the plain regularizer or normalize=False")
        self._group = process_group
        # _select_terms (called by the base constructor) needs the group and the world size;
        # the base constructor then builds the fixed-mode cache through our _sorted_initial.
        super().__init__(model, **kwargs)

    def _select_terms(
        self, model: torch.nn.Module, param_filter: ParamFilter | None, initial_dtype: torch.dtype | None
    ) -> list[RegularizedTerm]:
        """The base class's selection, each term wrapped for its sharding; then the shard table."""
        self._join_group(model)

        def lora(term):
            kinds = [classify(f"{term.name} ({what})", tensor) for what, tensor in
                     (("base", term.factors.base), *zip(("A", "B"), term.factors.factor_params()))]
            if COLS in kinds:
                raise ValueError(f"LoRA layer {term.name!r}: a 1-D sharded factor or base is not supported")
            # A plain base on several ranks is replicated: the ordinary LoRA term runs locally.
            return ShardedLoraTerm(term) if kinds[0] == ROWS or self.world_size == 1 else term

        def plain(name, param):
            return ShardedTerm(name, param, initial_dtype, classify(name, param))

        terms = select_terms(model, param_filter, plain=plain, lora=lora)
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
            self.comm_bytes_last_call += ring_all_reduce_bytes(x.numel() * x.element_size(), self.world_size)
        return x

    def _assemble_lora_factors(self) -> None:
        """Whole LoRA factors on every rank, with autograd to the local shards (one all-reduce)."""
        pieces, shapes = [], []
        for t in self.lora:
            for f, offset in zip(t.factors.factor_params(), t.factor_offsets):
                local = local_tensor(f)
                row = f.numel() // f.shape[0]
                before, after = offset * row, f.numel() - offset * row - local.numel()
                pieces += [local.new_zeros(before), local.reshape(-1), local.new_zeros(after)]
                shapes.append(tuple(f.shape))
        flat = torch.cat(pieces).float()
        if self.world_size > 1:
            self.comm_bytes_last_call += ring_all_reduce_bytes(flat.numel() * 4, self.world_size)
            flat = AllReduceSum.apply(flat, self._group)
        full = flat.split([math.prod(shape) for shape in shapes])
        for i, t in enumerate(self.lora):
            t.full_factors = (full[2 * i].view(shapes[2 * i]), full[2 * i + 1].view(shapes[2 * i + 1]))

    # ------------------------------------------------------------------ reference
    @torch.no_grad()
    def _sorted_initial(self, theta: list[torch.Tensor], keep_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This rank's flat reference: [owned sorted segments | 1-D terms' W0Θ | replicated sorted].

        Collective (it routes the initial projections to their owners).
        """
        index = {id(t): i for i, t in enumerate(self.terms)}
        parts = []
        if self.rows:
            owned = self._to_owners([t.initial_projection(theta[index[id(t)]]).t() for t in self.rows])
            parts.append(self._ops.sort_segments(owned, self.owned_layout))
        if self.cols:
            partial = torch.cat([t.initial_projection(theta[index[id(t)]]).reshape(-1) for t in self.cols])
            parts.append(self._all_reduce_sum(partial, "all_reduce initial projections"))
        if self.replicated:
            proj0 = torch.cat([t.initial_projection(theta[index[id(t)]]).t().reshape(-1) for t in self.replicated])
            parts.append(self._ops.sort_segments(proj0, self.replicated_layout))
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
                targets = self._ops.match_sorted(owned, ref_rows, self.owned_layout, state)
            for p, tgt in zip(proj, self._from_owners(targets)):
                local = local + power_sum(p.float() - tgt, self.p)
        if self.cols:
            partial = torch.cat([t.project(theta[index[id(t)]]).reshape(-1) for t in self.cols]).float()
            full = self._all_reduce_sum(partial.detach().clone(), "all_reduce projections")
            # value of the full projection, gradient of this rank's partial dot products only
            shared = shared + power_sum(partial + (full - partial.detach()) - ref_cols, self.p)
        if self.replicated:
            proj = torch.cat([t.project(theta[index[id(t)]]).t().reshape(-1) for t in self.replicated])
            state = self._sort_state.setdefault("replicated", {}) if reuse else None
            shared = shared + self.n_projections * swd_from_projections(
                proj, ref_repl, self.replicated_layout, n_projections=self.n_projections, p=self.p,
                backend=self._ops, state=state,
            )
        total = self._all_reduce_sum(local.detach().clone(), "all_reduce value") + shared.detach()
        carrier = local + shared
        return (carrier + (total - carrier.detach())) / self.n_projections

    # ------------------------------------------------------------------ resume / introspection
    def _state_owner(self) -> dict:
        # one file per rank: the cached reference and the initial copies are this rank's shards
        return {"rank": self.rank, "world_size": self.world_size}

    def _check_state_owner(self, state: dict) -> None:
        if (state.get("rank"), state.get("world_size")) != (self.rank, self.world_size):
            raise ValueError(
                f"state is for rank {state.get('rank')} of {state.get('world_size')}, this is rank "
                f"{self.rank} of {self.world_size}: resume with the same number of processes"
            )

    def _reference_numel(self) -> int:
        return self.owned_layout.total + self._n_cols + self.replicated_layout.total

    def __repr__(self) -> str:
        return (
            f"ShardedSlicedWassersteinRegularizer(rank={self.rank}/{self.world_size}, rows={len(self.rows)}, "
            f"cols={len(self.cols)}, replicated={len(self.replicated)}, L={self.n_projections}, "
            f"p={self.p}, mode={self.mode!r}, backend={self.backend!r})"
        )
