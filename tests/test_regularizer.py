"""The whole-model regularizer: values and gradients against the float64 reference, direction modes,
parameter selection, resuming, the initial-weight dtype, and bad input.

End-to-end tests run on every CPU backend available here (torch always; cpp when the extension
builds).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from snap_fast import MODES, SlicedWassersteinRegularizer, sliced_wasserstein_reference
from snap_fast.ops.swd.cpp import available as _cpp_available
from tests.helpers import projection_rtol, relative_error

BACKENDS = ["torch"] + (["cpp"] if _cpp_available() else [])
L = 7


class Tiny(torch.nn.Module):
    """Odd shapes: a tied embedding, a matrix, vectors, a 0-dim scalar and a frozen layer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(11, 6)
        self.lin = torch.nn.Linear(6, 9)
        self.norm = torch.nn.LayerNorm(9)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # tied: one tensor, regularized once
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        with torch.no_grad():  # LayerNorm starts at exactly 1 and 0: make rows distinct
            self.norm.weight.add_(0.1 * torch.randn(9))
            self.norm.bias.add_(0.1 * torch.randn(9))


UNIQUE = ["scale", "emb.weight", "lin.weight", "lin.bias", "norm.weight", "norm.bias"]


def _perturb(model: torch.nn.Module, step: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=g))


def _reference_sum(initial: dict[str, torch.Tensor], reg: SlicedWassersteinRegularizer, p: float):
    """Σ over the regularizer's terms of the float64 reference with the directions it just used;
    returns (value, {name: gradient})."""
    leaves = {t.name: t.param.detach().double().requires_grad_(True) for t in reg.terms}
    total = sum(
        sliced_wasserstein_reference(initial[t.name].double(), leaves[t.name], theta.double(), p)
        for t, theta in zip(reg.terms, reg.last_directions())
    )
    total.backward()
    return total.item(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [2.0, 1.5])
@pytest.mark.parametrize("normalize", [False, True])
def test_value_and_gradients_equal_sum_of_references(mode, backend, p, normalize):
    # normalize=True is the unnormalised regularizer on directions scaled per tensor so that
    # Σ_l Σ_k |W0 θ_l|_k^p = L: the same oracle on last_directions() checks it (and the sum below)
    model = Tiny()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    reg = SlicedWassersteinRegularizer(
        model, n_projections=L, p=p, mode=mode, refresh_every=2, reference_dtype=torch.float32, backend=backend,
        normalize=normalize,
    )
    assert reg.parameter_names == UNIQUE  # tied embedding once, frozen layer skipped
    for step in range(3):  # several calls: resample/refresh draw new directions along the way
        _perturb(model, step)
        model.zero_grad()
        value = reg()
        assert value.dtype == torch.float32 and value.dim() == 0 and value.requires_grad
        value.backward()
        expected, grads = _reference_sum(initial, reg, p)
        rtol = {name: projection_rtol(initial[name], param) for name, param in model.named_parameters()}
        assert value.item() == pytest.approx(expected, rel=max(rtol.values()))
        for name, param in model.named_parameters():
            if name in grads:
                assert relative_error(param.grad, grads[name]) < rtol[name], name
            elif param.requires_grad:
                assert name == "head.weight"  # tied alias, deduplicated by named_parameters
        assert model.frozen.weight.grad is None
        for term, theta in zip(reg.terms, reg.last_directions()) if normalize else ():
            w0 = initial[term.name].double().reshape(-1, term.d)
            assert (w0 @ theta.double()).abs().pow(p).sum().item() == pytest.approx(L, rel=1e-5), term.name


def test_every_parameter_gets_a_gradient():
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L)
    _perturb(model, 0)
    reg().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def _directions(reg):
    return [th.clone() for th in reg.last_directions()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_resample_draws_new_directions_every_call():
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="resample")
    _perturb(model, 0)
    seen = []
    values = []
    for _ in range(4):
        values.append(reg().item())
        seen.append(_directions(reg))
    for i in range(4):
        for j in range(i):
            # a d = 1 direction is ±1, so only wider terms can be told apart
            assert not any(torch.equal(x, y) for x, y in zip(seen[i], seen[j]) if x.shape[0] > 1)
    assert len(set(values)) == 4
    for th, term in zip(seen[0], reg.terms):
        assert th.shape == (term.d, L)
        torch.testing.assert_close(th.norm(dim=0), torch.ones(L), rtol=0, atol=1e-5)


