"""Loss terms as objects behind one small protocol: what one set's micro-batch contributes.

A term is built from the config, prepared once while the model is still the original one (NPO
and the KL retain term read the original model's outputs there), then called on every
micro-batch of its set with the model's logits. The method registry
(:mod:`snap_fast.train.methods`) says which forget term a method uses and whether it trains on
the retain and general sets; the regularizer ``λ·SWD`` is added once per step by the recipe.

=====================  ============================================================
:class:`ForgetNLL`     NLL of the obliterated "I don't know" responses (SNAP, IdK)
:class:`GradientAscent` −NLL of the original answers (GA, grad-diff)
:class:`NPO`           negative preference optimisation against the original model
:class:`RetainNLL`     NLL of the original model's answers (SNAP's hard positives)
:class:`RetainKL`      KL(original ‖ model) at those answers (``retain_loss="kl"``)
=====================  ============================================================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import losses, original

if TYPE_CHECKING:
    from .batches import UnlearnData
    from .config import UnlearnConfig
    from .runtime import Runtime

__all__ = ["NPO", "ForgetNLL", "GradientAscent", "LossTerm", "RetainKL", "RetainNLL", "SetBatch", "TermSetup"]


@dataclass
class TermSetup:
    """What a term may read while preparing: the model is still the original one."""

    model: torch.nn.Module
    collator: Any
    data: UnlearnData
    runtime: Runtime
    cfg: UnlearnConfig


@dataclass
class SetBatch:
    """One set's micro-batch after the forward pass.

    Attributes:
        name: ``"forget"``, ``"retain"`` or ``"general"``.
        batch: the collated tensors on the device (``input_ids``, ``attention_mask``).
        logits: (B, T', V) of the model being trained, T' the answer window (or T).
        labels: (B, T') labels aligned with ``logits``.
        indices: the examples' indices into their set.
        keep: the answer window T' when the LM head was trimmed, else None.
    """

    name: str
    batch: dict[str, torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor
    indices: Any
    keep: int | None


class LossTerm:
    """The protocol: ``prepare`` once before training, then call on every micro-batch."""

    def prepare(self, setup: TermSetup) -> None:
        """Read what the term needs from the original model (nothing by default)."""

    def __call__(self, out: SetBatch) -> torch.Tensor:
        raise NotImplementedError


class ForgetNLL(LossTerm):
    """NLL of the forget set's obliterated responses: SNAP's forget term (and IdK's)."""

    def __call__(self, out: SetBatch) -> torch.Tensor:
        return losses.nll(out.logits, out.labels)


class GradientAscent(LossTerm):
    """−NLL of the forget set's original answers."""

    def __call__(self, out: SetBatch) -> torch.Tensor:
        return losses.gradient_ascent_loss(out.logits, out.labels)


class NPO(LossTerm):
    """NPO on the forget answers against the original model's log-probabilities (β = npo_beta)."""

    def __init__(self, beta: float):
        self.beta = beta
        self.reference: torch.Tensor | None = None

    def prepare(self, setup: TermSetup) -> None:
        self.reference = original.original_forget_logprobs(
            setup.model, setup.collator, setup.data, setup.runtime, setup.cfg.batch_size
        )

    def __call__(self, out: SetBatch) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("NPO.prepare() must run before the first step")
        logprob = losses.sequence_logprob(out.logits, out.labels)
        return losses.npo_loss(logprob, self.reference[out.indices], self.beta)


class RetainNLL(LossTerm):
    """NLL of the original model's answers to hard positives or general instructions."""

    def __call__(self, out: SetBatch) -> torch.Tensor:
        return losses.nll(out.logits, out.labels)


class RetainKL(LossTerm):
    """KL(original ‖ model) at the answers of the retain and general sets.

    The original's log-probabilities are cached before training when they fit in
    ``reference_cache_gib``; otherwise each batch runs the original model: the base with the
    adapter disabled under LoRA, or a frozen copy made in :meth:`prepare` for full fine-tuning.
    One object serves both sets (the cache holds both).
    """

    def __init__(self) -> None:
        self.cached: dict[str, list[torch.Tensor]] | None = None
        self.model: torch.nn.Module | None = None
        self.frozen: torch.nn.Module | None = None

    def prepare(self, setup: TermSetup) -> None:
        if not (setup.data.retain or setup.data.general):
            return
        self.model = setup.model
        self.cached = original.original_answer_logprobs(
            setup.model, setup.collator, setup.data, setup.runtime, setup.data.retain_batch_size,
            setup.cfg.reference_cache_gib, setup.cfg.progress,
        )
        if self.cached is None and not setup.cfg.lora:
            self.frozen = copy.deepcopy(setup.model).eval().requires_grad_(False)

    def __call__(self, out: SetBatch) -> torch.Tensor:
        if self.cached is not None:
            ref = torch.cat([self.cached[out.name][i] for i in out.indices])
            return losses.kl_to_reference_logprobs(out.logits, ref.to(out.logits.device), out.labels)
        ref_logits = original.original_logits(self.model, self.frozen, out.batch, out.keep)
        return losses.kl_to_reference(out.logits, ref_logits, out.labels)
