"""The public functional ``sliced_wasserstein`` (torch backend) against the float64 reference.

Values and gradients for fp32 / fp16 / bf16 inputs, non-contiguous views, 1-D and rank-3 tensors,
the segment layout and sorting dispatch it runs on, and every bad input it must reject.
"""

from __future__ import annotations

import pytest
import torch

from snap_fast import (
    random_projections,
    sliced_wasserstein,
    sliced_wasserstein_reference,
)
from snap_fast.ops.backends import match_sorted, resolve_backend, sort_segments
from snap_fast.ops.swd.layout import SegmentLayout

# (value rtol, gradient relative-norm tol) per input dtype. Half inputs are projected in their own
# dtype (the GEMM output is rounded to 8 or 11 mantissa bits, as in the authors' code), so the
# tests draw W from a wider, shifted distribution than W0: the matched differences are then O(1),
# well above that rounding, and the tolerances measure the implementation, not the dtype.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 2e-2), torch.bfloat16: (3e-2, 8e-2)}


def _theta(d: int, n_dirs: int = 8, seed: int = 1) -> torch.Tensor:
    return random_projections(d, n_dirs, generator=torch.Generator().manual_seed(seed))


def _check_against_reference(w0: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, p: float = 2.0):
    """Compare value and ∂/∂w of the fast path with the reference on the same (rounded) inputs."""
    rtol, gtol = TOL[w.dtype]
    w = w.detach().requires_grad_(True)
    value = sliced_wasserstein(w0, w, p=p, projections=theta, backend="torch")
    assert value.dtype == torch.float32 and value.dim() == 0
    value.backward()

    w64 = w.detach().double().requires_grad_(True)
    # the fast path projects with Θ rounded to the input dtype: give the oracle the same Θ
    ref = sliced_wasserstein_reference(w0.double(), w64, theta.to(w.dtype).double(), p)
    ref.backward()
    assert value.item() == pytest.approx(ref.item(), rel=rtol)
    assert w.grad.shape == w.shape and w.grad.dtype == w.dtype
    err = (w.grad.double() - w64.grad).norm() / w64.grad.norm()
    assert err.item() < gtol, f"relative gradient error {err.item():.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(1, 7), (3, 576), (129, 1), (1000, 7)])