@pytest.mark.parametrize("reference_dtype", [torch.bfloat16, torch.float32])
def test_refresh_directions_are_bf16_values_when_the_cache_is_bf16(reference_dtype):
    # the bf16 cache lets W0 Θ run as a bf16 GEMM, exact only for bf16-representable directions;
    # rounding a unit vector's components moves its norm by at most the relative rounding 2^-8
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="refresh", reference_dtype=reference_dtype)
    reg()
    for th in _directions(reg):
        if reference_dtype == torch.bfloat16:
            assert torch.equal(th, th.bfloat16().float())
            torch.testing.assert_close(th.norm(dim=0), torch.ones(L), rtol=0, atol=2.0**-8)
        else:
            torch.testing.assert_close(th.norm(dim=0), torch.ones(L), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_refresh_redraws_exactly_every_k_calls(k):
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="refresh", refresh_every=k)
    seen = []
    for step in range(3 * k + 1):
        _perturb(model, step, 0.01)
        reg()
        seen.append(_directions(reg))
    for i in range(1, len(seen)):
        assert _same(seen[i], seen[i - 1]) == (i % k != 0), f"call {i}"


@pytest.mark.parametrize("cache_directions", [True, False])
def test_fixed_keeps_directions_and_no_copy_of_initial_weights(cache_directions):
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="fixed", cache_directions=cache_directions)
    assert all(t.initial is None for t in reg.terms)
    seen = []
    for step in range(3):
        _perturb(model, step, 0.01)
        reg()
        seen.append(_directions(reg))
    assert _same(seen[0], seen[1]) and _same(seen[1], seen[2])
    # the cache is the sorted initial projections (n × L per tensor, bf16), plus d × L directions
    n_total = sum(t.n for t in reg.terms) * L
    theta_bytes = sum(t.d for t in reg.terms) * L * 4
    assert reg.cache_nbytes() == n_total * 2 + (theta_bytes if cache_directions else 0)
    # directions come from the seed alone: another regularizer with that seed uses the same ones
    other = SlicedWassersteinRegularizer(Tiny(), n_projections=L, mode="fixed", cache_directions=not cache_directions)
    other()
    assert _same(seen[0], other.last_directions())


def test_cache_sizes_by_mode():
    model = Tiny()
    weights = sum(t.n * t.d for t in SlicedWassersteinRegularizer(model, n_projections=L).terms)
    resample = SlicedWassersteinRegularizer(model, n_projections=L, mode="resample")
    assert resample.cache_nbytes() == weights * 2  # a bf16 copy of W0, nothing else
    resample32 = SlicedWassersteinRegularizer(model, n_projections=L, reference_dtype=torch.float32)
    assert resample32.cache_nbytes() == weights * 4


def test_tied_parameters_counted_once():
    model = Tiny()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    reg = SlicedWassersteinRegularizer(model, n_projections=L, reference_dtype=torch.float32)
    assert sum(t.param is model.emb.weight for t in reg.terms) == 1
    _perturb(model, 0)
    value = reg().item()
    assert value == pytest.approx(_reference_sum(initial, reg, 2.0)[0], rel=1e-4)


def test_param_filter_selects_parameters():
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, param_filter=lambda name, p: name.startswith("lin."))
    assert reg.parameter_names == ["lin.weight", "lin.bias"]
    _perturb(model, 0)
    reg().backward()
    assert model.lin.weight.grad is not None and model.emb.weight.grad is None and model.scale.grad is None
    only_matrices = SlicedWassersteinRegularizer(model, param_filter=lambda name, p: p.dim() == 2)
    assert only_matrices.parameter_names == ["emb.weight", "lin.weight"]


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_resumes_the_identical_sequence(mode):
    """Resume from a checkpoint: the regularizer is rebuilt from the *trained* model and must still
    measure against the original W0, with the same directions as an uninterrupted run."""

    def make(model):
        return SlicedWassersteinRegularizer(model, n_projections=L, mode=mode, refresh_every=2, seed=5)

    model = Tiny()
    reg = make(model)
    uninterrupted = []
    for step in range(6):
        _perturb(model, step, 0.05)
        uninterrupted.append(reg().item())

    model = Tiny()
    reg = make(model)
    for step in range(3):
        _perturb(model, step, 0.05)
        reg()
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)  # the trained weights, as loaded from a checkpoint
    resumed = make(resumed_model)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    values = []
    for step in range(3, 6):
        _perturb(resumed_model, step, 0.05)
        values.append(resumed().item())
    assert values == uninterrupted[3:]


