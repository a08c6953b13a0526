"""Add SNAP's ``λ · SWD`` regularizer to an existing Hugging Face ``Trainer``.

Most unlearning code subclasses ``transformers.Trainer`` and overrides ``compute_loss``. Put the
mixin first in the bases and the regularizer is added on top of whatever that loss is::

    from snap_fast.train import SWDRegularizedTrainerMixin

    class MyUnlearningTrainer(SWDRegularizedTrainerMixin, MyTrainer):
        pass

    trainer = MyUnlearningTrainer(model=model, args=args, train_dataset=ds, swd_lambda=0.1)

or, with the stock Trainer, ``RegularizedTrainer(model=..., args=..., swd_lambda=0.1)``.

The regularizer is built from the model's weights when the trainer is constructed (so build the
trainer before training changes anything; for PEFT models the LoRA-aware path is used). It is
evaluated once per ``compute_loss`` call in training mode and scaled so that, after the
Trainer's gradient-accumulation normalisation, every optimizer step carries ``λ · SWD`` once
(averaged over its micro-batches). The last value is logged as ``swd_reg``.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from ..regularizer import SlicedWassersteinRegularizer

__all__ = ["RegularizedTrainer", "SWDRegularizedTrainerMixin"]


class SWDRegularizedTrainerMixin:
    """Mixin for ``transformers.Trainer`` subclasses: ``loss += λ · SWD(W0, W)``.

    Keyword args (taken before the rest go to the Trainer):
        swd_lambda: λ ≥ 0 (default 0.1, the authors' value); 0 disables the term.
        swd_regularizer: a ready :class:`~snap_fast.SlicedWassersteinRegularizer`; default: one
            built from the trainer's model with ``swd_kwargs``.
        swd_kwargs: keyword arguments for that regularizer (``n_projections``, ``mode``…).
    """

    def __init__(self, *args: Any, swd_lambda: float = 0.1,
                 swd_regularizer: SlicedWassersteinRegularizer | None = None,
                 swd_kwargs: dict | None = None, **kwargs: Any):
        if isinstance(swd_lambda, bool) or not isinstance(swd_lambda, (int, float)) or not swd_lambda >= 0:
            raise ValueError(f"swd_lambda must be a number >= 0, got {swd_lambda!r}")
        if swd_regularizer is not None and not isinstance(swd_regularizer, SlicedWassersteinRegularizer):
            raise TypeError(f"swd_regularizer must be a SlicedWassersteinRegularizer, got {type(swd_regularizer).__name__}")
        super().__init__(*args, **kwargs)
        self.swd_lambda = float(swd_lambda)
        # Built after Trainer.__init__ has moved the model to its device: the snapshot and the
        # directions then live where the weights do.
        if swd_regularizer is None and self.swd_lambda > 0:
            swd_regularizer = SlicedWassersteinRegularizer(self.model, **(swd_kwargs or {}))
        self.swd_regularizer = swd_regularizer
        self._swd_last: float | None = None

    def _swd_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors Trainer.training_step: a loss normalised over the whole accumulated batch is
        # not divided by the accumulation steps afterwards, so the regularizer must be.
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch, **kwargs)
        if not (model.training and self.swd_regularizer is not None and self.swd_lambda > 0):
            return out
        loss, outputs = out if return_outputs else (out, None)
        reg = self.swd_regularizer()
        self._swd_last = float(reg.detach())
        term = self.swd_lambda * reg
        if self._swd_loss_is_scaled_for_ga(num_items_in_batch):
            term = term / max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
        loss = loss + term.to(device=loss.device, dtype=loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._swd_last is not None and "loss" in logs:
            logs = {**logs, "swd_reg": self._swd_last}
        super().log(logs, *args, **kwargs)


class RegularizedTrainer(SWDRegularizedTrainerMixin, Trainer):
    """``transformers.Trainer`` with ``λ · SWD`` added to its loss (see the mixin)."""
