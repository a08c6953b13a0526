"""The L2-SP baseline regularizer against dense computations: plain tensors, LoRA factors, the
normalised form, gradients, state, and the recipe's --reg-kind l2sp."""

from __future__ import annotations

import pytest
import torch
from lora_models import dense_delta, factors_of, lora_layers, peft_model

from snap_fast.regularizer.l2sp import L2SPRegularizer
from tests.test_regularizer import Tiny, _perturb


def test_plain_tensors_value_and_gradient_equal_the_dense_distance():
    model = Tiny()
    initial = {k: v.detach().double().clone() for k, v in model.named_parameters() if v.requires_grad}
    reg = L2SPRegularizer(model)
    _perturb(model, 0)
    value = reg()
    value.backward()
    params = dict(model.named_parameters())
    want = sum(float((params[k].detach().double() - w0).square().sum()) for k, w0 in initial.items()
               if k != "head.weight")
    assert value.item() == pytest.approx(want, rel=1e-6)
    for name, w0 in initial.items():
        if name != "head.weight":  # tied to emb.weight: one tensor
            torch.testing.assert_close(params[name].grad.double(), 2 * (params[name].detach().double() - w0),
                                       rtol=1e-5, atol=1e-6)


def test_lora_factors_give_the_dense_delta_norm_without_forming_it():
    model = peft_model("llama", 4, False)
    reg = L2SPRegularizer(model)
    want = sum(float(dense_delta(m, *(f.detach().double() for f in factors_of(m)), float(m.scaling["default"]))
                     .square().sum()) for _, m in lora_layers(model))
    assert reg().item() == pytest.approx(want, rel=1e-5)
    assert reg.cache_nbytes() == sum(t.nbytes_kept() for t in reg.terms if not hasattr(t, "factors"))


def test_normalized_form_is_scale_free():
    # ‖cW − cW0‖² / ‖cW0‖² = ‖W − W0‖² / ‖W0‖²; the unnormalised form scales by c²
    c = 3.0
    base, scaled = Tiny(), Tiny()
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(c)
    norm = [L2SPRegularizer(m, normalize=True) for m in (base, scaled)]
    plain = [L2SPRegularizer(m) for m in (base, scaled)]
    _perturb(base, 0)
    with torch.no_grad():
        for a, b in zip(base.parameters(), scaled.parameters()):
            b.copy_(c * a)
    assert norm[1]().item() == pytest.approx(norm[0]().item(), rel=1e-5)
    assert plain[1]().item() == pytest.approx(c**2 * plain[0]().item(), rel=1e-5)


def test_state_resumes_and_refuses_a_foreign_state():
    model = Tiny()
    reg = L2SPRegularizer(model)
    state = reg.state_dict()
    _perturb(model, 0)
    fresh = L2SPRegularizer(model)  # snapshot of the moved weights: 0 until the state is loaded
    assert fresh().item() == 0.0
    fresh.load_state_dict(state)
    assert fresh().item() == reg().item() > 0
    with pytest.raises(ValueError, match="L2-SP"):
        fresh.load_state_dict({"mode": "fixed"})
    with pytest.raises(TypeError, match="normalize"):
        L2SPRegularizer(model, normalize=1)