def test_load_state_dict_rejects_a_foreign_state():
    reg = SlicedWassersteinRegularizer(Tiny(), n_projections=L, mode="fixed")
    with pytest.raises(ValueError, match="mode 'fixed'"):
        SlicedWassersteinRegularizer(Tiny(), n_projections=L).load_state_dict(reg.state_dict())
    small = SlicedWassersteinRegularizer(Tiny(), n_projections=L, mode="fixed", param_filter=lambda n, p: "lin" in n)
    with pytest.raises(ValueError, match="parameters"):
        small.load_state_dict(reg.state_dict())


@pytest.mark.parametrize("mode", MODES)
def test_reference_dtype_float32_is_exact_and_bf16_is_bounded(mode):
    model = Tiny()
    exact = SlicedWassersteinRegularizer(model, n_projections=L, mode=mode, reference_dtype=torch.float32)
    assert exact().item() == 0.0  # W = W0: every segment matches itself
    rounded = SlicedWassersteinRegularizer(model, n_projections=L, mode=mode)  # bf16 default
    value = rounded().item()
    if mode == "fixed":
        # fixed mode rounds the cached sorted projections s to bf16: value = Σ |s − bf16(s)|² / L
        expected = 0.0
        for t, theta in zip(rounded.terms, rounded.last_directions()):
            s = torch.sort(t.param.detach().reshape(t.n, t.d).double() @ theta.double(), dim=0).values
            expected += ((s - s.to(torch.bfloat16).double()) ** 2).sum().item() / L
        assert value == pytest.approx(expected, rel=1e-2, abs=1e-9)
    else:
        # the W0 copy is rounded: |⟨Δrow, θ⟩| ≤ ‖Δrow‖ for unit θ bounds the value by ‖W − bf16(W)‖²
        bound = sum(((t.param.detach() - t.param.detach().to(torch.bfloat16).float()) ** 2).sum().item() for t in rounded.terms)
        assert 0.0 < value <= bound * (1 + 1e-5)
    assert rounded.cache_nbytes() < exact.cache_nbytes()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_give_a_non_finite_value(mode, bad):
    """Documented: a NaN/inf weight makes the regularizer non-finite (the loss then shows it)."""
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode=mode)
    with torch.no_grad():
        model.lin.weight[2, 3] = bad
    assert not torch.isfinite(reg())


# ----------------------------------------------------------------- bad input


def _frozen_model():
    model = Tiny()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(model=torch.randn(3, 3)), TypeError, r"model must be a torch.nn.Module, got Tensor"),
        (dict(model=_frozen_model()), ValueError, r"model has no trainable parameters"),
        (dict(param_filter=lambda n, p: False), ValueError, r"param_filter selected no parameter"),
        (dict(param_filter="lin"), TypeError, r"param_filter must be callable"),
        (dict(mode="random"), ValueError, r"unknown mode 'random'; valid: resample"),
        (dict(refresh_every=0), ValueError, r"refresh_every must be >= 1, got 0"),
        (dict(refresh_every=2.5), TypeError, r"refresh_every must be an int"),
        (dict(refresh_every=True), TypeError, r"refresh_every must be an int"),
        (dict(n_projections=0), ValueError, r"n_projections must be >= 1"),
        (dict(n_projections=10.0), TypeError, r"n_projections must be an int"),
        (dict(p=0.0), ValueError, r"p must be > 0"),
        (dict(p=-2), ValueError, r"p must be > 0"),
        (dict(reference_dtype=torch.int8), TypeError, r"reference_dtype"),
        (dict(reference_dtype="bf16"), TypeError, r"reference_dtype"),
        (dict(seed=1.5), TypeError, r"seed must be an int"),
        (dict(backend="gpu"), ValueError, r"backend='gpu'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, pattern):
    kwargs.setdefault("model", Tiny())
    with pytest.raises(exc, match=pattern):
        SlicedWassersteinRegularizer(**kwargs)


def test_model_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="no trainable parameters"):
        SlicedWassersteinRegularizer(torch.nn.ReLU())


