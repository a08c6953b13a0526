"""LoRA-delta statistics: how far adapters moved the weights, from the factors, never from ΔW.

For one adapted layer with stored update ``ΔW = s · U V`` (U: n×r, V: r×d; see
:mod:`snap_fast.adapters`) and the r×r Gram matrices ``G_U = UᵀU`` and ``G_V = V Vᵀ``:

* ``fro_norm``        ‖ΔW‖_F = |s| · sqrt(tr(G_U G_V))
* ``row_norm_max``,   row norms of ΔW as stored (rows = the samples the regularizer uses):
  ``row_norm_mean``   ‖ΔW_i‖² = s² · (U G_V Uᵀ)_ii
* ``base_fro_norm``   ‖W0‖_F, computed once per base weight and cached (the base is frozen;
                      an in-place change of it is detected through the tensor version)
* ``rel_change``      ‖ΔW‖_F / ‖W0‖_F
* ``inner_w0``        ⟨W0, ΔW⟩ = s · Σ (W0 Vᵀ) ∘ U  (one pass over W0: n·d·r work; skipped,
                      reported as NaN, with ``with_base=False``)
* ``spectral_norm``,  from the r×r core: with R_U, R_V any r×r square roots of the Grams
  ``effective_rank``  (RᵀR = G, as the R factor of a QR of U and of Vᵀ; taken from a float64
                      eigendecomposition, so rank-deficient factors such as PEFT's B = 0 at
                      init are fine), the singular values of ``s · R_U R_Vᵀ`` are those of
                      ΔW. Effective rank = exp(−Σ pᵢ log pᵢ) with pᵢ = σᵢ / Σσ (Roy &
                      Vetterli, 2007): between 1 and r, and 0 when ΔW = 0.

``"total"`` aggregates: Frobenius norms in quadrature, ``rel_change`` of the totals, ``inner_w0``
summed, ``row_norm_max``/``spectral_norm`` maxima, ``row_norm_mean`` over all rows, the mean
``effective_rank`` over layers, and ``layers`` (count).

Cost per layer: O((n + d)·r²) for the Grams and row norms plus the optional O(n·d·r) inner
product; dense materialisation would be O(n·d·r) to form ΔW plus an SVD. Layers are grouped by
shape, rank and dtype (a Llama has seven groups, one per projection kind): every statistic of a
group is one batched operation over its stacked factors, so a model costs a few launches per
group, not a dozen per layer; only ⟨W0, ΔW⟩ reads each base weight with its own GEMM (stacking
the frozen bases would copy them). On CUDA the Grams of every factor come from one Triton launch
(:mod:`snap_fast.kernels.lora_gram`); elsewhere from one batched GEMM per shape. All results come
back to the host in one transfer.
"""

from __future__ import annotations

import math
import weakref

import torch

from ..adapters import LoraFactors, find_lora_factors
from .backends import Backend, choose_gram_backend

__all__ = ["STAT_KEYS", "lora_delta_stats"]

STAT_KEYS = (
    "fro_norm", "row_norm_max", "row_norm_mean", "base_fro_norm", "rel_change", "inner_w0",
    "spectral_norm", "effective_rank",
)

# id(base weight) -> (weak reference, tensor version, ‖W0‖_F): the base is frozen, so its norm is
# read once; a version change (in-place update) or a new tensor at the same id recomputes it.
_BASE_NORMS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _base_norm(base: torch.Tensor) -> torch.Tensor:
    key = id(base)
    hit = _BASE_NORMS.get(key)
    if hit is not None and hit[0]() is base and hit[1] == base._version:
        return hit[2]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(base, dtype=torch.float32)
    _BASE_NORMS[key] = (weakref.ref(base, lambda _, k=key: _BASE_NORMS.pop(k, None)), base._version, norm)
    return norm


