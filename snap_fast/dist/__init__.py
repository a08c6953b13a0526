"""SNAP under ``torch.distributed``: process context, the sharded regularizer (FSDP2), FSDP2 setup.

* :mod:`.context` — this process's rank, device and group; collectives that fail clearly.
* :mod:`.comm` — direction ownership and the predicted traffic of a regularizer call.
* :mod:`.terms` — regularized terms as one rank holds them (row / column shards, replicas, LoRA).
* :mod:`.regularizer` — :class:`ShardedSlicedWassersteinRegularizer`.
* :mod:`.fsdp` — :func:`fully_shard_model`.

Under DDP every rank holds all weights and the plain regularizer runs unchanged on each rank.
"""

from .comm import direction_bounds, predicted_comm_bytes
from .context import (
    DistributedContext,
    DistributedFailure,
    collective_guard,
    init_from_env,
)
from .fsdp import fully_shard_model
from .regularizer import ShardedSlicedWassersteinRegularizer
from .terms import ShardedLoraTerm, ShardedTerm

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
