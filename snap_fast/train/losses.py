"""Loss functions of SNAP and of the baselines: plain functions of logits and labels.

Every function takes the model's ``logits`` (B, T, V) and the collator's ``labels`` (B, T, long,
``-100`` on prompt tokens and padding); position t predicts label t+1 (the usual causal shift,
done here). Reductions are explicit:

* :func:`nll` — mean NLL over all answer tokens of the batch (masked token mean). With
  obliterated responses as labels it is SNAP's forget term; with the original model's answers
  to hard positives / general instructions it is the retain term.
* :func:`sequence_logprob` — Σ of answer-token log-probabilities per sequence, (B,): what NPO
  compares with the frozen reference model.
* :func:`kl_to_reference` — mean KL(original ‖ model) over answer tokens: the ``retain_loss="kl"``
  alternative to the retain NLL (zero, with zero gradient, until the model moves);
  :func:`kl_to_reference_logprobs` takes the original's log-probabilities precomputed
  (:func:`answer_logprobs`), as the recipe does when they fit in memory.
* :func:`gradient_ascent_loss`, :func:`npo_loss` — the baselines' forget terms.
* :func:`combine` — ``forget + α·(retain + general) + λ·reg``.

Which of them a method uses, and on which steps, is the method registry
(:mod:`snap_fast.train.methods`); the recipe calls them through the term objects of
:mod:`snap_fast.train.terms`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "answer_logprobs",
    "combine",
    "gradient_ascent_loss",
    "kl_to_reference",
    "kl_to_reference_logprobs",
    "nll",
    "npo_loss",
    "sequence_logprob",
    "token_nll",
]

IGNORE_INDEX = -100


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of the shifted labels and the mask of answer tokens.

    Args:
        logits: (B, T, V) float, any dtype (computed in float32).
        labels: (B, T) long, ``-100`` where no loss applies.

    Returns:
        ``(nll, mask)``, both (B, T-1) float32: NLL of label t+1 given positions ≤ t (0 where
        masked) and 1.0 on answer tokens.
    """
    _check(logits, labels)
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = (shift_labels != IGNORE_INDEX).float()
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(mask)
    return per_token, mask


def nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over every answer token of the batch (float32 0-dim; 0 if there are none).

    A batch-level token mean, as Hugging Face models compute their loss: long answers weigh
    more than short ones.
    """
    per_token, mask = token_nll(logits, labels)
    return per_token.sum() / mask.sum().clamp_min(1.0)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y | x) per sequence: Σ of answer-token log-probabilities, (B,) float32."""
    per_token, _ = token_nll(logits, labels)
    return -per_token.sum(dim=1)


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of KL(p_ref ‖ p_model) of the next-token distributions.

    The retain term of ``retain_loss="kl"``: where the NLL of the original answers keeps pushing
    the model to put all its mass on them (sharpening every retained distribution, which is a
    change of its own), this term is 0 with 0 gradient while the model still equals the
    original, and only pulls back what the forget term moved.

    Args:
        logits: (B, T, V) of the model being trained.
        ref_logits: (B, T, V) of the original model on the same batch (no gradient needed).
        labels: (B, T) long, ``-100`` outside the answers; selects the positions (shifted as in
            :func:`token_nll`), the label values themselves are not used.

    Returns:
        float32 0-dim tensor (0 if the batch has no answer tokens).
    """
    _check(logits, labels)
    if ref_logits.shape != logits.shape:
        raise ValueError(
            f"ref_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(ref_logits.shape)}"
        )
    mask = labels[:, 1:] != IGNORE_INDEX
    # Only answer positions: (N, V) rows, so the full (B, T, V) log-softmax is never formed twice.
    log_q = F.log_softmax(ref_logits[:, :-1][mask].detach().float(), dim=-1)
    return kl_to_reference_logprobs(logits, log_q, labels)


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at the answer positions, (N, V) float32.

    Row order is the batch's row-major order of answer tokens (sequence by sequence, left to
    right), N the number of answer tokens after the causal shift: what
    :func:`kl_to_reference_logprobs` takes as its reference.
    """
    _check(logits, labels)
    mask = labels[:, 1:] != IGNORE_INDEX
    return F.log_softmax(logits[:, :-1][mask].float(), dim=-1)


def kl_to_reference_logprobs(logits: torch.Tensor, ref_logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """:func:`kl_to_reference` with the original model's log-probabilities given directly.

    Args:
        logits: (B, T, V) of the model being trained.
        ref_logprobs: (N, V) log-probabilities of the original model at the N answer positions
            of ``labels``, in :func:`answer_logprobs` order (e.g. computed once before training
            and concatenated per example: with right padding an example's rows do not depend on
            the batch it is in).
        labels: (B, T) long, ``-100`` outside the answers.

    Returns:
        float32 0-dim tensor: mean over the N positions of KL(ref ‖ model) (0 if N = 0).
    """
    log_p = answer_logprobs(logits, labels)
    if ref_logprobs.shape != log_p.shape:
        raise ValueError(
            f"ref_logprobs must be (answer tokens, V) = {tuple(log_p.shape)} for these labels, "
            f"got {tuple(ref_logprobs.shape)}"
        )
    kl = F.kl_div(log_p, ref_logprobs.detach().float(), log_target=True, reduction="sum")
    return kl / max(log_p.shape[0], 1)


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget answers: −nll (minimising it raises their NLL)."""
    return -nll(logits, labels)


def npo_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al., 2024) on the forget answers.

    ``L = −(2/β) · mean_i log σ(−β · (log π_θ(y_i|x_i) − log π_ref(y_i|x_i)))``: 0 gradient once
    the model finds the forget answers much less likely than the reference did; equals
    (2/β)·log 2 when the model is still the reference.

    Args:
        logprob: (B,) sequence log-probabilities under the model being trained.
        ref_logprob: (B,) the same under the frozen original model (no gradient).
        beta: β > 0.
    """
    if logprob.shape != ref_logprob.shape or logprob.dim() != 1:
        raise ValueError(
            f"logprob and ref_logprob must both be (B,), got {tuple(logprob.shape)} and {tuple(ref_logprob.shape)}"
        )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    log_ratio = logprob.float() - ref_logprob.detach().float().to(logprob.device)
    return -F.logsigmoid(-beta * log_ratio).mean() * (2.0 / beta)


def combine(
    forget: torch.Tensor | None,
    retain: torch.Tensor | None = None,
    general: torch.Tensor | None = None,
    *,
    alpha: float = 1.0,
    reg: torch.Tensor | None = None,
    lam: float = 0.0,
) -> torch.Tensor:
    """``forget + α·(retain + general) + λ·reg``, skipping absent terms (at least one needed)."""
    parts = []
    if forget is not None:
        parts.append(forget)
    for term in (retain, general):
        if term is not None:
            parts.append(alpha * term)
    if reg is not None and lam > 0:
        parts.append(lam * reg)
    if not parts:
        raise ValueError("combine needs at least one loss term")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
