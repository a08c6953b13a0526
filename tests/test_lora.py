"""LoRA-aware regularizer: value and gradients against the float64 oracle on materialised weights.

For every adapted layer the oracle forms W0 + s·ΔW densely from PEFT's documented layouts
(tests/lora_models.py, not snap_fast.adapters) and runs snap_fast.sliced_wasserstein_reference with
the directions the regularizer used (``last_directions``); gradients of the oracle w.r.t. float64
copies of A and B are compared with the regularizer's gradients on PEFT's factors.
"""

from __future__ import annotations

import pytest
import torch
from lora_models import (
    dense_delta,
    expected_scaling,
    factors_of,
    lora_layers,
    peft_model,
)
from peft import LoraConfig, get_peft_model

from snap_fast import SlicedWassersteinRegularizer, sliced_wasserstein_reference
from snap_fast.regularizer.terms import LoraTerm, build_lora_terms
from tests.helpers import load_benchmark

L = 8
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-300))


def oracle(model, reg, initial_plain: dict[str, torch.Tensor]):
    """Float64 SWD summed over reg's terms with its last directions, and the gradients of every
    LoRA factor / plain parameter (keyed by id of the real parameter)."""
    names = {n: m for n, m in lora_layers(model)}
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    leaves: dict[int, torch.Tensor] = {}
    for term, theta in zip(reg.terms, reg.last_directions()):
        theta = theta.double()
        if isinstance(term, LoraTerm):
            module = names[term.name.removesuffix(".base_layer.weight")]
            a, b = factors_of(module)
            a64 = a.detach().double().requires_grad_(True)
            b64 = b.detach().double().requires_grad_(True)
            leaves[id(a)], leaves[id(b)] = a64, b64
            w0 = module.get_base_layer().weight.detach().double()
            w = w0 + dense_delta(module, a64, b64, expected_scaling(module))
        else:
            p = params[term.name]
            w = p.detach().double().requires_grad_(True)
            leaves[id(p)] = w
            w0 = initial_plain[term.name].double()
        total = total + sliced_wasserstein_reference(w0, w, theta, p=2)
    total.backward()
    return total, {k: v.grad for k, v in leaves.items()}


def check_against_oracle(model, reg, initial_plain=None):
    for p in model.parameters():
        p.grad = None
    value = reg()
    value.backward()
    ref, grads = oracle(model, reg, initial_plain or {})
    assert value.dtype == torch.float32
    assert ref > 0
    assert _rel(value, ref) < TOL, (value.item(), ref.item())
    by_id = {id(p): p for p in model.parameters()}
    assert grads
    for key, g_ref in grads.items():
        assert by_id[key].grad is not None
        assert _rel(by_id[key].grad, g_ref) < TOL
    # Gradients reach only trainable parameters: the frozen bases stay untouched.
    for name, module in lora_layers(model):
        assert module.get_base_layer().weight.grad is None, name
    return value


# Every rank on both architectures, each architecture with and without rslora.
@pytest.mark.parametrize(
    ("arch", "r", "rslora"),
    [("llama", 1, False), ("llama", 4, True), ("llama", 8, False), ("llama", 16, True),
     ("gpt2", 1, True), ("gpt2", 4, False), ("gpt2", 8, True), ("gpt2", 16, False)],
)
def test_value_and_grad_match_materialised(arch, r, rslora):
    model = peft_model(arch, r, rslora)
    for _, module in lora_layers(model):
        assert module.scaling["default"] == pytest.approx(expected_scaling(module))  # rslora read, not guessed
    for mode, calls in (("resample", 1), ("refresh", 3), ("fixed", 2)):  # refresh crosses a redraw
        reg = SlicedWassersteinRegularizer(
            model, n_projections=L, mode=mode, refresh_every=2, reference_dtype=torch.float32, backend="torch"
        )
        assert all(isinstance(t, LoraTerm) for t in reg.terms)
        assert len(reg.terms) == len(lora_layers(model))
        for _ in range(calls):
            check_against_oracle(model, reg)


def test_layouts_match_peft_delta_weight():
    # The oracle's layouts agree with PEFT's own get_delta_weight (Linear, Conv1D, Embedding).
    for arch in ("llama", "gpt2"):
        model = peft_model(arch, 4, False)
        kinds = set()
        for _, module in lora_layers(model):
            a, b = factors_of(module)
            ref = module.get_delta_weight("default")
            got = dense_delta(module, a, b, expected_scaling(module))
            assert got.shape == module.get_base_layer().weight.shape
            torch.testing.assert_close(got, ref)
            kinds.add((type(module).__name__, bool(getattr(module, "fan_in_fan_out", False))))
        assert len(kinds) == 2


@pytest.mark.parametrize("mode", ["fixed", "refresh"])
def test_cached_base_projection_after_optimizer_steps(mode):
    """Fixed / refresh modes cache W0Θ; the base weight is not read again until a redraw."""
    model = peft_model("llama", 4, False)
    reg = SlicedWassersteinRegularizer(
        model, n_projections=L, mode=mode, refresh_every=4, reference_dtype=torch.float32, backend="torch"
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 8))
    for _ in range(3):  # calls 1..3: before the first refresh redraw at call 4
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss + 0.1 * reg()
        loss.backward()
        opt.step()
    lora = [t for t in reg.terms if isinstance(t, LoraTerm)]
    assert reg.cache_nbytes() >= sum(t.n * L * 4 for t in lora)  # the pinned W0Θ, float32
    saved = {n: m.get_base_layer().weight.detach().clone() for n, m in lora_layers(model)}
    with torch.no_grad():  # poison the bases: a cached path never notices
        for _, m in lora_layers(model):
            m.get_base_layer().weight.fill_(float("nan"))
    value = reg()
    assert torch.isfinite(value)
    with torch.no_grad():
        for n, m in lora_layers(model):
            m.get_base_layer().weight.copy_(saved[n])
    for p in model.parameters():
        p.grad = None
    reg.calls -= 1  # replay the same call (same directions) against the oracle
    replay = check_against_oracle(model, reg)
    torch.testing.assert_close(replay.detach(), value.detach())


