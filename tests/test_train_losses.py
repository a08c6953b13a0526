"""Loss functions against independent float64 computations."""

import math

import pytest
import torch

from snap_fast.train import losses
from snap_fast.train.methods import get_method
from snap_fast.train.terms import SetBatch


def _batch(seed=0, b=3, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding of a shorter row
    return logits, labels


def _loop_logprobs(logits, labels):
    """Per-sequence lists of log p(label_{t+1} | ≤ t), computed one token at a time."""
    out = []
    for b in range(labels.shape[0]):
        row = []
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y != -100:
                row.append(float(torch.log_softmax(logits[b, t], dim=-1)[y]))
        out.append(row)
    return out


def test_nll_is_masked_token_mean():
    logits, labels = _batch()
    rows = _loop_logprobs(logits, labels)
    expected = -sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    assert float(losses.nll(logits.float(), labels)) == pytest.approx(expected, rel=1e-5)
    assert float(losses.gradient_ascent_loss(logits.float(), labels)) == pytest.approx(-expected, rel=1e-5)


def test_sequence_logprob_sums_answer_tokens():
    logits, labels = _batch(1)
    expected = torch.tensor([sum(r) for r in _loop_logprobs(logits, labels)], dtype=torch.float64)
    got = losses.sequence_logprob(logits.float(), labels)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_nll_matches_hf_model_loss():
    """Same definition as Hugging Face's causal-LM loss (token mean over labels != -100)."""
    from tests.helpers import make_tiny_llama

    model, _ = make_tiny_llama()
    ids = torch.randint(0, 100, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, labels=labels)
    assert float(losses.nll(out.logits, labels)) == pytest.approx(float(out.loss), rel=1e-5)


def test_npo_loss_formula_and_reference_value():
    logp = torch.tensor([-3.0, -10.0, -1.5], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0, -12.0, -1.5], dtype=torch.float64)
    beta = 0.3
    got = losses.npo_loss(logp, ref, beta)
    expected = -(2 / beta) * sum(
        math.log(1 / (1 + math.exp(beta * (a - b)))) for a, b in zip(logp.tolist(), ref.tolist())
    ) / 3
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # At the reference model the loss is (2/β)·log 2 whatever the answers.
    assert float(losses.npo_loss(ref, ref, beta)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    got.backward()
    assert (logp.grad > 0).all()  # descending pushes log-probs of forget answers down


def test_grad_diff_and_combine():
    f_logits, f_labels = _batch(2)
    r_logits, r_labels = _batch(3)
    f_logits, r_logits = f_logits.float(), r_logits.float()
    expected = -losses.nll(f_logits, f_labels) + 0.5 * losses.nll(r_logits, r_labels)
    grad_diff = losses.combine(losses.gradient_ascent_loss(f_logits, f_labels), losses.nll(r_logits, r_labels),
                               alpha=0.5)
    assert float(grad_diff) == pytest.approx(float(expected))
    total = losses.combine(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), alpha=0.5,
                           reg=torch.tensor(10.0), lam=0.1)
    assert float(total) == pytest.approx(1 + 0.5 * 5 + 1.0)
    assert float(losses.combine(None, torch.tensor(2.0), None, alpha=2.0)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least one"):
        losses.combine(None)


def _forget_term(method: str, logits, labels, reference=None, beta=0.1):
    term = get_method(method).forget_term(beta)
    if reference is not None:
        term.reference = reference
    out = SetBatch("forget", {}, logits, labels, torch.arange(labels.shape[0]), None)
    return term(out)


def test_forget_loss_by_method():
    logits, labels = _batch(4)
    logits = logits.float()
    nll = float(losses.nll(logits, labels))
    assert float(_forget_term("snap", logits, labels)) == pytest.approx(nll)
    assert float(_forget_term("idk", logits, labels)) == pytest.approx(nll)
    assert float(_forget_term("ga", logits, labels)) == pytest.approx(-nll)
    ref = losses.sequence_logprob(logits, labels)
    assert float(_forget_term("npo", logits, labels, reference=ref, beta=0.1)) == pytest.approx(
        20 * math.log(2), rel=1e-5)
    with pytest.raises(RuntimeError, match="prepare"):
        _forget_term("snap-npo", logits, labels)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("dpo")


def test_step_terms_alternate_for_snap_npo():
    assert [get_method("snap-npo").sets(s, True) for s in range(4)] == [
        (True, False), (False, True), (True, False), (False, True)]
    assert get_method("snap-npo").sets(1, False) == (True, False)
    assert get_method("snap").sets(1, True) == (True, True)
    assert get_method("ga").sets(1, True) == (True, False)
    assert get_method("npo").sets(0, True) == (True, False)


def test_shape_errors():
    with pytest.raises(ValueError, match="logits must be"):
        losses.nll(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="beta"):
        losses.npo_loss(torch.zeros(2), torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        losses.npo_loss(torch.zeros(2), torch.zeros(3))


def test_kl_to_reference_matches_float64_loop():
    logits, labels = _batch(2)
    ref = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if int(labels[b, t + 1]) == -100:
                continue
            q, log_p = torch.softmax(ref[b, t], -1), torch.log_softmax(logits[b, t], -1)
            total += float((q * (torch.log(q) - log_p)).sum())  # KL(ref ‖ model)
            count += 1
    got = losses.kl_to_reference(logits.float(), ref.float(), labels)
    assert float(got) == pytest.approx(total / count, rel=1e-5)


def test_kl_to_reference_is_zero_with_zero_gradient_at_the_reference():
    logits, labels = _batch(3)
    x = logits.float().clone().requires_grad_(True)
    value = losses.kl_to_reference(x, logits.float(), labels)
    value.backward()
    assert abs(value.item()) < 1e-6 and x.grad.abs().max().item() < 1e-6
    # positions outside the answers do not count: changing them changes nothing
    moved = x.detach().clone()
    moved[:, :2] += 5.0  # predictions of labels 1..2, all prompt (-100)
    assert float(losses.kl_to_reference(moved, logits.float(), labels)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logits"):
        losses.kl_to_reference(x, logits.float()[:, :-1], labels)


def test_kl_from_precomputed_reference_rows_matches_the_float64_loop():
    """The recipe's cached path: per-example answer log-probabilities of the reference,
    concatenated in batch order, give the KL of the per-batch path (float64 loop as reference)."""
    logits, labels = _batch(4)
    ref = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows = torch.cat([losses.answer_logprobs(ref[b:b + 1].float(), labels[b:b + 1]) for b in range(3)])
    assert rows.shape == (int((labels[:, 1:] != -100).sum()), logits.shape[-1])
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if int(labels[b, t + 1]) != -100:
                q, log_p = torch.softmax(ref[b, t], -1), torch.log_softmax(logits[b, t], -1)
                total += float((q * (torch.log(q) - log_p)).sum())
                count += 1
    got = losses.kl_to_reference_logprobs(logits.float(), rows, labels)
    assert float(got) == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs must be"):
        losses.kl_to_reference_logprobs(logits.float(), rows[:-1], labels)
