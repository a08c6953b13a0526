"""Who owns which directions under sharding, and how many bytes one regularizer call moves."""

from __future__ import annotations

__all__ = ["direction_bounds", "predicted_comm_bytes", "ring_all_reduce_bytes"]


def direction_bounds(n_projections: int, world_size: int) -> list[int]:
    """Owner q of the sharded regularizer owns directions ``[b[q], b[q+1])`` of every tensor."""
    return [q * n_projections // world_size for q in range(world_size + 1)]


def ring_all_reduce_bytes(nbytes: int, world_size: int) -> int:
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
    reduce = ring_all_reduce_bytes(4, W)  # the value
    if n_cols:
        reduce += ring_all_reduce_bytes(n_cols * L * 4, W) * (2 if mode == "resample" else 1)
    total = 2 * exchange + initial + reduce
    return {"projections": exchange, "targets": exchange, "initial": initial, "all_reduce": reduce, "total": total}