@pytest.mark.parametrize("p", [2.0, 1.5])
def test_values_and_gradients_match_reference(dtype, n, d, p):
    g = torch.Generator().manual_seed(n + d)
    w0 = torch.randn(n, d, generator=g).to(dtype)
    w = (2 * torch.randn(n, d, generator=g) + 1).to(dtype)
    _check_against_reference(w0, w, _theta(d), p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_views(dtype):
    g = torch.Generator().manual_seed(0)
    big0 = torch.randn(40, 130, generator=g).to(dtype)
    big = (2 * torch.randn(40, 130, generator=g) + 1).to(dtype)
    # transposed (column-major) and strided views must give the values of their contiguous copies
    for view0, view in [(big0.t(), big.t()), (big0[::3, 1::2], big[::3, 1::2])]:
        assert not view.is_contiguous()
        theta = _theta(view.shape[1])
        _check_against_reference(view0, view, theta)
        a = sliced_wasserstein(view0, view, projections=theta, backend="torch")
        b = sliced_wasserstein(view0.contiguous(), view.contiguous(), projections=theta, backend="torch")
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_gradient_reaches_a_non_contiguous_leaf():
    leaf = torch.randn(20, 9, requires_grad=True)
    w0 = torch.randn(9, 20)
    sliced_wasserstein(w0, leaf.t(), projections=_theta(20), backend="torch").backward()
    assert leaf.grad is not None and leaf.grad.shape == (20, 9) and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_dimensional_and_rank3(dtype):
    g = torch.Generator().manual_seed(5)
    # a 1-D tensor is one row (1×d)
    w0, w = torch.randn(300, generator=g).to(dtype), (2 * torch.randn(300, generator=g) + 1).to(dtype)
    _check_against_reference(w0, w, _theta(300))
    # rank 3 keeps dim 0 as rows and flattens the rest (a conv kernel: out × in × k)
    w0, w = torch.randn(16, 3, 5, generator=g).to(dtype), (2 * torch.randn(16, 3, 5, generator=g) + 1).to(dtype)
    theta = _theta(15)
    _check_against_reference(w0, w, theta)
    flat = sliced_wasserstein(w0.reshape(16, 15), w.reshape(16, 15), projections=theta, backend="torch")
    assert sliced_wasserstein(w0, w, projections=theta, backend="torch").item() == flat.item()


def test_seed_gives_reproducible_directions():
    w0, w = torch.randn(50, 12), torch.randn(50, 12)
    a = sliced_wasserstein(w0, w, n_projections=20, seed=3, backend="torch")
    b = sliced_wasserstein(w0, w, n_projections=20, seed=3, backend="torch")
    c = sliced_wasserstein(w0, w, n_projections=20, seed=4, backend="torch")
    theta = random_projections(12, 20, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item() != c.item()
    assert a.item() == pytest.approx(sliced_wasserstein_reference(w0, w, theta).item(), rel=1e-5)


def test_float64_inputs_and_w0_gradients_use_the_reference():
    w0 = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    theta = _theta(6).double()
    value = sliced_wasserstein(w0, w, projections=theta)
    assert value.dtype == torch.float64
    value.backward()
    assert w0.grad is not None and w.grad is not None
    # each matched pair (v, u) contributes ±∂|v − u|^p: summed over rows, the two gradients cancel
    torch.testing.assert_close((w0.grad + w.grad).sum(0), torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)
    assert w.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_propagate(bad):
    """Documented behaviour: a NaN/inf weight makes the value non-finite (never silently dropped)."""
    w0, w = torch.randn(20, 5), torch.randn(20, 5)
    w[3, 2] = bad
    assert not torch.isfinite(sliced_wasserstein(w0, w, n_projections=4, seed=0, backend="torch"))
    assert not torch.isfinite(sliced_wasserstein(w, w0, n_projections=4, seed=0, backend="torch"))


# ----------------------------------------------------------------- layout and dispatch


def test_segment_layout_and_torch_dispatch_match_per_segment_sorts():
    # three tensors: 4 directions × n=5, 3 × n=1, 2 × n=5 (equal lengths not adjacent in one run)
    layout = SegmentLayout.from_blocks([(4, 5), (3, 1), (0, 9), (2, 5)])
    assert layout.total == 4 * 5 + 3 + 2 * 5 and layout.num_segments == 9 and layout.max_length == 5
    assert layout.runs == ((0, 4, 5), (20, 3, 1), (23, 2, 5))
    offsets = layout.offsets("cpu")
    assert offsets.tolist() == [0, 5, 10, 15, 20, 21, 22, 23, 28, 33]
    x = torch.randn(layout.total)
    ref = torch.randn(layout.total)
    sorted_x = sort_segments(x, layout, "torch")
    sorted_ref = sort_segments(ref, layout, "torch")
    targets = match_sorted(x, sorted_ref, layout, "torch")
    for i in range(layout.num_segments):
        a, b = offsets[i].item(), offsets[i + 1].item()
        assert torch.equal(sorted_x[a:b], torch.sort(x[a:b]).values)
        # the target of the k-th smallest projection is the k-th smallest reference value
        order = torch.argsort(x[a:b])
        assert torch.equal(targets[a:b][order], torch.sort(ref[a:b]).values)


def test_layout_rejects_bad_blocks():
    with pytest.raises(ValueError, match="length=0"):
        SegmentLayout.from_blocks([(2, 0)])
    with pytest.raises(ValueError, match="count=-1"):
        SegmentLayout.from_blocks([(-1, 3)])


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("SNAP_FAST_BACKEND", raising=False)
    assert resolve_backend("cpu", "torch") == "torch"
    assert resolve_backend("cpu", " Torch ") == "torch"
    assert resolve_backend("cpu") in ("torch", "cpp")
    monkeypatch.setenv("SNAP_FAST_BACKEND", "torch")
    assert resolve_backend("cpu") == "torch"
    with pytest.raises(ValueError, match="cuda"):
        resolve_backend("cpu", "cuda")
    monkeypatch.setenv("SNAP_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SNAP_FAST_BACKEND='fastest'"):
        resolve_backend("cpu")
    with pytest.raises(ValueError, match="SNAP_FAST_BACKEND"):
        sliced_wasserstein(torch.randn(3, 2), torch.randn(3, 2), n_projections=2)
    # an explicit argument wins over the environment
    assert resolve_backend("cpu", "torch") == "torch"


def test_triton_backend_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("cpu", "triton")


# ----------------------------------------------------------------- bad input


def _swd(**overrides):
    kwargs = dict(w0=torch.randn(4, 3), w=torch.randn(4, 3), n_projections=5, backend="torch")
    kwargs.update(overrides)
    return sliced_wasserstein(**kwargs)


@pytest.mark.parametrize(
    "overrides, exc, pattern",
    [
        (dict(w=torch.randn(4, 5)), ValueError, r"w0 and w .*\(4, 3\) and \(4, 5\)"),
        (dict(w=torch.randn(3, 4)), ValueError, r"shape"),
        (dict(w0=torch.randn(12)), ValueError, r"w0 and w .*\(12,\)"),
        (dict(w=torch.ones(4, 3, dtype=torch.int64)), TypeError, r"w must .*floating.*int64"),
        (dict(w0=torch.ones(4, 3, dtype=torch.int32)), TypeError, r"w0 must .*floating"),
        (dict(w0=torch.ones(4, 3, dtype=torch.bool)), TypeError, r"w0 must .*floating"),
        (dict(w0=[[1.0]]), TypeError, r"w0 must be a torch.Tensor"),
        (dict(w0=torch.empty(0, 3), w=torch.empty(0, 3)), ValueError, r"w0 is empty.*\(0, 3\)"),
        (dict(w0=torch.empty(0), w=torch.empty(0)), ValueError, r"empty"),
        (dict(n_projections=0), ValueError, r"n_projections must be >= 1, got 0"),
        (dict(n_projections=-3), ValueError, r"n_projections"),
        (dict(n_projections=2.5), TypeError, r"n_projections must be an int"),
        (dict(n_projections=True), TypeError, r"n_projections"),
        (dict(p=0), ValueError, r"p must be > 0"),
        (dict(p=-1.0), ValueError, r"p must be > 0"),
        (dict(p=float("nan")), ValueError, r"p must be > 0"),
        (dict(p="2"), TypeError, r"p must be a number"),
        (dict(projections=torch.randn(4, 5)), ValueError, r"projections must have shape \(d, L\) = \(3, L\).*\(4, 5\)"),
        (dict(projections=torch.randn(3)), ValueError, r"projections must have shape"),
        (dict(projections=torch.randn(3, 0)), ValueError, r"projections is empty"),
        (dict(projections=torch.ones(3, 2, dtype=torch.int64)), TypeError, r"projections must .*floating"),
        (dict(backend="numpy"), ValueError, r"backend='numpy'"),
        (dict(seed=1.5), TypeError, r"seed must be an int or None, got float"),
        (dict(w0=torch.randn(4, 3, device="meta")), ValueError, r"same device"),
    ],
)
def test_bad_input_names_the_argument(overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _swd(**overrides)