def test_empty_parameter_is_rejected():
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.empty(0, 4))
    with pytest.raises(ValueError, match=r"'weight' is empty"):
        SlicedWassersteinRegularizer(model)


def test_bad_environment_backend(monkeypatch):
    monkeypatch.setenv("SNAP_FAST_BACKEND", "fortran")
    with pytest.raises(ValueError, match="SNAP_FAST_BACKEND='fortran'"):
        SlicedWassersteinRegularizer(Tiny())
    monkeypatch.setenv("SNAP_FAST_BACKEND", "torch")
    assert SlicedWassersteinRegularizer(Tiny()).backend == "torch"


def test_last_directions_before_any_call():
    with pytest.raises(RuntimeError, match="at least one call"):
        SlicedWassersteinRegularizer(Tiny()).last_directions()


# ----------------------------------------------------------------- low-precision weights
# Bound: projections are accumulated and kept in float32, so what remains is the weights' own
# rounding (identical in the oracle, which reads the same stored values) and the cast of the
# gradient back to the weights' dtype: at most one unit roundoff per element, 2^-8 for bfloat16
# and 2^-11 for float16, i.e. 0.4 % and 0.05 % norm-wise. 2 % leaves a 5x margin; rounding the
# projections to bfloat16 instead gives tens of percent (the differences of sorted projections
# are ‖W − W0‖ / ‖W‖ times smaller than the projections).
LOW_PRECISION_BOUND = 0.02


