"""The regularizer's flat paths: one autograd node for all projections, a bf16 reference and a
cached LoRA base (W0 Θ) read by the C++ kernel as stored.

Checked against float64 oracles (dense materialised weights, ``sliced_wasserstein_reference``)
and, for the kernel inputs, against the float32 conversions the old code made explicitly.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from lora_models import dense_delta, factors_of, lora_layers, peft_model
from test_lora import check_against_oracle

from snap_fast import SlicedWassersteinRegularizer, sliced_wasserstein_reference
from snap_fast.ops.swd import cpp as _ext
from snap_fast.ops.swd.layout import SegmentLayout
from snap_fast.regularizer.terms import LoraTerm

L = 8
TOL = 1e-5
HAS_EXT = shutil.which("c++") is not None and os.environ.get(_ext.DISABLE_ENV, "0") in ("", "0")
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_EXT, reason="no C++ extension"))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-300))


@pytest.mark.skipif(not HAS_EXT, reason="no C++ extension")
@pytest.mark.parametrize("p", [2.0, 1.5])
def test_cpp_reads_bf16_reference_and_offset_like_their_float32_conversion(p):
    assert _ext.available(), _ext.unavailable_reason()
    gen = torch.Generator().manual_seed(0)
    layout = SegmentLayout.from_blocks([(3, 1), (2, 48), (2, 300), (2, 5000)])
    proj = torch.randn(layout.total, generator=gen)
    ref = torch.cat([torch.sort(v, dim=1).values.reshape(-1)
                     for v in layout.views(torch.randn(layout.total, generator=gen))]).to(torch.bfloat16)
    offset = torch.randn(layout.total, generator=gen).to(torch.bfloat16)
    for state_bf16, state_f32 in (({}, {}), ({}, {})):
        for _ in range(2):  # the second call reuses the kept permutations
            v16, g16 = _ext.swd_forward(proj, ref, layout, p=p, scale=0.5, state=state_bf16)
            v32, g32 = _ext.swd_forward(proj, ref.float(), layout, p=p, scale=0.5, state=state_f32)
            assert torch.equal(v16, v32) and torch.equal(g16, g32)
            proj = proj + 1e-3 * torch.randn(layout.total, generator=gen)
    assert torch.equal(_ext.match_sorted(proj, ref, layout), _ext.match_sorted(proj, ref.float(), layout))
    for off in (offset, offset.float()):
        # proj + offset formed inside the kernel: the same float32 sum as torch's
        v_in, g_in = _ext.swd_forward(proj, ref, layout, p=p, scale=0.5, offset=off)
        v_out, g_out = _ext.swd_forward(proj + off.float(), ref, layout, p=p, scale=0.5)
        assert torch.equal(v_in, v_out) and torch.equal(g_in, g_out)
    with pytest.raises(ValueError, match="offset"):
        _ext.swd_forward(proj, ref, layout, p=p, scale=0.5, offset=offset[:-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_flat_path_matches_float64_oracle_in_every_mode(backend, arch):
    # float32 caches: the flat path (offset added in the kernel, factor gradients from small
    # GEMMs) against the dense float64 oracle of tests/test_lora.py, across a refresh redraw.
    model = peft_model(arch, 4, True)
    for mode, calls in (("fixed", 2), ("refresh", 3), ("resample", 1)):
        reg = SlicedWassersteinRegularizer(
            model, n_projections=L, mode=mode, refresh_every=2, reference_dtype=torch.float32, backend=backend
        )
        assert reg._flat is not None and all(isinstance(t, LoraTerm) for t in reg.terms)
        for _ in range(calls):
            check_against_oracle(model, reg)
        # the W0 Θ caches are blocks of the one offset buffer, counted once
        if mode != "resample":
            assert reg._offset is not None
            theta = reg.last_directions()
            assert reg.cache_nbytes() == (
                reg._offset.numel() * 4 + reg._sorted_ref.numel() * 4 + sum(t.numel() * 4 for t in theta)
            )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fixed", "refresh"])
def test_lora_bf16_caches_value_and_grad_match_float64_of_the_caches(backend, mode):
    # Default bf16 caches: given the cached sorted reference and W0 Θ (rounded once, at pin
    # time), each call must equal the float64 SWD of (W0 Θ)_bf16 + s·U V Θ against them.
    model = peft_model("llama", 4, False)
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode=mode, refresh_every=2, backend=backend)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        value = reg()
        value.backward()
        theta = reg.last_directions()
        ref = reg._sorted_ref.double()
        total = torch.zeros((), dtype=torch.float64)
        leaves = []
        start = 0
        layers = dict(lora_layers(model))
        for term, th in zip(reg.terms, theta):
            block = slice(start, start + L * term.n)
            start += L * term.n
            # the cache is exactly the bf16 rounding of the float32 initial projection
            w0_theta = term.initial_projection(th).t()
            assert torch.equal(reg._offset[block].view(L, term.n), w0_theta.to(torch.bfloat16))
            module = layers[term.name.removesuffix(".base_layer.weight")]
            a_param, b_param = factors_of(module)
            a = a_param.detach().double().requires_grad_(True)
            b = b_param.detach().double().requires_grad_(True)
            leaves += [(a_param, a), (b_param, b)]
            delta = dense_delta(module, a, b, module.scaling["default"])
            proj = reg._offset[block].double().view(L, term.n) + (delta @ th.double()).t()
            total = total + (torch.sort(proj, dim=1).values - ref[block].view(L, term.n)).square().sum() / L
        total.backward()
        assert _rel(value, total) < TOL
        for param, leaf in leaves:
            assert _rel(param.grad, leaf.grad) < TOL
        opt.step()


class _Plain(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(37, 11, generator=g).to(dtype))
        self.bias = torch.nn.Parameter(torch.randn(11, generator=g).to(dtype))
        self.conv = torch.nn.Parameter(torch.randn(5, 3, 2, 2, generator=g).to(dtype))
        self.wide = torch.nn.Parameter(torch.randn(9, 11, generator=g).to(dtype))  # width shared with w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fixed", "refresh", "resample"])
def test_plain_flat_path_matches_float64_oracle(backend, mode):
    model = _Plain()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg = SlicedWassersteinRegularizer(
        model, n_projections=L, mode=mode, refresh_every=2, reference_dtype=torch.float32, backend=backend
    )
    assert reg._flat is not None and reg._offset is None
    # W = W0: the current projections are bitwise those of the initial weights, SWD is exactly 0
    assert reg().item() == 0.0
    reg.calls -= 1  # replay the first call's directions below
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        value = reg()
        value.backward()
        total = torch.zeros((), dtype=torch.float64)
        leaves = {}
        for (name, param), theta in zip(model.named_parameters(), reg.last_directions()):
            w = param.detach().double().requires_grad_(True)
            leaves[name] = w
            total = total + sliced_wasserstein_reference(initial[name].double(), w, theta.double(), p=2)
        total.backward()
        assert _rel(value, total) < TOL
        for name, param in model.named_parameters():
            assert param.grad.shape == param.shape
            assert _rel(param.grad, leaves[name].grad) < TOL, name
        opt.step()


@pytest.mark.skipif(not HAS_EXT, reason="no C++ extension")
def test_fused_calls_alive_together_keep_their_own_gradients():
    # The fused call lends its gradient buffer to the backward and gets it back after: graphs
    # kept alive together must not share one, and a retained graph must not read a buffer a
    # newer call has written.
    model = _Plain()
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="fixed", reference_dtype=torch.float32,
                                       backend="cpp")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reg().backward()
    single = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    first = reg()
    # the second call sees other weights, hence writes other gradients (.data: a plain term's
    # backward reads only its gradient buffer and Θ, so changing W under the graph is allowed here)
    for p in model.parameters():
        p.data.mul_(1.5)
    second = reg()
    for p in model.parameters():
        p.data.div_(1.5)
    first.backward()
    for got, want in zip(model.parameters(), single):
        assert _rel(got.grad, want) < TOL
    model.zero_grad(set_to_none=True)

    retained = reg()
    retained.backward(retain_graph=True)
    retained.backward(retain_graph=True)  # no newer call yet: still its own buffer
    for got, want in zip(model.parameters(), single):
        assert _rel(got.grad, 2 * want) < TOL
    second.backward()  # gives the second buffer back; the next call may take either
    reg().backward()
    reg().backward()
    with pytest.raises(RuntimeError, match="reused by a later call"):
        retained.backward()


@pytest.mark.skipif(not HAS_EXT, reason="no C++ extension")
def test_resample_redraws_into_kept_buffers_and_refuses_a_stale_backward():
    # resample on the fused path draws each call's directions into the same buffers: values and
    # gradients stay those of fresh buffers (the torch backend's draw), and the backward of a value
    # whose directions a later call redrew raises instead of using the new directions.
    model = _Plain()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    regs = {b: SlicedWassersteinRegularizer(model, n_projections=L, mode="resample", backend=b, seed=3)
            for b in ("cpp", "torch")}
    for _ in range(3):  # a training loop: call, backward, call, ...
        grads = {}
        for b, reg in regs.items():
            model.zero_grad(set_to_none=True)
            value = reg()
            value.backward()
            grads[b] = (value.detach(), [p.grad.clone() for p in model.parameters()])
        assert _rel(grads["cpp"][0], grads["torch"][0]) < TOL
        for got, want in zip(grads["cpp"][1], grads["torch"][1]):
            assert _rel(got, want) < TOL
    reg = regs["cpp"]
    first = reg()
    second = reg()
    second.backward()
    with pytest.raises(RuntimeError, match="redrawn by a later call"):
        first.backward()


@pytest.mark.skipif(not HAS_EXT, reason="no C++ extension")
def _value_and_backward(reg: SlicedWassersteinRegularizer, flag: str, on: bool) -> torch.Tensor:
    """``reg()`` and its backward with the C++ backend's capability ``flag`` set to ``on``."""
    from snap_fast.ops.backends import CppBackend

    try:
        setattr(CppBackend, flag, on)
        value = reg()
        value.backward()
    finally:
        setattr(CppBackend, flag, True)
    return value


