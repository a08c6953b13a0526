"""Triton kernels of snap_fast.kernels.segmented_sort against float64 PyTorch references.

On a machine without CUDA these run under the Triton interpreter (tests/conftest.py switches it
on before triton is imported); on a GPU they run natively. Interpreted programs are slow (tenths
of a second each), so layouts are small but hold every case at once: segment lengths 1, 3, 129
and 1000 in one layout, several segments of each.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from snap_fast.kernels import segmented_sort as ss

from snap_fast import sliced_wasserstein
from snap_fast.ops.swd.layout import SegmentLayout
from snap_fast.ops.swd.naive import (
    matched_targets,
    random_projections,
    sliced_wasserstein_reference,
)
from snap_fast.regularizer import SlicedWassersteinRegularizer
from tests.helpers import projection_rtol, relative_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = ss._interpreted()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Lengths 1, 3, 129 and 1000 in ONE layout (three launch groups plus padding in each).
MIXED = [(2, 1), (3, 3), (2, 129), (1, 1000), (2, 3)]


# ------------------------------------------------------------------------------------ helpers
def strided(values: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view (stride 2) holding ``values``; the gaps hold garbage."""
    base = torch.full((2 * values.numel(),), 1e4, dtype=values.dtype, device=values.device)
    view = base[::2]
    view.copy_(values)
    assert not view.is_contiguous()
    return view


def poisoned(layout: SegmentLayout) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write fails the test."""
    return torch.full((layout.total,), float("nan"), dtype=torch.float32, device=DEVICE)


def sort_reference(x: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """float64 per-segment torch.sort, flattened."""
    return torch.cat([torch.sort(v.double(), dim=1).values.reshape(-1) for v in layout.views(x)])


def sorted_random(layout: SegmentLayout, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(layout.total, device=DEVICE).to(dtype)
    return torch.cat([torch.sort(v, dim=1).values.reshape(-1) for v in layout.views(x)])


def match_reference(proj: torch.Tensor, ref: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """float64 matched targets via snap_fast.ops.swd.naive.matched_targets (torch.argsort)."""
    return torch.cat(
        [
            matched_targets(p.double(), r.double()).reshape(-1)
            for p, r in zip(layout.views(proj), layout.views(ref))
        ]
    )


def segment_costs(proj: torch.Tensor, targets: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Σ_k (proj − T)² per segment in float64: the quantity SWD sums."""
    diff = (proj.double() - targets.double()).square()
    return torch.cat([v.sum(dim=1) for v in layout.views(diff)])


def assert_comonotone(proj: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor, layout: SegmentLayout):
    """T is the sorted reference placed along the order of proj (ties in any order)."""
    for p, t, r in zip(layout.views(proj), layout.views(targets), layout.views(ref)):
        for prow, trow, rrow in zip(p.double().cpu().numpy(), t.double().cpu().numpy(), r.double().cpu().numpy()):
            order = np.lexsort((trow, prow))  # by proj, ties by target
            np.testing.assert_array_equal(trow[order], rrow)


# ------------------------------------------------------------------------------- sort kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sort_segments_matches_float64_sort(dtype):
    layout = SegmentLayout.from_blocks(MIXED)
    x = strided(torch.randn(layout.total, device=DEVICE).to(dtype))
    out = ss.sort_segments_triton(x, layout, out=poisoned(layout))
    assert out.dtype == torch.float32 and out.shape == (layout.total,)
    # Sorting is exact: the float32 result equals the float64 sort of the same input values.
    torch.testing.assert_close(out.double(), sort_reference(x, layout), rtol=0, atol=0)


def test_sort_segments_special_values_and_fresh_output():
    layout = SegmentLayout.from_blocks([(2, 9), (1, 1)])
    x = torch.tensor(
        [3.0, -0.0, float("inf"), -1.5, 0.0, float("-inf"), 2.0, -7.0, 1e-40,
         5.0, 5.0, -5.0, 5.0, float("nan"), -5.0, 0.5, 0.5, 0.5,
         -2.0],
        device=DEVICE,
    )
    out = ss.sort_segments_triton(x, layout)
    expected = sort_reference(x, layout)
    # NaN sorts last like torch.sort; infinities, signed zeros and subnormals keep their order.
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0, equal_nan=True)


