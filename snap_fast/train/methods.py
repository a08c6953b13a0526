"""The method registry: every training method as its loss terms; a new method is one entry.

How the methods combine their terms (``λ·SWD`` is added once per step when λ > 0, to any
method; ``retain`` stands for the retain and the general set, each weighted by α)::

    snap       ForgetNLL(obliterated) + α·retain + λ·SWD           (λ = 0.1 in full fine-tuning)
    idk        snap with λ = 0 ("I don't know" fine-tuning)
    snap-npo   even steps: NPO(original answers); odd steps: α·retain; + λ·SWD every step  (λ as snap)
    ga         GradientAscent(original answers)
    grad-diff  GradientAscent(original answers) + α·retain
    npo        NPO(original answers)

``retain`` is :class:`~snap_fast.train.terms.RetainNLL` of the original model's answers, or
:class:`~snap_fast.train.terms.RetainKL` with ``retain_loss="kl"``.

Every method's λ defaults to 0 (``config.DEFAULT_LAM``: the regularizer was measured to change
nothing with the defaults), so ``snap`` and ``idk`` train the same loss unless ``lam`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .terms import NPO, ForgetNLL, GradientAscent, LossTerm, RetainKL, RetainNLL

__all__ = ["METHODS", "Method", "get_method", "retain_term"]


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        name: the registry name (``--method``).
        forget_term: builds the forget term from ``npo_beta``.
        forget_target: which response of a forget record it trains on: ``"response"`` (the
            obliterated one) or ``"original_response"`` (the knowledge GA and NPO push away from).
        trains_retain: has a retain (hard-positive and general) term.
        alternates: forget and retain terms on alternate steps (SNAP v3's ``snap-npo``).
    """

    name: str
    forget_term: Callable[[float], LossTerm]
    forget_target: str
    trains_retain: bool
    alternates: bool = False

    def sets(self, step: int, has_retain: bool) -> tuple[bool, bool]:
        """``(train_forget, train_retain)`` at optimizer step ``step`` (0-based).

        Without retain data every step is a forget step.
        """
        if not (self.trains_retain and has_retain):
            return True, False
        if self.alternates:
            return step % 2 == 0, step % 2 == 1
        return True, True


def _forget_nll(beta: float) -> LossTerm:
    return ForgetNLL()


def _gradient_ascent(beta: float) -> LossTerm:
    return GradientAscent()


_ENTRIES = (
    Method("snap", _forget_nll, "response", trains_retain=True),
    Method("snap-npo", NPO, "original_response", trains_retain=True, alternates=True),
    Method("ga", _gradient_ascent, "original_response", trains_retain=False),
    Method("grad-diff", _gradient_ascent, "original_response", trains_retain=True),
    Method("npo", NPO, "original_response", trains_retain=False),
    Method("idk", _forget_nll, "response", trains_retain=True),
)

#: Every method by name, in the order the CLI lists them.
METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES}


def get_method(name: str) -> Method:
    """The registered method ``name`` (ValueError listing the valid names)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}") from None


def retain_term(retain_loss: str) -> LossTerm:
    """The retain term for ``retain_loss`` (``"nll"`` or ``"kl"``), shared by both retain sets."""
    return RetainKL() if retain_loss == "kl" else RetainNLL()
