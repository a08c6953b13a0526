"""Training: the SNAP recipe (``unlearn``), its config, loss functions, checkpoints, and the
Hugging Face ``Trainer`` integration.

* :func:`unlearn` / :class:`UnlearnConfig` — what ``snap-fast unlearn`` runs
  (:class:`UnlearnRecipe`: ``setup()`` then ``train()``).
* :mod:`snap_fast.train.methods` / :mod:`snap_fast.train.terms` — the method registry and its
  loss terms.
* :mod:`snap_fast.train.losses` — plain loss functions for hand-written loops.
* :class:`SWDRegularizedTrainerMixin` / :class:`RegularizedTrainer` — add ``λ·SWD`` to any
  ``transformers.Trainer`` (imported lazily: importing this package does not import the Trainer).
"""

from __future__ import annotations

from . import losses
from .config import METHODS, UnlearnConfig
from .recipe import NonFiniteLossError, RunResult, UnlearnRecipe, unlearn

__all__ = [
    "METHODS",
    "NonFiniteLossError",
    "RegularizedTrainer",
    "RunResult",
    "SWDRegularizedTrainerMixin",
    "UnlearnConfig",
    "UnlearnRecipe",
    "losses",
    "unlearn",
]


def __getattr__(name: str):
    if name in ("SWDRegularizedTrainerMixin", "RegularizedTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
