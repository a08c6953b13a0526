"""Device and process concerns of a training run, in one place.

The recipe asks this module where tensors go, how to autocast, whether this process writes
files, and whether the user asked to stop; distributed training (DDP/FSDP) plugs in here
without touching the loop.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["EXIT_CODES", "Runtime", "StopSignals", "seed_everything"]

#: Process exit codes of ``snap-fast unlearn`` by run status (128 + signal number for signals,
#: as shells report them).
EXIT_CODES = {"completed": 0, "invalid": 2, "diverged": 3, "SIGINT": 130, "SIGTERM": 143}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """Where and how a run computes: one device, one process (the single-process default).

    Attributes:
        device: the torch device of the model and batches.
        precision: ``"fp32"`` or ``"bf16"`` (autocast; weights stay float32).
    """

    device: torch.device
    precision: str = "fp32"
    is_main_process: bool = True

    @classmethod
    def from_config(cls, device: str, precision: str) -> Runtime:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        return cls(device=dev, precision=precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def peak_memory_bytes(self) -> int | None:
        """Peak accelerator memory so far (CUDA), else ``None``."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None


@dataclass
class StopSignals:
    """SIGINT/SIGTERM handlers that ask the loop to stop at the next step boundary.

    Use as a context manager around the loop: the first signal sets :attr:`received` (the loop
    then saves a checkpoint and returns); a second SIGINT raises ``KeyboardInterrupt`` at once
    for a user who really wants out. Previous handlers are restored on exit. Outside the main
    thread (where Python forbids handlers) it does nothing.
    """

    received: str | None = None
    _previous: dict = field(default_factory=dict)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = name

    def __enter__(self) -> StopSignals:  # noqa: PYI034 (typing.Self needs Python 3.11; we support 3.10)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
