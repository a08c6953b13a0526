"""How many 1-D sorting problems are packed into one flat buffer.

Every backend sorts *segments*: for a tensor with n rows and L directions there are L segments of
length n (one per direction, the n projected rows). The projections of all tensors are stored
back to back in one flat float buffer, tensor by tensor, direction by direction, so one kernel
launch can serve a whole model through an offset table instead of a Python loop over tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["SegmentLayout"]


@dataclass(frozen=True)
class SegmentLayout:
    """Segments of a flat buffer.

    Attributes:
        lengths: length of every segment, in buffer order.
        runs: maximal runs of consecutive equal-length segments as ``(start, count, length)``;
            a run is a contiguous ``count × length`` block, which the PyTorch paths view as 2-D.
        total: number of elements in the buffer.
    """

    lengths: tuple[int, ...]
    runs: tuple[tuple[int, int, int], ...]
    total: int
    _offsets: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_blocks(cls, blocks: list[tuple[int, int]]) -> SegmentLayout:
        """Build from ``[(count, length), ...]``: ``count`` segments of ``length`` each, in order."""
        lengths: list[int] = []
        runs: list[tuple[int, int, int]] = []
        start = 0
        for count, length in blocks:
            if count < 0 or length < 1:
                raise ValueError(f"segment block (count={count}, length={length}) is invalid")
            if count == 0:
                continue
            lengths.extend([length] * count)
            if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == start:
                s, c, n = runs[-1]
                runs[-1] = (s, c + count, n)
            else:
                runs.append((start, count, length))
            start += count * length
        return cls(tuple(lengths), tuple(runs), start)

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def offsets(self, device: torch.device | str) -> torch.Tensor:
        """int64 (num_segments + 1,) start offsets, cached per device."""
        key = str(torch.device(device))
        if key not in self._offsets:
            lengths = torch.tensor((0,) + self.lengths, dtype=torch.int64)
            self._offsets[key] = torch.cumsum(lengths, 0).to(device)
        return self._offsets[key]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """2-D ``(count, length)`` views of ``flat``, one per run (no copy)."""
        return [flat[s : s + c * n].view(c, n) for s, c, n in self.runs]
