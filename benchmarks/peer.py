"""Baselines every regularizer benchmark compares against, written from SNAP.md §2.

* :class:`PeerRegularizer` — the authors' implementation as SNAP.md §2 describes it: a Python loop
  over the tensors; per tensor, fresh directions drawn on the CPU and copied to the weights'
  device, a full bfloat16 copy of the initial weights, the current projections cast to bfloat16
  before the difference, two matrix products, two ``torch.sort`` along the rows and a sum.
* :class:`PotRegularizer` — POT's ``ot.sliced_wasserstein_distance`` per tensor with the torch
  backend (autograd flows through it), on the same directions as the peer loop, scaled to the
  same quantity: ``n · SW_p^p``.

Both are callables returning a float32 0-dim tensor with autograd, like
:class:`snap_fast.SlicedWassersteinRegularizer`, so a benchmark times all three the same way.
Nothing here imports snap_fast: the baselines stay independent of the code they measure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["PeerRegularizer", "PotRegularizer", "draw_directions_cpu", "peer_swd", "pot_swd"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(n, d) view: rows are the samples; a 1-D tensor is one row."""
    return t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)


def draw_directions_cpu(d: int, n_projections: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(d, L) float32 unit directions drawn on the CPU, then copied to ``device`` (as the authors do)."""
    theta = torch.randn(d, n_projections, generator=generator)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return theta.to(device)


def peer_swd(w0_bf16: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """One tensor of the peer loop: SWD(W0, W) with a bf16 W0 and bf16 projections.

    Args:
        w0_bf16: bfloat16 copy of the initial weights, same shape as ``w``.
        w: current weights (any float dtype), carrying autograd.
        theta: (d, L) float32 unit directions.
        p: exponent.

    Returns a float32 0-dim tensor.
    """
    proj0 = _rows(w0_bf16) @ theta.to(torch.bfloat16)
    proj = (_rows(w) @ theta.to(w.dtype)).to(torch.bfloat16)
    sorted0 = torch.sort(proj0, dim=0).values
    sorted1 = torch.sort(proj, dim=0).values
    diff = sorted1 - sorted0
    powered = diff.square() if p == 2 else diff.abs().pow(p)
    return powered.sum(dtype=torch.float32) / theta.shape[1]


def pot_swd(w0: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """One tensor through POT: ``n · sliced_wasserstein_distance(W0, W, projections=Θ, p) ** p``.

    POT returns ``(mean_l W_p^p)^(1/p)`` between uniform distributions over the n rows; raising
    it to ``p`` and multiplying by ``n`` gives SNAP.md's sum over rows. ``w0`` must have
    ``w``'s dtype (POT's requirement).
    """
    import ot  # optional dependency (the ``dev`` extra): imported only when POT is measured

    a0, a = _rows(w0), _rows(w)
    return a.shape[0] * ot.sliced_wasserstein_distance(a0, a, projections=theta.to(a.dtype), p=p) ** p


class _PerTensorLoop:
    """Shared driver: a Python loop over tensors with fresh CPU directions per tensor per call."""

    def __init__(self, params: Sequence[torch.Tensor], n_projections: int, p: float, seed: int, copy_dtype):
        self.params = list(params)
        self.n_projections = n_projections
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)
        # copy_dtype None: a copy in each tensor's own dtype
        self.initial = [w.detach().to(copy_dtype or w.dtype, copy=True) for w in self.params]

    def one(self, w0: torch.Tensor, w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for w0, w in zip(self.initial, self.params):
            theta = draw_directions_cpu(_rows(w).shape[1], self.n_projections, self.generator, w.device)
            total = total + self.one(w0, w, theta).float()
        return total


class PeerRegularizer(_PerTensorLoop):
    """The authors' loop (SNAP.md §2): bf16 copy of W0, fresh CPU directions every call.

    Args:
        params: the tensors to regularize (current weights, read at every call).
        n_projections: L.
        p: exponent.
        seed: seed of the CPU direction generator.
    """

    def __init__(self, params: Sequence[torch.Tensor], n_projections: int = 100, p: float = 2.0, seed: int = 0):
        super().__init__(params, n_projections, p, seed, torch.bfloat16)

    def one(self, w0, w, theta):
        return peer_swd(w0, w, theta, self.p)


class PotRegularizer(_PerTensorLoop):
    """POT per tensor, fresh CPU directions every call, a copy of W0 in the weights' dtype."""

    def __init__(self, params: Sequence[torch.Tensor], n_projections: int = 100, p: float = 2.0, seed: int = 0):
        super().__init__(params, n_projections, p, seed, None)

    def one(self, w0, w, theta):
        return pot_swd(w0, w, theta, self.p)
