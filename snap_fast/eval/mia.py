"""Membership inference: can an observer tell which questions were unlearned?

``snap-fast eval --attacks mia``. The members are the training forget questions, the
non-members the held-out forget questions (the same target, never trained on); the text scored
is each question's *original* answer (the knowledge), given the question, through the chat
template. Four scores per example, each larger for "more likely seen" (MUSE, open-unlearning):

* ``loss``: minus the mean token NLL of the answer;
* ``zlib``: minus the summed NLL over the zlib-compressed answer's length in bytes (NLL
  calibrated by how compressible the text is; Carlini et al. 2021);
* ``min_k``: the mean of the k % lowest token log-probabilities (Shi et al. 2024);
* ``min_k_plus_plus``: the same over token log-probabilities standardised by the model's own
  next-token distribution at that position, ``(log p(x_t) − μ_t) / σ_t`` with
  ``μ_t = E_{z~p}[log p(z)]`` and ``σ_t² = E[(log p(z))²] − μ_t²`` (Zhang et al. 2024).

The AUC of each score (members against non-members, ties counted half) is 0.5 when the two sets
look alike. For the original model both sets are equally unseen by training, so its AUC is the
control for how far the two sets differ by themselves; ``privacy_leak`` (MUSE's PrivLeak with
the original in place of a retrained model, which we do not have) is
``(AUC_unlearned − AUC_original) / AUC_original``: near 0 when the unlearning treated trained and
untrained questions alike, strongly negative when the trained ones stand out (their answers became
much less likely than the held-out ones': an observer can tell what was unlearned).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import check_int, check_number
from ..data.collator import IGNORE_INDEX, ChatCollator

__all__ = ["MIA_SCORES", "answer_token_stats", "auc", "membership_inference", "mia_scores", "privacy_leak"]

#: Score names, in report order.
MIA_SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus")


def answer_token_stats(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                       truncated: Sequence[bool] | None = None, batch_size: int = 8, max_length: int = 512,
                       progress: bool = False) -> list[dict]:
    """Per answer token: its log-probability and the mean / sd of log p over the model's
    next-token distribution at that position (for Min-K %++).

    Returns one dict per pair: ``{"logprob", "mu", "sigma"}``, float64 CPU tensors of shape
    ``(n_answer_tokens,)`` (EOS included, as :class:`ChatCollator` encodes it, except after an
    answer flagged in ``truncated``: cut at a generation cap).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"prompts and answers differ in length ({len(prompts)} != {len(answers)})")
    check_int("batch_size", batch_size, minimum=1)
    collator = ChatCollator(tokenizer, max_length=max_length)
    pairs = [{"prompt": p, "response": a, "truncated": bool(t)}
             for p, a, t in zip(prompts, answers, truncated or [False] * len(answers))]
    device = next(model.parameters()).device
    out: list[dict] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="MIA token statistics", disable=not progress):
        batch = collator(pairs[start:start + batch_size])
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        target = batch["labels"][:, 1:].to(device)
        mask = target != IGNORE_INDEX
        token = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = (p * (logp - mu.unsqueeze(-1)).square()).sum(-1).sqrt()  # centred: no cancellation
        for row in range(target.shape[0]):
            m = mask[row]
            out.append({k: v[row][m].double().cpu() for k, v in (("logprob", token), ("mu", mu), ("sigma", sigma))})
    return out


def mia_scores(stats: dict, text: str, k: float = 0.2) -> dict[str, float]:
    """The four membership scores of one answer (see the module docstring); ``k`` in (0, 1]."""
    lp, mu, sigma = stats["logprob"], stats["mu"], stats["sigma"]
    if lp.numel() == 0:
        raise ValueError("an answer with no tokens has no membership score")
    n_low = max(1, math.floor(k * lp.numel()))  # at least one token, as the reference implementations
    standardised = (lp - mu) / sigma.clamp_min(1e-12)
    return {
        "loss": float(lp.mean()),
        "zlib": float(lp.sum()) / len(zlib.compress(text.encode("utf-8"))),
        "min_k": float(lp.sort().values[:n_low].mean()),
        "min_k_plus_plus": float(standardised.sort().values[:n_low].mean()),
    }


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(score of a member > score of a non-member) + ½ P(tie): the ROC AUC of the score."""
    if not members or not nonmembers:
        raise ValueError("auc needs at least one member and one non-member score")
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(members, nonmembers).statistic) / (len(members) * len(nonmembers))


def privacy_leak(auc_model: float, auc_reference: float) -> float | None:
    """MUSE's PrivLeak with the original model as the reference: ``(AUC − AUC_ref) / AUC_ref``
    (None when the reference AUC is 0: the ratio is undefined)."""
    return (auc_model - auc_reference) / auc_reference if auc_reference > 0 else None


def membership_inference(model, tokenizer, data_dir: str | Path, *, k: float = 0.2, batch_size: int = 8,
                         max_length: int = 512, progress: bool = True, log=print) -> dict:
    """Score every training and held-out forget question's original answer under ``model``.

    Args:
        model, tokenizer: the model to attack (LoRA merged or not; it is not changed).
        data_dir: a data folder with ``original_response`` in ``forget.jsonl`` and
            ``heldout_forget.jsonl``.
        k: the share of lowest tokens of Min-K % and Min-K %++ (0 < k ≤ 1).

    Returns ``{"k", "n_members", "n_nonmembers", "auc": {score: AUC}, "mean": {score: {"members",
    "nonmembers"}}}``.

    Raises:
        ValueError: ``k`` outside (0, 1], or a set without original answers.
    """
    from ..io import read_jsonl

    check_number("k", k, positive=True)
    if k > 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    sets = {}
    for role, name in (("members", "forget"), ("nonmembers", "heldout_forget")):
        recs = [r for r in read_jsonl(Path(data_dir) / f"{name}.jsonl")
                if isinstance(r.get("original_response"), str) and r["original_response"].strip()]
        if not recs:
            raise ValueError(f"{data_dir}/{name}.jsonl has no record with an original_response to score")
        sets[role] = recs
    log(f"[attack mia] scoring {len(sets['members'])} trained and {len(sets['nonmembers'])} held-out forget answers")
    scores: dict[str, list[dict]] = {}
    for role, recs in sets.items():
        stats = answer_token_stats(model, tokenizer, [r["prompt"] for r in recs],
                                   [r["original_response"] for r in recs],
                                   truncated=[bool(r.get("original_truncated")) for r in recs], batch_size=batch_size,
                                   max_length=max_length, progress=progress)
        scores[role] = [mia_scores(s, r["original_response"], k) for s, r in zip(stats, recs)]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    return {
        "k": k, "n_members": len(sets["members"]), "n_nonmembers": len(sets["nonmembers"]),
        "auc": {key: auc([r[key] for r in scores["members"]], [r[key] for r in scores["nonmembers"]])
                for key in MIA_SCORES},
        "mean": {key: {"members": mean(scores["members"], key), "nonmembers": mean(scores["nonmembers"], key)}
                 for key in MIA_SCORES},
    }
