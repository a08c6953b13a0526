"""Data parallelism for the unlearning recipe: the recipe's one handle on ``torch.distributed``.

``snap-fast unlearn`` launched by ``torchrun --nproc_per_node N`` or ``accelerate launch`` runs
one process per device. :class:`DataParallel` (built from the launcher's environment; a trivial
single-process object without one) gives the recipe:

* :meth:`~DataParallel.runtime`: this rank's device (``cuda:<LOCAL_RANK>``) and whether it is
  the main process (rank 0, the only one that writes the run folder);
* :meth:`~DataParallel.wrap`: the module the loop calls forward on (``DistributedDataParallel``
  under several processes; the model itself otherwise);
* :meth:`~DataParallel.split`: this rank's share of an optimizer step's micro-batches, each with
  the loss weight that makes the data-parallel gradient *equal* to the single-process one (the
  global batch is unchanged: ``batch_size · grad_accum`` examples per set and step);
* :meth:`~DataParallel.reduce`: metrics summed over ranks (the logged losses are the
  single-process losses), and :meth:`~DataParallel.any` for decisions all ranks must share
  (a stop signal).

The gradient algebra: the recipe's single-process loss of a step is ``Σ_j loss_j / m`` over the
step's m micro-batches. Rank r runs micro-batches ``j ≡ r (mod W)`` with weight ``W / m``; DDP
averages the gradients over the W ranks, giving ``Σ_j ∇loss_j / m`` exactly. A rank with fewer
micro-batches than the others (m not a multiple of W) pads with the step's first one at weight 0,
so every rank joins every gradient all-reduce. The regularizer's ``λ·SWD`` is added by a separate backward outside
DDP's forward: DDP does not all-reduce it, and every rank computes the same value and gradient
from identical weights and directions, so it is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..distributed import (
    DistributedContext,
    DistributedFailure,
    collective_guard,
    init_from_env,
)
from .runtime import Runtime

__all__ = ["DataParallel", "DistributedFailure"]

T = TypeVar("T")


class DataParallel:
    """Data parallelism over the ranks of the default process group (or none).

    Args:
        ctx: where this process stands (see :func:`snap_fast.distributed.init_from_env`).
    """

    def __init__(self, ctx: DistributedContext | None = None):
        self.ctx = ctx if ctx is not None else DistributedContext()

    @classmethod
    def from_env(cls, device: str = "auto", *, timeout_s: float = 600.0) -> DataParallel:
        """Join the launcher's job (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), or stay single.

        ``device`` is the run's device setting: ``cpu`` forces the gloo backend and CPU tensors
        even when CUDA exists; ``cuda``/``auto`` use ``cuda:<LOCAL_RANK>`` and nccl when available.
        """
        kind = "cpu" if device == "cpu" else ("cuda" if str(device).startswith("cuda") else "auto")
        return cls(init_from_env(device=kind, timeout_s=timeout_s))

    # ------------------------------------------------------------------ facts
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def runtime(self, device: str, precision: str) -> Runtime:
        """The recipe's :class:`Runtime` for this rank.

        Single process: exactly ``Runtime.from_config(device, precision)``. Several processes:
        this rank's device (``cuda:<LOCAL_RANK>`` unless ``device`` is ``cpu``) and
        ``is_main_process`` only on rank 0.
        """
        if not self.ctx.distributed:
            return Runtime.from_config(device, precision)
        return Runtime(device=self.ctx.device, precision=precision, is_main_process=self.is_main)

    # ------------------------------------------------------------------ model and data
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call forward on: ``DistributedDataParallel(model)`` or ``model``.

        Keep using ``model`` itself for everything else (saving, adapters, the regularizer).
        """
        if not self.ctx.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        with collective_guard("DistributedDataParallel broadcast of the initial weights"):
            return DistributedDataParallel(model, device_ids=device_ids)

    def split(self, micro: Sequence[T]) -> list[tuple[T, float]]:
        """This rank's micro-batches of one optimizer step, with their loss weights.

        Multiply each micro-batch's loss by its weight (instead of dividing by ``len(micro)``).
        Every rank gets the same number of pairs, ``ceil(len(micro) / W)``, because DDP
        all-reduces the gradients in every backward and all ranks must take part in each; a
        weight of 0 marks a placeholder (the step's first micro-batch) that contributes nothing.
        With ``grad_accum`` a multiple of W no placeholder is ever needed.

        Raises:
            ValueError: ``micro`` is empty.
        """
        if not micro:
            raise ValueError("split() needs at least one micro-batch")
        world, m = self.world_size, len(micro)
        mine = [(mb, world / m) for mb in list(micro)[self.rank :: world]]
        return mine + [(micro[0], 0.0)] * (-(-m // world) - len(mine))

    # ------------------------------------------------------------------ agreement
    def reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sum every value over the ranks (one all-reduce); the keys must match on every rank."""
        if not self.ctx.distributed or not values:
            return dict(values)
        keys = sorted(values)
        device = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
        buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        with collective_guard("all_reduce metrics"):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return dict(zip(keys, buf.tolist()))

    def reduce_step(self, sums: dict[str, float], tokens: int) -> tuple[dict[str, float], int]:
        """One step's loss sums and token count, summed over ranks (one all-reduce).

        A key present on no rank stays absent; one present on some ranks counts 0 elsewhere
        (ranks may see different sets, e.g. a rank whose micro-batches have no general rows).
        """
        if not self.ctx.distributed:
            return dict(sums), tokens
        keys = ("loss", "forget", "retain", "general")
        unknown = set(sums) - set(keys)
        if unknown:
            raise ValueError(f"reduce_step: unexpected keys {sorted(unknown)}")
        flat = {"tokens": float(tokens)}
        for k in keys:
            flat[k] = float(sums.get(k, 0.0))
            flat[f"has_{k}"] = 1.0 if k in sums else 0.0
        total = self.reduce(flat)
        return {k: total[k] for k in keys if total[f"has_{k}"] > 0}, round(total["tokens"])

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a stop signal)."""
        return bool(self.reduce({"flag": 1.0 if flag else 0.0})["flag"] > 0)

    def main_first(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; the others wait and re-raise rank 0's error, if any.

        Used for the run folder: rank 0 checks and writes it, and a refusal (``--resume`` with
        a changed config) stops every rank with the same message instead of leaving them
        waiting for a collective that never comes.
        """
        if not self.ctx.distributed:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - any refusal is re-raised below, on every rank
                error = exc
        box: list[Any] = [None if error is None else (type(error).__name__, str(error))]
        with collective_guard("broadcast run-folder status"):
            dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            name, message = box[0]
            exc_type = {"ValueError": ValueError, "TypeError": TypeError, "FileExistsError": FileExistsError}
            raise exc_type.get(name, RuntimeError)(f"rank 0: {message}")
        return result

    def barrier(self) -> None:
        if self.ctx.distributed:
            with collective_guard("barrier"):
                dist.barrier()

    def close(self) -> None:
        """Leave the process group if :meth:`from_env` created it."""
        self.ctx.close()