def _grams(factors: list[LoraFactors], backend: Backend) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(G_U, G_V) float32 per layer."""
    uvs = [f.uv() for f in factors]
    flat = backend.gram_matrices([m for u, v in uvs for m in (u, v.t())])
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(uvs))]


def _sqrt_factor(gram: torch.Tensor) -> torch.Tensor:
    """Batched r×r R with RᵀR = G (G symmetric PSD up to rounding), float64."""
    evals, evecs = torch.linalg.eigh(gram.double())
    return evals.clamp_min(0).sqrt().unsqueeze(-1) * evecs.transpose(-1, -2)


def _singular_values(factors: list[LoraFactors], grams, device: torch.device) -> list[torch.Tensor]:
    """σ(ΔW) per layer, float64, from the r×r cores; one eigh/svd call per distinct rank."""
    by_rank: dict[int, list[int]] = {}
    for i, f in enumerate(factors):
        by_rank.setdefault(f.rank, []).append(i)
    sigma: list[torch.Tensor | None] = [None] * len(factors)
    for idx in by_rank.values():
        g_u = torch.stack([grams[i][0] for i in idx])
        g_v = torch.stack([grams[i][1] for i in idx])
        scale = torch.tensor([factors[i].scaling for i in idx], dtype=torch.float64, device=device)
        core = scale[:, None, None] * (_sqrt_factor(g_u) @ _sqrt_factor(g_v).transpose(-1, -2))
        for j, s in zip(idx, torch.linalg.svdvals(core)):
            sigma[j] = s
    return sigma  # type: ignore[return-value]


def _shape_groups(factors: list[LoraFactors]) -> list[list[int]]:
    """Indices of the layers whose factors stack: same (n, d), rank and dtypes."""
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(factors):
        u, v = f.uv()
        groups.setdefault((tuple(f.base.shape), f.rank, u.dtype, v.dtype, f.base.dtype), []).append(i)
    return list(groups.values())


def _group_stats(factors: list[LoraFactors], idx: list[int], grams, sigma, with_base: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """STAT_KEYS rows (g, 8) float64 of one group of stackable layers, and their row norms (g, n)."""
    group = [factors[i] for i in idx]
    scale = torch.tensor([f.scaling for f in group], dtype=torch.float64, device=device)
    u = torch.stack([f.uv()[0].detach() for f in group]).float()  # (g, n, r)
    g_u = torch.stack([grams[i][0] for i in idx]).double()
    g_v = torch.stack([grams[i][1] for i in idx])
    fro = scale.abs() * (g_u * g_v.double().transpose(1, 2)).sum(dim=(1, 2)).clamp_min(0).sqrt()
    rows = scale.abs().float()[:, None] * (torch.bmm(u, g_v) * u).sum(dim=2).clamp_min(0).sqrt()
    base_norm = torch.stack([_base_norm(f.base) for f in group]).double()
    if with_base:
        inner = scale * torch.stack([
            (f.base @ v.detach().t().to(f.base.dtype)).double().mul(uu.double()).sum()
            for f, uu, v in zip(group, u, (f.uv()[1] for f in group))
        ])
    else:
        inner = torch.full_like(scale, math.nan)
    sv = torch.stack([sigma[i] for i in idx])  # (g, r)
    total_sv = sv.sum(dim=1, keepdim=True)
    probs = sv / total_sv.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(probs * torch.log(probs.clamp_min(torch.finfo(torch.float64).tiny))).sum(dim=1)
    erank = torch.where(total_sv[:, 0] > 0, entropy.exp(), torch.zeros_like(entropy))
    table = torch.stack([fro, rows.max(dim=1).values.double(), rows.mean(dim=1).double(), base_norm,
                         fro / base_norm, inner, sv.max(dim=1).values, erank], dim=1)
    return table, rows


@torch.no_grad()
def lora_delta_stats(
    model: torch.nn.Module, *, with_base: bool = True, backend: str | None = None
) -> dict[str, dict[str, float]]:
    """Statistics of every LoRA update ΔW = s·B A of the active adapter, from the factors.

    Args:
        model: a PEFT model (or any module holding PEFT LoRA layers).
        with_base: compute ⟨W0, ΔW⟩ (one read of every adapted base weight); False skips it
            (``inner_w0`` is then NaN) for the cheapest logging.
        backend: ``"triton"`` (Gram matrices in one launch; CUDA, or the interpreter), ``"torch"``,
            or None (Triton on CUDA when every rank ≤ 64, else torch).

    Returns:
        ``{module_name: {stat: float}, ..., "total": {stat: float, "layers": count}}`` with the
        stats of :data:`STAT_KEYS` (definitions in the module docstring).

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: the model has no LoRA layer for its active adapter, an adapter is not
            supported (see :func:`snap_fast.adapters.find_lora_factors`), or a bad ``backend``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    factors = find_lora_factors(model)
    if not factors:
        raise ValueError("model has no LoRA adapters (no PEFT LoRA layer carries the active adapter)")
    device = factors[0].base.device
    grams = _grams(factors, choose_gram_backend(device, backend, max(f.rank for f in factors)))

    sigma = _singular_values(factors, grams, device)
    table = torch.empty(len(factors), len(STAT_KEYS), dtype=torch.float64, device=device)
    row_sums, row_counts = [], []
    for idx in _shape_groups(factors):
        rows_of_group, rows = _group_stats(factors, idx, grams, sigma, with_base, device)
        table[idx] = rows_of_group
        row_sums.append(rows.double().sum())
        row_counts.append(rows.numel())

    total_fro = table[:, 0].square().sum().sqrt()
    total_base = table[:, 3].square().sum().sqrt()
    totals = torch.stack([
        total_fro, table[:, 1].max(), torch.stack(row_sums).sum() / sum(row_counts), total_base,
        total_fro / total_base, table[:, 5].sum(), table[:, 6].max(), table[:, 7].mean(),
    ])
    values = torch.cat([table, totals[None]]).cpu().tolist()  # the one device→host transfer
    result = {f.module_name: dict(zip(STAT_KEYS, row)) for f, row in zip(factors, values)}
    result["total"] = dict(zip(STAT_KEYS, values[-1]))
    result["total"]["layers"] = len(factors)
    return result
