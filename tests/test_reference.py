"""The float64 reference and the properties of SNAP.md §2, checked on odd shapes.

Every property is checked on the plain reference (the oracle) and on the public functional fast
path (torch backend), so a property violation is caught in whichever one breaks it. The POT
oracle and an explicit gradient formula written here from SNAP.md §2 make the checks independent
of the code under test.
"""

from __future__ import annotations

import itertools

import numpy as np
import ot
import pytest
import torch

from snap_fast import (
    random_projections,
    sliced_wasserstein,
    sliced_wasserstein_reference,
)

SHAPES = list(itertools.product([1, 3, 129, 1000], [1, 7, 576]))
L = 6  # few directions keep the 12 shapes × properties cheap; L is not what is under test


def _pair(n: int, d: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = w0 + scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    return w0, w


def _theta(d: int, n_dirs: int = L, seed: int = 1) -> torch.Tensor:
    return random_projections(d, n_dirs, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference(w0, w, theta, p=2.0):
    return sliced_wasserstein_reference(w0, w, theta, p)


def _fast(w0, w, theta, p=2.0):
    # float32 fast path; comparisons against it use float32 tolerances
    return sliced_wasserstein(w0.float(), w.float(), p=p, projections=theta.float(), backend="torch").double()


IMPLS = {"reference": (_reference, 1e-10), "fast-torch": (_fast, 2e-4)}


# ----------------------------------------------------------------- explicit formula, POT


def _swd_numpy(w0: np.ndarray, w: np.ndarray, theta: np.ndarray, p: float) -> float:
    """SNAP.md §2 written out directly: sort each projected column, sum over rows, mean over L."""
    s0 = np.sort(w0 @ theta, axis=0)
    s1 = np.sort(w @ theta, axis=0)
    return float((np.abs(s1 - s0) ** p).sum() / theta.shape[1])


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_numpy_formula_and_pot(n, d, impl):
    fn, rtol = IMPLS[impl]
    w0, w = _pair(n, d, seed=n * 1000 + d)
    theta = _theta(d)
    value = fn(w0, w, theta).item()
    expected = _swd_numpy(w0.numpy(), w.numpy(), theta.numpy(), 2.0)
    assert value == pytest.approx(expected, rel=rtol, abs=1e-12)
    # POT's sliced distance is sqrt(mean_l W_2^2) between uniform row distributions: × n after squaring
    pot = ot.sliced_wasserstein_distance(w0.numpy(), w.numpy(), projections=theta.numpy(), p=2)
    assert value == pytest.approx(n * float(pot) ** 2, rel=max(rtol, 1e-9))


@pytest.mark.parametrize("p", [1.5, 3.0])
def test_general_p_matches_pot(p):
    w0, w = _pair(129, 7, seed=3)
    theta = _theta(7)
    pot = ot.sliced_wasserstein_distance(w0.numpy(), w.numpy(), projections=theta.numpy(), p=p)
    for fn, rtol in IMPLS.values():
        assert fn(w0, w, theta, p).item() == pytest.approx(129 * float(pot) ** p, rel=max(rtol, 1e-9))


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
def test_gradcheck_reference_float64(p):
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    theta = _theta(4, 3)
    assert torch.autograd.gradcheck(lambda a, b: sliced_wasserstein_reference(a, b, theta, p), (w0, w))


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
def test_gradient_is_g_theta_transpose(p):
    """∂SWD/∂W = G Θᵀ with G[k, l] = (p/L)·sign(v−u)·|v−u|^{p−1} at the rank of v_k (SNAP.md §2)."""
    w0, w = _pair(33, 9, seed=11)
    theta = _theta(9, 5)
    v = (w @ theta).numpy()
    u = np.sort((w0 @ theta).numpy(), axis=0)
    G = np.empty_like(v)
    for col in range(v.shape[1]):
        rank = np.argsort(np.argsort(v[:, col]))
        diff = v[:, col] - u[rank, col]
        G[:, col] = p / theta.shape[1] * np.sign(diff) * np.abs(diff) ** (p - 1)
    expected = G @ theta.numpy().T
    w_ref = w.clone().requires_grad_(True)
    sliced_wasserstein_reference(w0, w_ref, theta, p).backward()
    np.testing.assert_allclose(w_ref.grad.numpy(), expected, rtol=1e-10, atol=1e-12)
    w_fast = w.float().requires_grad_(True)
    sliced_wasserstein(w0.float(), w_fast, p=p, projections=theta.float(), backend="torch").backward()
    np.testing.assert_allclose(w_fast.grad.double().numpy(), expected, rtol=2e-4, atol=2e-5)


# ----------------------------------------------------------------- properties of §2


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_on_equal_inputs_and_nonnegative(n, d, impl):
    fn, _ = IMPLS[impl]
    w0, w = _pair(n, d, seed=5)
    theta = _theta(d)
    assert fn(w0, w0.clone(), theta).item() == 0.0
    assert fn(w0, w, theta).item() >= 0.0


@pytest.mark.parametrize("n,d", [(3, 7), (129, 576), (1000, 7)])
@pytest.mark.parametrize("impl", IMPLS)
def test_row_permutation_invariance(n, d, impl):
    fn, rtol = IMPLS[impl]
    w0, w = _pair(n, d, seed=9)
    theta = _theta(d)
    base = fn(w0, w, theta).item()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    assert fn(w0, w[perm], theta).item() == pytest.approx(base, rel=rtol)
    assert fn(w0[perm], w, theta).item() == pytest.approx(base, rel=rtol)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_shift_formula(n, d, impl):
    """W = W0 + c (every row): SWD = (n/L)·Σ_l ⟨θ_l, c⟩² exactly, for p = 2."""
    fn, rtol = IMPLS[impl]
    w0, _ = _pair(n, d, seed=13)
    c = torch.randn(d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    theta = _theta(d)
    expected = n / L * ((c @ theta) ** 2).sum().item()
    # the float32 path rounds W0θ and (W0+c)θ separately: the error scales with |W0θ|, not with c
    atol = 0.0 if impl == "reference" else 1e-5 * n * (1 + (w0 @ theta).abs().max().item()) ** 2
    assert fn(w0, w0 + c, theta).item() == pytest.approx(expected, rel=max(rtol, 1e-9), abs=atol)


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("n,d", [(1, 7), (3, 1), (129, 7), (1000, 576)])
@pytest.mark.parametrize("impl", IMPLS)
def test_identity_coupling_upper_bound(n, d, p, impl):
    """Sorting is the optimal 1-D coupling: SWD ≤ (1/L)·Σ_l ‖(W − W0) θ_l‖_p^p (p ≥ 1)."""
    fn, rtol = IMPLS[impl]
    w0, w = _pair(n, d, seed=17, scale=0.3)
    theta = _theta(d)
    bound = (((w - w0) @ theta).abs() ** p).sum().item() / L
    value = fn(w0, w, theta, p).item()
    assert value <= bound * (1 + rtol)
    if n == 1:  # one sample: the identity coupling is the only one
        assert value == pytest.approx(bound, rel=max(rtol, 1e-9))
    elif n >= 129:  # independent noise: sorting must strictly beat the identity coupling
        assert value < 0.9 * bound


def test_one_dimensional_tensor_is_one_row():
    w0, w = _pair(1, 50, seed=19)
    theta = _theta(50)
    assert _reference(w0[0], w[0], theta).item() == pytest.approx(_reference(w0, w, theta).item(), rel=1e-14)
    # for one row the value is the plain mean over directions of |⟨w − w0, θ⟩|^p
    expected = (((w - w0) @ theta) ** 2).sum().item() / L
    assert _reference(w0[0], w[0], theta).item() == pytest.approx(expected, rel=1e-12)


def test_random_projections_are_unit_and_seeded():
    a = random_projections(576, 100, generator=torch.Generator().manual_seed(3))
    b = random_projections(576, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert a.shape == (576, 100) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=0), torch.ones(100), rtol=0, atol=1e-5)
    torch.testing.assert_close(b.float(), a)  # same draw for every dtype
    # directions are uniform on the sphere: the mean of 100 unit vectors in R^576 is small
    assert a.mean(dim=1).norm().item() < 0.2
