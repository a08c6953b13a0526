"""Data parallelism (DDP or FSDP2) for the unlearning recipe: its one handle on ``torch.distributed``.

``snap-fast unlearn`` launched by ``torchrun --nproc_per_node N`` or ``accelerate launch`` runs
one process per device. :class:`DataParallel` (built from the launcher's environment; a trivial
single-process object without one) gives the recipe:

* :meth:`~DataParallel.runtime`: this rank's device (``cuda:<LOCAL_RANK>``) and whether it is
  the main process (rank 0, the only one that writes the run folder);
* :meth:`~DataParallel.shard` (FSDP2, ``parallel="fsdp"``): ``fully_shard`` each decoder layer,
  then the root; parameters become row-sharded DTensors in place;
* :meth:`~DataParallel.wrap`: the module the loop calls forward on (``DistributedDataParallel``
  under several processes with DDP; the model itself otherwise, FSDP2 included);
* :meth:`~DataParallel.full_state` / :meth:`~DataParallel.load_full_state`: under FSDP2, the
  model's and optimizer's *full* state dicts gathered on rank 0 (CPU) for saving, and loaded
  back from rank 0 on resume;
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
so every rank joins every gradient all-reduce. FSDP2 averages gradients the same way (its
reduce-scatter divides by W), so the same weights make its step equal too. The regularizer's ``λ·SWD`` is added by a separate backward outside
DDP's forward: DDP does not all-reduce it, and every rank computes the same value and gradient
from identical weights and directions, so it is counted exactly once. Under FSDP2 the recipe
builds :class:`~snap_fast.dist.ShardedSlicedWassersteinRegularizer` instead: its gradient
reaches each rank's own rows only, also once, and no weight is gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..dist import (
    DistributedContext,
    DistributedFailure,
    collective_guard,
    fully_shard_model,
    init_from_env,
)
from .runtime import Runtime

__all__ = ["DataParallel", "DistributedFailure"]

T = TypeVar("T")


class DataParallel:
    """Data parallelism over the ranks of the default process group (or none).

    Args:
        ctx: where this process stands (see :func:`snap_fast.dist.init_from_env`).
        fsdp: shard the model with FSDP2 instead of replicating it with DDP (only matters
            under several processes; a single process trains the whole model either way).
    """

    def __init__(self, ctx: DistributedContext | None = None, *, fsdp: bool = False):
        self.ctx = ctx if ctx is not None else DistributedContext()
        self.fsdp = fsdp

    @classmethod
    def from_env(cls, device: str = "auto", *, fsdp: bool = False, timeout_s: float = 600.0) -> DataParallel:
        """Join the launcher's job (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), or stay single.

        ``device`` is the run's device setting: ``cpu`` forces the gloo backend and CPU tensors
        even when CUDA exists; ``cuda``/``auto`` use ``cuda:<LOCAL_RANK>`` and nccl when available.
        """
        kind = "cpu" if device == "cpu" else ("cuda" if str(device).startswith("cuda") else "auto")
        return cls(init_from_env(device=kind, timeout_s=timeout_s), fsdp=fsdp)

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

    @property
    def sharded(self) -> bool:
        """FSDP2 over several processes: every parameter is a row-sharded DTensor."""
        return self.fsdp and self.ctx.distributed

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
    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2: ``fully_shard`` each decoder layer, then the root (in place); else ``model``.

        Call it once the model (with its LoRA adapters) is built and before anything holds its
        parameters: the optimizer, the regularizer. A LoRA model's frozen base weights are
        sharded like the rest; only the adapters are trainable.
        """
        if not self.sharded:
            return model
        with collective_guard("fully_shard (FSDP2) the model"):
            return fully_shard_model(model)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call forward on: ``DistributedDataParallel(model)`` or ``model``.

        Under FSDP2 the sharded model itself (its forward gathers the weights layer by layer).
        Keep using ``model`` itself for everything else (saving, adapters, the regularizer).
        """
        if not self.ctx.distributed or self.sharded:
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

    # ------------------------------------------------------------------ FSDP2 state
    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Under FSDP2, the full (unsharded) state dicts, on rank 0's CPU. Collective.

        Returns ``(model_state, optimizer_state)``: on rank 0 the model's trainable parameters
        as ``{name: tensor}`` (names as in the unsharded model; a LoRA model's frozen base is
        left out, so a checkpoint gathers the adapters only) and the optimizer's state keyed by
        parameter name (``None`` without ``optimizer``); ``({}, {})`` on the other ranks. Only
        one tensor at a time is gathered on the devices.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        with collective_guard("gather the full model state dict (FSDP2)"):
            model_state = get_model_state_dict(model, options=options)
        # A tied weight (e.g. the LM head tied to the embedding) comes back once per name, as
        # separate copies: keep its first name only, as save_pretrained does unsharded.
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                model_state.pop(name, None)
        optim_state = None
        if optimizer is not None:
            with collective_guard("gather the full optimizer state dict (FSDP2)"):
                optim_state = get_optimizer_state_dict(model, optimizer, options=options)
        return model_state, optim_state

    def load_full_state(self, model: torch.nn.Module, model_state: dict, optimizer: torch.optim.Optimizer | None = None,
                        optim_state: dict | None = None) -> None:
        """Load :meth:`full_state`'s dicts into the sharded model (and optimizer). Collective.

        Only rank 0's dicts are read (the other ranks may pass ``{}``): each tensor is broadcast
        from rank 0 and every rank keeps its own rows. ``model_state`` may hold a subset of the
        model's tensors (a LoRA adapter); the others keep their values.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        with collective_guard("broadcast the model state dict from rank 0 (FSDP2)"):
            set_model_state_dict(model, model_state, options=options)
        if optimizer is not None:
            with collective_guard("broadcast the optimizer state dict from rank 0 (FSDP2)"):
                set_optimizer_state_dict(model, optimizer, optim_state or {}, options=options)

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` as a list on rank 0 (``None`` elsewhere); ``[obj]`` alone."""
        if not self.ctx.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        with collective_guard("gather per-rank state on rank 0"):
            dist.gather_object(obj, out, dst=0)
        return out

    # ------------------------------------------------------------------ the recipe's strategy
    def build_regularizer(self, model: torch.nn.Module, **kwargs):
        """The regularizer for this layout: the sharded one under FSDP2 (it never gathers a
        weight; same value), the plain one otherwise (under DDP every rank holds all weights)."""
        if self.sharded:
            from ..dist import ShardedSlicedWassersteinRegularizer as Regularizer
        else:
            from ..regularizer import SlicedWassersteinRegularizer as Regularizer
        return Regularizer(model, **kwargs)

    @property
    def holds_whole_weights(self) -> bool:
        """Every rank holds every weight (False under FSDP2, which never gathers them all)."""
        return not self.sharded

    def checkpoint_payload(self, model, optimizer, regularizer) -> tuple[dict[str, Any], dict | None, dict | None]:
        """What a checkpoint stores beyond the step's own fields. Collective under FSDP2.

        Returns ``(state, model_state, optimizer_state)``: ``state`` holds the optimizer and
        regularizer entries of ``trainer_state.pt``; under FSDP2 the full trainable weights and
        optimizer state are gathered on rank 0 (``model_state``/``optimizer_state``, saved as
        files of their own) and the regularizer's state is one entry per rank (its cache is
        sharded), without its initial copies: a resume rebuilds them from the original model.
        """
        if not self.sharded:
            state = {"optimizer": optimizer.state_dict(),
                     "regularizer": regularizer.state_dict() if regularizer is not None else None}
            return state, None, None
        model_state, optim_state = self.full_state(model, optimizer)
        per_rank = (self.gather_objects(regularizer.state_dict(include_initial=False))
                    if regularizer is not None else None)
        return {"optimizer": None, "regularizer": None, "regularizer_ranks": per_rank}, model_state, optim_state

    def restore(self, checkpoint: Path, model, optimizer, regularizer) -> dict[str, Any]:
        """Load a checkpoint into the model, optimizer and regularizer; returns its trainer state
        (scheduler, RNG, step). Under FSDP2 rank 0 reads the full weights and optimizer state and
        every rank keeps its rows. Collective under FSDP2."""
        from .checkpoint import OPTIMIZER_FILE, load_checkpoint, read_full_weights

        state = load_checkpoint(checkpoint, None if self.sharded else model)
        reg_state = self._regularizer_state(state, checkpoint) if regularizer is not None else None
        if self.sharded:
            weights = read_full_weights(checkpoint, model) if self.is_main else {}
            optim = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu") if self.is_main else {}
            self.load_full_state(model, weights, optimizer, optim)
        else:
            optimizer.load_state_dict(state["optimizer"])
        if regularizer is not None:
            regularizer.load_state_dict(reg_state)
        return state

    def _regularizer_state(self, state: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
        """This rank's regularizer state from a checkpoint; FSDP2 keeps one per rank."""
        per_rank = state.get("regularizer_ranks")
        if self.sharded and (per_rank is None or len(per_rank) != self.world_size):
            written = f"{len(per_rank)} FSDP2 processes" if per_rank else "a run without FSDP2 sharding"
            raise ValueError(f"resume: checkpoint {checkpoint} was written by {written}; this run has "
                             f"{self.world_size}: resume with the same number of processes")
        if not self.sharded and per_rank is not None:
            raise ValueError(f"resume: checkpoint {checkpoint} was written by {len(per_rank)} FSDP2 processes; "
                             f"resume with the same number of processes (torchrun --nproc_per_node {len(per_rank)})")
        return per_rank[self.rank] if self.sharded else state["regularizer"]

    def final_weights(self, model) -> dict[str, torch.Tensor] | None:
        """The trainable weights rank 0 saves under FSDP2 (collective); None otherwise (the
        model saves its own)."""
        return self.full_state(model)[0] if self.sharded else None

    # ------------------------------------------------------------------ agreement
    def reduce(self, values: dict[str, float]) -> dict[str, float]:
        """Sum every value over the ranks (one all-reduce); the keys must match on every rank."""
        if not self.ctx.distributed or not values:
            return dict(values)
        keys = sorted(values)
        device = self.ctx.device if self.ctx.collectives_on_device else torch.device("cpu")
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
