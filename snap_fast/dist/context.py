"""This process's place in a ``torch.distributed`` job, and collectives that fail with a clear error."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "DistributedFailure", "collective_guard", "init_from_env"]


class DistributedFailure(RuntimeError):
    """A collective failed: a peer process died, or it did not answer within the timeout."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job.

    Attributes:
        rank, world_size, local_rank: from the launcher (``torchrun``, ``accelerate launch``).
        device: the device this rank computes on (``cuda:<local_rank>`` or ``cpu``).
        group_backend: the process-group backend (``nccl`` or ``gloo``), ``None`` for a single
            process.
        collectives_on_device: collectives take tensors on ``device`` (NCCL), not on the CPU (gloo).
        owns_group: True when :func:`init_from_env` created the default group (and so should
            destroy it at the end).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group_backend: str | None = None
    collectives_on_device: bool = False
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
        group_backend=dist.get_backend(), collectives_on_device=dist.get_backend() == "nccl", owns_group=owns,
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