def test_sort_segments_long_segment_fallback():
    layout = SegmentLayout.from_blocks(MIXED)
    x = torch.randn(layout.total, device=DEVICE)
    plan = ss._plan(layout, DEVICE, 64)
    # 129 and 1000 exceed the forced limit: both runs go to sort_long_segments.
    assert {length for _, _, length in plan.long_runs} == {129, 1000}
    out = ss.sort_segments_triton(x, layout, out=poisoned(layout), max_block=64)
    torch.testing.assert_close(out.double(), sort_reference(x, layout), rtol=0, atol=0)


# ------------------------------------------------------------------------------ match kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_match_sorted_matches_float64_reference(dtype):
    layout = SegmentLayout.from_blocks(MIXED)
    proj = strided(torch.randn(layout.total, device=DEVICE).to(dtype))
    ref = strided(sorted_random(layout, dtype))
    out = ss.match_sorted_triton(proj, ref, layout, out=poisoned(layout))
    assert out.dtype == torch.float32
    expected = match_reference(proj, ref, layout)
    # Low-precision values tie (bf16 has 8 significant bits), and ties make the positions
    # ambiguous: every dtype must give the optimal cost and place the sorted reference along
    # the order of proj; where a segment has no ties the targets are unique and must be exact.
    torch.testing.assert_close(segment_costs(proj, out, layout), segment_costs(proj, expected, layout))
    assert_comonotone(proj, out, ref, layout)
    for p, o, e in zip(layout.views(proj), layout.views(out), layout.views(expected)):
        for prow, orow, erow in zip(p, o, e):
            if prow.unique().numel() == prow.numel():
                torch.testing.assert_close(orow.double(), erow, rtol=0, atol=0)


def test_match_sorted_with_ties_gives_the_optimal_cost():
    layout = SegmentLayout.from_blocks([(2, 129), (3, 3), (1, 1)])
    # Only four distinct values: many ties, so positions are ambiguous; compare costs and the
    # coupling's shape, never indices.
    proj = torch.randint(0, 4, (layout.total,), device=DEVICE).float()
    ref = sorted_random(layout, torch.float32)
    out = ss.match_sorted_triton(proj, ref, layout, out=poisoned(layout))
    assert not out.isnan().any()
    expected = match_reference(proj, ref, layout)
    torch.testing.assert_close(segment_costs(proj, out, layout), segment_costs(proj, expected, layout))
    sorted_cost = (sort_reference(proj, layout) - ref.double()).square()
    torch.testing.assert_close(
        segment_costs(proj, out, layout), torch.cat([v.sum(1) for v in layout.views(sorted_cost)])
    )
    assert_comonotone(proj, out, ref, layout)


def test_match_sorted_long_segment_fallback():
    layout = SegmentLayout.from_blocks(MIXED)
    proj = torch.randn(layout.total, device=DEVICE)
    ref = sorted_random(layout, torch.float32)
    out = ss.match_sorted_triton(proj, ref, layout, out=poisoned(layout), max_block=64)
    torch.testing.assert_close(out.double(), match_reference(proj, ref, layout), rtol=0, atol=0)


def test_match_sorted_nan_projection_is_not_silently_finite():
    layout = SegmentLayout.from_blocks([(2, 5)])
    proj = torch.randn(layout.total, device=DEVICE)
    proj[3] = float("nan")
    ref = sorted_random(layout, torch.float32)
    out = ss.match_sorted_triton(proj, ref, layout, out=poisoned(layout))
    # Every target is written (a permutation of the reference), and the cost is NaN.
    assert not out.isnan().any()
    torch.testing.assert_close(torch.sort(out.view(2, 5), dim=1).values, ref.view(2, 5), rtol=0, atol=0)
    assert segment_costs(proj, out, layout)[0].isnan()
    assert segment_costs(proj, out, layout)[1].isfinite()


# ------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("n,d", [(3, 1), (5, 7), (2, 576), (1, 7)])
def test_functional_triton_value_and_gradient_match_float64(n, d):
    w0 = torch.randn(n, d, device=DEVICE)
    w = (w0 + 0.3 * torch.randn(n, d, device=DEVICE)).requires_grad_(True)
    theta = random_projections(d, 5, device=DEVICE)
    value = sliced_wasserstein(w0, w, projections=theta, backend="triton")
    value.backward()
    w64 = w.detach().double().requires_grad_(True)
    expected = sliced_wasserstein_reference(w0.double(), w64, theta.double(), p=2)
    expected.backward()
    assert value.dtype == torch.float32
    rtol = projection_rtol(w0, w)
    assert relative_error(value, expected) < rtol
    assert relative_error(w.grad, w64.grad) < rtol