@pytest.mark.parametrize("dtype, shape", [(torch.bfloat16, (257, 576)), (torch.float16, (96, 40))])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_weights_lose_only_their_own_rounding(dtype, shape, backend):
    from snap_fast import random_projections, sliced_wasserstein

    g = torch.Generator().manual_seed(3)
    w0 = (0.02 * torch.randn(shape, generator=g)).to(dtype)
    w = (w0.float() + 0.002 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    theta = random_projections(shape[1], 16, generator=g)
    w64 = w.detach().double().requires_grad_()
    ref = sliced_wasserstein_reference(w0.double(), w64, theta.double())
    ref.backward()
    got = sliced_wasserstein(w0, w, projections=theta, backend=backend)
    got.backward()
    assert abs(float(got) - float(ref)) / float(ref) < LOW_PRECISION_BOUND
    assert w.grad.dtype == dtype
    assert relative_error(w.grad, w64.grad) < LOW_PRECISION_BOUND

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(w0.clone())

    model = Model()
    reg = SlicedWassersteinRegularizer(model, n_projections=16, mode="resample", seed=1, backend=backend,
                                       reference_dtype=dtype)
    with torch.no_grad():
        model.weight.copy_(w.detach())
    value = reg()
    value.backward()
    (theta_used,) = reg.last_directions()
    w64 = w.detach().double().requires_grad_()
    ref = sliced_wasserstein_reference(w0.double(), w64, theta_used.double())
    ref.backward()
    assert abs(float(value) - float(ref)) / float(ref) < LOW_PRECISION_BOUND
    assert relative_error(model.weight.grad, w64.grad) < LOW_PRECISION_BOUND


@pytest.mark.parametrize("mode", ["fixed", "refresh"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_saved_state_gives_the_saved_values_in_a_fresh_regularizer_of_another_seed(mode, backend):
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode=mode, refresh_every=3, seed=0, backend=backend)
    reg()
    reg()
    buffer = io.BytesIO()
    torch.save(reg.state_dict(), buffer)
    with torch.no_grad():  # training moves the weights after the checkpoint
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = [reg().detach() for _ in range(4)]
    fresh = SlicedWassersteinRegularizer(model, n_projections=L, mode=mode, refresh_every=3, seed=7,
                                         backend=backend)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    got = [fresh().detach() for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), (got, expected)


def test_fixed_state_without_the_initial_projections_refuses_other_directions():
    reg = SlicedWassersteinRegularizer(Tiny(), n_projections=L, mode="fixed", seed=0)
    other = SlicedWassersteinRegularizer(Tiny(), n_projections=L, mode="fixed", seed=7)
    with pytest.raises(ValueError, match="seed=0"):
        other.load_state_dict(reg.state_dict(include_initial=False))


# ----------------------------------------------------------------- the scale-free form
def _scaled_copy(model: torch.nn.Module, c: float) -> torch.nn.Module:
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for param in scaled.parameters():
            param.mul_(c)
    return scaled


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [2.0, 1.5])
def test_normalized_form_is_invariant_to_scaling_w0_and_w_together(mode, backend, p):
    # SWD(cW0, cW) = c^p SWD(W0, W); divided by Σ|cW0 Θ|^p = c^p Σ|W0 Θ|^p the ratio is unchanged
    c = 7.3
    kwargs = {"n_projections": L, "p": p, "mode": mode, "refresh_every": 2, "seed": 4,
              "reference_dtype": torch.float32, "backend": backend}
    base = Tiny()
    scaled = _scaled_copy(base, c)
    regs = {name: (SlicedWassersteinRegularizer(m, normalize=True, **kwargs),
                   SlicedWassersteinRegularizer(m, **kwargs)) for name, m in (("base", base), ("scaled", scaled))}
    for step in range(3):
        _perturb(base, step)
        with torch.no_grad():
            for a, b in zip(base.parameters(), scaled.parameters()):
                b.copy_(c * a)
        (norm_base, plain_base), (norm_scaled, plain_scaled) = regs["base"], regs["scaled"]
        nb, ns = norm_base().item(), norm_scaled().item()
        assert ns == pytest.approx(nb, rel=1e-4)
        assert plain_scaled().item() == pytest.approx(c**p * plain_base().item(), rel=1e-4)
        assert nb > 0


@pytest.mark.parametrize("cache_directions", [True, False])
def test_normalized_fixed_state_resumes_bit_identically(cache_directions):
    model = Tiny()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="fixed", seed=2, normalize=True,
                                       reference_dtype=torch.float32, cache_directions=cache_directions)
    _perturb(model, 0)
    state = reg.state_dict()
    want = reg().item()
    other = SlicedWassersteinRegularizer(model, n_projections=L, mode="fixed", seed=9, normalize=True,
                                         reference_dtype=torch.float32, cache_directions=cache_directions)
    other.load_state_dict(state)
    assert other().item() == want
    plain = SlicedWassersteinRegularizer(model, n_projections=L, mode="fixed", seed=2)
    with pytest.raises(ValueError, match="normalize"):
        plain.load_state_dict(state)
    with pytest.raises(TypeError, match="normalize"):
        SlicedWassersteinRegularizer(model, normalize="yes")


def test_sharded_regularizer_refuses_the_normalized_form():
    from snap_fast.dist.regularizer import ShardedSlicedWassersteinRegularizer

    with pytest.raises(ValueError, match="normalize"):
        ShardedSlicedWassersteinRegularizer(Tiny(), normalize=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "d", "block_values"), [(1, 1, 4), (37, 5, 40), (300, 33, 33 * 7), (64, 96, 2**20)])
def test_blockwise_converted_projections_match_float64(monkeypatch, dtype, n, d, block_values):
    # resample re-projects the low-precision W0 copy every call, converting it a block of rows at
    # a time (last block short or a single block): every output must be the float32 dot product
    # of the stored values, within float32 rounding of a length-d sum.
    from snap_fast.regularizer import terms

    monkeypatch.setattr(terms, "CONVERT_BLOCK_VALUES", block_values)
    gen = torch.Generator().manual_seed(n + d)
    w0 = torch.randn(n, d, generator=gen).to(dtype)
    theta = torch.randn(d, 6, generator=gen)
    got = terms.converted_projections_t(theta, w0)
    expected = theta.double().t() @ w0.double().t()
    assert got.dtype == torch.float32 and got.shape == (6, n)
    # each entry: |error| ≤ d·u·Σ|θ_i w_i| (worst case); the Frobenius ratio stays far below it
    assert relative_error(got, expected) < d * torch.finfo(torch.float32).eps