def test_lora_kernel_writes_no_flat_buffer_and_matches_the_flat_path():
    # fixed/refresh on LoRA terms go through the backend's LoRA kernel (projections formed from
    # the factors inside it): the plan's flat work buffers stay unallocated, and value and factor
    # gradients agree with the flat path (GEMMs + swd_forward) that runs when the kernel is off.
    model = peft_model("llama", 4, True)  # B randomised: ΔW ≠ 0
    results = {}
    for fused in (True, False):
        reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="fixed", backend="cpp")
        value = _value_and_backward(reg, "lora_fused", fused)
        assert (reg._flat._buffers == {}) == fused
        params = [p for p in model.parameters() if p.requires_grad]
        results[fused] = (value.detach(), [p.grad.clone() for p in params])
        model.zero_grad(set_to_none=True)
    assert _rel(results[True][0], results[False][0]) < TOL
    for got, want in zip(results[True][1], results[False][1]):
        assert _rel(got, want) < TOL


@pytest.mark.skipif(not HAS_EXT, reason="no C++ extension")
@pytest.mark.parametrize("mode", ["fixed", "resample"])
def test_plain_kernel_runs_when_whole_weights_fill_the_threads_and_matches_the_flat_path(mode):
    # A model of plain weights goes through the backend's per-term kernel (projections formed
    # inside it: no flat projection buffer) when its largest weight holds at most 1/threads of
    # all values, else through the flat path; both give the same value and gradients.
    torch.manual_seed(0)
    balanced = torch.nn.Sequential(torch.nn.Linear(24, 20), torch.nn.Linear(20, 24), torch.nn.LayerNorm(24))
    dominated = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for model, spread in ((balanced, True), (dominated, False)):
            initial = [param.detach().clone() for param in model.parameters()]
            moved = [w + 0.05 * torch.randn(w.shape) for w in initial]  # W ≠ W0: non-zero gradients
            results = {}
            for kernel in (True, False):
                with torch.no_grad():
                    for param, w in zip(model.parameters(), initial):
                        param.copy_(w)
                reg = SlicedWassersteinRegularizer(model, n_projections=L, mode=mode, backend="cpp", seed=3)
                with torch.no_grad():
                    for param, w in zip(model.parameters(), moved):
                        param.copy_(w)
                value = _value_and_backward(reg, "plain_fused", kernel)
                assert reg._flat.terms_spread_over_threads() == spread
                assert ("proj" not in reg._flat._buffers) == (kernel and spread)
                results[kernel] = (value.detach(), [p.grad.clone() for p in model.parameters()])
                model.zero_grad(set_to_none=True)
            assert _rel(results[True][0], results[False][0]) < TOL
            for got, want in zip(results[True][1], results[False][1]):
                assert _rel(got, want) < TOL
        torch.set_num_threads(1)
        assert SlicedWassersteinRegularizer(dominated, n_projections=L, backend="cpp")._flat.terms_spread_over_threads()
    finally:
        torch.set_num_threads(previous)


def test_non_float32_parameters_use_the_per_term_path():
    model = _Plain(torch.float64)
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="fixed", reference_dtype=torch.float32, backend="torch")
    assert reg._flat is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    value = reg()
    value.backward()
    theta = reg._fixed_directions()
    assert torch.isfinite(value) and value > 0
    assert all(p.grad is not None for p in model.parameters())
    assert len(theta) == 4