def test_functional_triton_general_p_and_one_dim_tensor():
    w0 = torch.randn(7, device=DEVICE)
    w = (w0 + 0.5).requires_grad_(True)
    theta = random_projections(7, 3, device=DEVICE)
    value = sliced_wasserstein(w0, w, projections=theta, p=1.5, backend="triton")
    value.backward()
    w64 = w.detach().double().requires_grad_(True)
    expected = sliced_wasserstein_reference(w0.double(), w64, theta.double(), p=1.5)
    expected.backward()
    rtol = projection_rtol(w0, w)
    assert relative_error(value, expected) < rtol
    assert relative_error(w.grad, w64.grad) < rtol


def test_functional_triton_nan_weights_give_nan():
    w0 = torch.randn(4, 7, device=DEVICE)
    w = w0 + 0.1
    w[2, 3] = float("nan")
    assert sliced_wasserstein(w0, w, n_projections=3, seed=0, backend="triton").isnan()


class _Tiny(torch.nn.Module):
    """Widths d = 1, 7 and 576, and a 1-D tensor (one row)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(4, 1))
        self.b = torch.nn.Parameter(torch.randn(3, 7))
        self.c = torch.nn.Parameter(torch.randn(2, 576))
        self.bias = torch.nn.Parameter(torch.randn(7))


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))


def test_regularizer_fixed_mode_triton_matches_float64_reference():
    model = _Tiny().to(DEVICE)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    reg = SlicedWassersteinRegularizer(
        model, n_projections=4, mode="fixed", seed=3, backend="triton",
        reference_dtype=torch.float32, cache_directions=True,
    )
    _perturb(model)
    value = reg()
    value.backward()
    # Oracle: the same directions (the regularizer's cached fixed set), float64 reference.
    total = torch.zeros((), dtype=torch.float64, device=DEVICE)
    leaves = {}
    for term, theta in zip(reg.terms, reg._theta):
        leaves[term.name] = term.param.detach().double().requires_grad_(True)
        total = total + sliced_wasserstein_reference(
            initial[term.name].double(), leaves[term.name], theta.double(), p=2
        )
    total.backward()
    rtol = {name: projection_rtol(initial[name], param) for name, param in model.named_parameters()}
    assert relative_error(value, total) < max(rtol.values())
    for name, param in model.named_parameters():
        assert relative_error(param.grad, leaves[name].grad) < rtol[name], name


@pytest.mark.parametrize("mode", ["resample", "refresh"])
def test_regularizer_triton_equals_torch_backend(mode):
    models, values = [], []
    for backend in ("triton", "torch"):
        torch.manual_seed(11)
        model = _Tiny().to(DEVICE)
        reg = SlicedWassersteinRegularizer(
            model, n_projections=3, mode=mode, refresh_every=2, seed=5, backend=backend,
            reference_dtype=torch.float32,
        )
        _perturb(model)
        calls = [reg() for _ in range(2)]
        sum(calls).backward()
        models.append(model)
        values.append(torch.stack(calls))
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    assert (values[0] > 0).all()
    for p_triton, p_torch in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p_triton.grad, p_torch.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    layout = SegmentLayout.from_blocks([(2, 3)])
    x = torch.randn(6, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be a flat buffer of shape \(6,\).*\(5,\)"):
        ss.sort_segments_triton(x[:5], layout)
    with pytest.raises(TypeError, match="x must be float32"):
        ss.sort_segments_triton(torch.arange(6, device=DEVICE), layout)
    with pytest.raises(TypeError, match="layout must be a SegmentLayout"):
        ss.sort_segments_triton(x, [(2, 3)])
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        ss.sort_segments_triton(x, layout, out=torch.empty(6, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="max_block"):
        ss.match_sorted_triton(x, x, layout, max_block=ss.MAX_BLOCK * 2)
    with pytest.raises(ValueError, match=r"sorted_ref must be a flat buffer"):
        ss.match_sorted_triton(x, x.view(2, 3), layout)


def test_cpu_tensors_without_interpreter_give_clear_error():
    script = (
        "import torch\n"
        "from snap_fast.ops.swd.layout import SegmentLayout\n"
        "from snap_fast.kernels.segmented_sort import sort_segments_triton\n"
        "try:\n"
        "    sort_segments_triton(torch.zeros(3), SegmentLayout.from_blocks([(1, 3)]))\n"
        "except ValueError as e:\n"
        "    print('ERROR:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR:" in result.stdout
    assert "device cpu" in result.stdout and "TRITON_INTERPRET=1" in result.stdout