def test_refresh_resume_repins_base_projection():
    model = peft_model("gpt2", 4, True)
    kw = dict(n_projections=L, mode="refresh", refresh_every=3, reference_dtype=torch.float32, backend="torch")
    reg = SlicedWassersteinRegularizer(model, **kw)
    reg()
    reg()  # mid-period: directions and W0Θ pinned
    state = reg.state_dict()
    fresh = SlicedWassersteinRegularizer(model, **kw)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(), reg())


def test_mixed_adapted_and_plain_trainable_parameters():
    # lm_head fully trainable through modules_to_save, and a trainable norm: ordinary terms.
    model = peft_model("llama", 4, False, modules_to_save=["lm_head"])
    norm = model.base_model.model.model.norm.weight
    norm.requires_grad_(True)
    with torch.no_grad():
        norm.add_(0.3 * torch.randn_like(norm))  # must be regularized against its value at build
    reg = SlicedWassersteinRegularizer(model, n_projections=L, mode="resample", reference_dtype=torch.float32, backend="torch")
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    plain = [t.name for t in reg.terms if not isinstance(t, LoraTerm)]
    assert sorted(plain) == sorted(n for n in initial if "lora_" not in n)
    assert any("modules_to_save" in n for n in plain) and any(n.endswith("model.norm.weight") for n in plain)
    assert not any("lora_" in t.name for t in reg.terms)  # factors never regularized on their own
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(0.05 * torch.randn_like(p))
    check_against_oracle(model, reg, initial)


def test_param_filter_sees_base_weight_name():
    model = peft_model("llama", 2, False)
    seen = []
    reg = SlicedWassersteinRegularizer(
        model, n_projections=L, param_filter=lambda n, p: seen.append(n) or "q_proj" in n, backend="torch"
    )
    assert all(n.endswith(".base_layer.weight") for n in seen if "lora" not in n)
    assert [t.name for t in reg.terms] == [n for n in seen if "q_proj" in n]
    assert len(reg.terms) == 2


def test_no_lora_layers_is_plain_path():
    model = torch.nn.Linear(4, 3)
    assert build_lora_terms(model, None) == ([], set())


def _with_adapter_twist(**extra):
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),
        LoraConfig(r=2, target_modules=["0", "2"], **extra),
    )
    return model


def test_dora_is_refused_naming_module():
    model = _with_adapter_twist(use_dora=True)
    with pytest.raises(ValueError, match=r"base_model\.model\.0.*DoRA"):
        SlicedWassersteinRegularizer(model, n_projections=L, backend="torch")


def test_unsupported_layer_kind_is_refused_naming_module():
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()), LoraConfig(r=2, target_modules=["0"])
    )
    with pytest.raises(ValueError, match=r"base_model\.model\.0.*Conv2d.*not supported"):
        SlicedWassersteinRegularizer(model, n_projections=L, backend="torch")


def test_quantized_base_is_refused_naming_module():
    class FakeParams4bit(torch.nn.Parameter):
        pass

    model = _with_adapter_twist()
    base = model.base_model.model[2].base_layer
    base.weight = FakeParams4bit(base.weight.detach(), requires_grad=False)
    with pytest.raises(ValueError, match=r"base_model\.model\.2.*FakeParams4bit"):
        SlicedWassersteinRegularizer(model, n_projections=L, backend="torch")


def test_multiple_active_adapters_merged_and_trainable_base_are_refused():
    model = _with_adapter_twist()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0", "2"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"base_model\.model\.0.*2 active adapters"):
        SlicedWassersteinRegularizer(model, n_projections=L, backend="torch")

    model = _with_adapter_twist()
    model.base_model.model[0].merge()
    with pytest.raises(ValueError, match=r"base_model\.model\.0.*merged"):
        SlicedWassersteinRegularizer(model, n_projections=L, backend="torch")

    model = _with_adapter_twist()
    model.base_model.model[2].base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"base_model\.model\.2.*trainable"):
        SlicedWassersteinRegularizer(model, n_projections=L, backend="torch")


def test_inactive_adapter_layers_use_the_active_one():
    model = _with_adapter_twist()
    model.add_adapter("other", LoraConfig(r=3, target_modules=["2"]))
    model.set_adapter("other")  # layer 0 has no "other": its weight is the frozen base
    terms, covered = build_lora_terms(model, None)
    assert [t.name for t in terms] == ["base_model.model.2.base_layer.weight"]
    assert terms[0].factors.rank == 3
    layer = model.base_model.model[2]
    assert covered == {id(layer.base_layer.weight), id(layer.lora_A["other"].weight), id(layer.lora_B["other"].weight)}


def test_gpu_section_logic_on_tiny_cpu_model():
    """The GPU hook of benchmarks/bench_lora.py runs end to end on tiny CPU shapes."""
    bench = load_benchmark("bench_lora")
    text = bench.gpu_section(device="cpu", tiny=True, repeats=1)
    rows = [ln.split("|")[1:-1] for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| mode")]
    assert [r[0].split()[0] for r in rows] == ["resample", "refresh", "fixed"]
    for r in rows:
        assert float(r[1]) > 0 and float(r[2].rstrip(" %")) > 0
