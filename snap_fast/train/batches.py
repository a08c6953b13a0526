"""The training sets and their order: which examples each micro-batch of each step holds."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..io import read_jsonl

if TYPE_CHECKING:
    from .config import UnlearnConfig

__all__ = ["UnlearnData", "training_pair"]


class UnlearnData:
    """The training sets and their order: a pure function of ``(seed, step)``.

    Each epoch is one pass over the forget set in a seeded random order; the retain and general
    sets are subsampled (without replacement, cycling when smaller) to the forget-set size for
    that epoch (SNAP.md §3), times ``R/B`` when their micro-batches hold ``R`` examples
    (``retain_batch_size``, ``general_batch_size``) against the forget set's ``B``. Micro-batch
    ``j`` of an epoch pairs forget examples ``order[j·B:(j+1)·B]`` with positions
    ``j·R:(j+1)·R`` of each of the retain and general subsamples (each with its own ``R``).
    Because the order depends only on the seed and the epoch, resuming needs just the step number.
    """

    def __init__(self, forget: list[dict], retain: list[dict], general: list[dict], *,
                 forget_key: str, batch_size: int, grad_accum: int, seed: int,
                 retain_batch_size: int | None = None, general_batch_size: int | None = None):
        self.forget, self.retain, self.general = forget, retain, general
        self.forget_key = forget_key
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.retain_batch_size = retain_batch_size or batch_size
        self.general_batch_size = general_batch_size or self.retain_batch_size
        self._set_batch = {"retain": self.retain_batch_size, "general": self.general_batch_size}
        self.micro_per_epoch = math.ceil(len(forget) / batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / grad_accum)
        self._orders: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, cfg: UnlearnConfig) -> UnlearnData:
        folder = Path(folder)
        forget = read_jsonl(folder / "forget.jsonl")

        def optional(name: str, wanted: bool) -> list[dict]:
            path = folder / name
            return read_jsonl(path) if wanted and path.is_file() else []

        retain = optional("retain.jsonl", cfg.uses_retain and cfg.alpha > 0)
        general = optional("general.jsonl", cfg.uses_retain and cfg.alpha > 0 and cfg.use_general)
        return cls(forget, retain, general, forget_key=cfg.forget_target, batch_size=cfg.batch_size,
                   grad_accum=cfg.grad_accum, seed=cfg.seed, retain_batch_size=cfg.retain_batch_size,
                   general_batch_size=cfg.general_batch_size)

    def _subsample(self, rng: np.random.Generator, size: int, per_batch: int) -> np.ndarray:
        n = math.ceil(len(self.forget) * per_batch / self.batch_size)
        reps = math.ceil(n / size)
        return np.concatenate([rng.permutation(size) for _ in range(reps)])[:n]

    def epoch_order(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            order = {"forget": rng.permutation(len(self.forget))}
            for name in ("retain", "general"):
                rows = getattr(self, name)
                order[name] = (self._subsample(rng, len(rows), self._set_batch[name]) if rows
                               else np.zeros(0, dtype=np.int64))
            self._orders = {epoch: order}  # only the current epoch is ever needed again
        return self._orders[epoch]

    def position(self, step: int) -> dict[str, int]:
        """The data-order state before optimizer step ``step`` (0-based)."""
        return {"epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch}

    def micro_batches(self, step: int) -> list[dict[str, Any]]:
        """Micro-batches of optimizer step ``step``: dicts with ``forget``/``retain``/``general``
        lists of {"prompt","response"} and ``forget_idx`` (long tensor), ``retain_idx``,
        ``general_idx`` (int arrays): their indices into the sets."""
        pos = self.position(step)
        order = self.epoch_order(pos["epoch"])
        first = pos["step_in_epoch"] * self.grad_accum
        last = min(first + self.grad_accum, self.micro_per_epoch)
        out = []
        for j in range(first, last):
            sl = slice(j * self.batch_size, (j + 1) * self.batch_size)
            idx = order["forget"][sl]
            mb: dict[str, Any] = {
                "forget_idx": torch.as_tensor(idx, dtype=torch.long),
                "forget": [training_pair(self.forget[i], self.forget_key) for i in idx],
            }
            for name in ("retain", "general"):
                rows = getattr(self, name)
                per_batch = self._set_batch[name]
                drawn = order[name][j * per_batch : (j + 1) * per_batch]
                mb[name + "_idx"] = drawn
                mb[name] = [training_pair(rows[i], "response") for i in drawn]
            out.append(mb)
        return out


def training_pair(record: dict, key: str) -> dict[str, Any]:
    """A record as the collator takes it, trained on ``record[key]``."""
    # An original answer cut at the generation cap is trained on without an EOS (collator).
    truncated = bool(record.get("original_truncated")) and record[key] == record.get("original_response")
    return {"prompt": record["prompt"], "response": record[key], "truncated": truncated}
