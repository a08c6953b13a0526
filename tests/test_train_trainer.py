"""λ·SWD added to a stock transformers.Trainer through the mixin."""

import pytest
import torch

from snap_fast import SlicedWassersteinRegularizer
from tests.helpers import make_tiny_llama
from tests.train_data import FORGET, OBLITERATED, RETAIN


def _examples():
    rows = [{"prompt": p, "response": OBLITERATED[i % 4]} for i, (p, _) in enumerate(FORGET)]
    return rows + [{"prompt": p, "response": a} for p, a in RETAIN]


def _trainer(tmp_path, model, tokenizer, **kwargs):
    from transformers import TrainingArguments

    from snap_fast.data.collator import ChatCollator
    from snap_fast.train import RegularizedTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
        gradient_accumulation_steps=2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, seed=0,
    )
    return RegularizedTrainer(model=model, args=args, train_dataset=_examples(),
                              data_collator=ChatCollator(tokenizer), **kwargs)


def _distance(model, initial):
    return sum(float((p.detach() - initial[n]).square().sum()) for n, p in model.named_parameters())


def test_trainer_weights_move_less_with_the_regularizer(tmp_path):
    moved = {}
    for lam in (0.0, 1000.0):
        model, tokenizer = make_tiny_llama()
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = _trainer(tmp_path / str(lam), model, tokenizer, swd_lambda=lam,
                           swd_kwargs={"n_projections": 16, "backend": "torch"})
        trainer.train()
        moved[lam] = _distance(model, initial)
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 8
        if lam > 0:
            assert all(h["swd_reg"] >= 0 for h in logged)
        else:
            assert trainer.swd_regularizer is None and "swd_reg" not in logged[0]
    assert moved[1000.0] < 0.5 * moved[0.0], moved


def test_compute_loss_adds_lambda_times_regularizer(tmp_path):
    from transformers import Trainer

    from snap_fast.data.collator import ChatCollator

    model, tokenizer = make_tiny_llama()
    reg = SlicedWassersteinRegularizer(model, n_projections=8, mode="fixed", seed=3, backend="torch",
                                       reference_dtype=torch.float32)
    trainer = _trainer(tmp_path, model, tokenizer, swd_lambda=0.25, swd_regularizer=reg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = ChatCollator(tokenizer)(_examples()[:3])
    model.train()
    expected_reg = float(reg())  # fixed directions: the same value at every call for these weights
    base = float(Trainer.compute_loss(trainer, model, dict(batch)))
    with_reg = float(trainer.compute_loss(model, dict(batch)))
    assert expected_reg > 0
    assert with_reg - base == pytest.approx(0.25 * expected_reg, rel=1e-4)
    # A loss normalised over the accumulated batch (num_items_in_batch given) is not divided by
    # the accumulation steps afterwards, so the regularizer share is divided here.
    n_items = int((batch["labels"] != -100).sum())
    trainer.current_gradient_accumulation_steps = 2
    base = float(Trainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=n_items))
    with_reg = float(trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items))
    scaled = trainer._swd_loss_is_scaled_for_ga(n_items)
    assert with_reg - base == pytest.approx(0.25 * expected_reg / (2 if scaled else 1), rel=1e-4)
    # Evaluation mode: no regularizer.
    model.eval()
    assert float(trainer.compute_loss(model, dict(batch))) == pytest.approx(
        float(Trainer.compute_loss(trainer, model, dict(batch))))


def test_bad_lambda():
    from snap_fast.train import RegularizedTrainer

    with pytest.raises(ValueError, match="swd_lambda"):
        RegularizedTrainer(model=None, swd_lambda=-1.0)
    with pytest.raises(TypeError, match="swd_regularizer"):
        RegularizedTrainer(model=None, swd_regularizer=object())
