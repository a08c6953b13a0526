"""TOFU metrics: probability, ROUGE-L, truth ratio, forget quality and model utility.

Definitions follow TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs")
and its reference evaluation code (also used by open-unlearning). For a question q:

* ``P(a|q)^(1/|a|) = exp(-mean NLL of a's tokens)`` — the length-normalised probability
  (:func:`snap_fast.eval.metrics.answer_nll`).
* **Truth ratio** ``R = mean_{â ∈ perturbed} P(â|q)^(1/|â|) / P(ã|q)^(1/|ã|)``, ã the paraphrased
  answer (for real-authors / world-facts, which have no paraphrase, ã is the answer itself). The
  reference code averages the perturbed answers in log space (a geometric mean:
  ``exp(mean_â log P(â|q)^(1/|â|))``) and that is the default here (``perturbed_mean="geometric"``);
  the paper's formula writes the arithmetic mean (``perturbed_mean="arithmetic"``).
* **Truth-ratio score** of a split: forget split ``mean(min(R, 1/R))``; other splits
  ``mean(max(0, 1 - R))`` (higher = the model prefers the true answer).
* **Forget quality**: the p-value of the two-sample Kolmogorov–Smirnov test
  (``scipy.stats.ks_2samp``) between the forget-split R values of the unlearned model and of a
  retain model (never trained on the forget set). High = indistinguishable from the retain model.
* **Probability score**: forget / retain splits ``mean P(a|q)^(1/|a|)`` of the answer;
  real-authors / world-facts ``mean P(a)^(1/|a|) / (P(a)^(1/|a|) + Σ_â P(â)^(1/|â|))`` (the true
  answer's share among the options).
* **ROUGE score**: mean ROUGE-L recall (Porter stemmer, as TOFU) of the greedy answer against the
  answer.
* **Model utility**: harmonic mean of the nine numbers {probability, ROUGE, truth-ratio score} ×
  {retain, real_authors, world_facts}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from snap_fast.data.tofu import EVAL_SPLIT_FILES as SPLIT_FILES
from snap_fast.data.tofu import load_tofu_eval_split as load_tofu_split
from snap_fast.generation import generate_answers

from .metrics import answer_nll, rouge_l_recall

UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
def truth_ratios(
    paraphrased_nll: Sequence[float],
    perturbed_nll: Sequence[Sequence[float]],
    *,
    perturbed_mean: str = "geometric",
) -> np.ndarray:
    """Truth ratio R per question from length-normalised NLLs (mean NLL per token).

    Args:
        paraphrased_nll: ``(N,)`` mean NLL of the paraphrased (or true) answer.
        perturbed_nll: ``(N, K)`` mean NLL of each of K perturbed answers.
        perturbed_mean: ``"geometric"`` (TOFU's code) or ``"arithmetic"`` (the paper's formula)
            mean over the perturbed answers' normalised probabilities.

    Returns:
        ``(N,)`` float64 array ``R = mean_k P_pert / P_para``.
    """
    para = np.asarray(paraphrased_nll, dtype=np.float64)
    pert = np.asarray(perturbed_nll, dtype=np.float64)
    if para.ndim != 1 or pert.ndim != 2 or pert.shape[0] != para.shape[0] or pert.shape[1] == 0:
        raise ValueError(f"paraphrased_nll must be (N,) and perturbed_nll (N, K>0); got {para.shape}, {pert.shape}")
    if perturbed_mean == "geometric":
        log_pert = -pert.mean(axis=1)
    elif perturbed_mean == "arithmetic":
        log_pert = np.log(np.exp(-pert).mean(axis=1))
    else:
        raise ValueError(f"perturbed_mean must be 'geometric' or 'arithmetic', got {perturbed_mean!r}")
    return np.exp(log_pert + para)


def truth_ratio_score(ratios: Sequence[float], *, forget: bool) -> float:
    """Split-level truth-ratio score: ``mean(min(R, 1/R))`` on a forget split, else
    ``mean(max(0, 1 - R))``."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        raise ValueError("ratios is empty")
    if forget:
        return float(np.mean(np.minimum(r, 1.0 / r)))
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def forget_quality(unlearned_ratios: Sequence[float], retain_ratios: Sequence[float]) -> dict:
    """KS test between forget-split truth ratios of the unlearned and the retain model.

    Returns ``{"forget_quality": p-value, "ks_statistic": D}``.
    """
    a = np.asarray(unlearned_ratios, dtype=np.float64)
    b = np.asarray(retain_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("both truth-ratio samples must be non-empty")
    res = stats.ks_2samp(a, b)
    return {"forget_quality": float(res.pvalue), "ks_statistic": float(res.statistic)}


def model_utility(split_scores: Mapping[str, Mapping[str, float]]) -> float:
    """Harmonic mean of probability, ROUGE and truth-ratio scores over :data:`UTILITY_SPLITS`.

    ``split_scores[split]`` must hold ``"probability"``, ``"rougeL_recall"`` and
    ``"truth_ratio_score"``. A zero among them gives 0 (the harmonic mean's limit).
    """
    values = []
    for split in UTILITY_SPLITS:
        if split not in split_scores:
            raise ValueError(f"split_scores lacks split {split!r}")
        for key in ("probability", "rougeL_recall", "truth_ratio_score"):
            if key not in split_scores[split]:
                raise ValueError(f"split_scores[{split!r}] lacks {key!r}")
            values.append(float(split_scores[split][key]))
    if min(values) <= 0.0:
        return 0.0
    return float(stats.hmean(values))


def _split_nlls(model, tokenizer, records: Sequence[Mapping], split: str, batch_size: int,
                progress: bool) -> tuple[list[float], list[float], list[list[float]]]:
    """Mean NLL per token of the true, the paraphrased and every perturbed answer."""
    questions = [r["question"] for r in records]

    def mean_nll(prompts, answers, desc):
        return [s / max(n, 1) for s, n in answer_nll(model, tokenizer, prompts, answers,
                                                        batch_size=batch_size, progress=progress, desc=desc)]

    gt = mean_nll(questions, [r["answer"] for r in records], f"{split}: answer")
    # The paraphrase is the answer itself where a split has none (real_authors / world_facts).
    paraphrased = [r.get("paraphrased_answer") or r["answer"] for r in records]
    para = gt if all("paraphrased_answer" not in r for r in records) else mean_nll(
        questions, paraphrased, f"{split}: paraphrase")
    n_pert = [len(r["perturbed_answer"]) for r in records]
    flat_q = [q for q, k in zip(questions, n_pert) for _ in range(k)]
    flat = mean_nll(flat_q, [a for r in records for a in r["perturbed_answer"]], f"{split}: perturbed")
    pert, pos = [], 0
    for k in n_pert:
        pert.append(flat[pos : pos + k])
        pos += k
    return gt, para, pert


def evaluate_tofu_split(
    model,
    tokenizer,
    records: Sequence[Mapping],
    split: str,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    generate: bool = True,
    perturbed_mean: str = "geometric",
    progress: bool = False,
) -> tuple[list[dict], dict]:
    """TOFU metrics of ``model`` on one split.

    Args:
        records: from :func:`load_tofu_split`.
        split: split name; names starting with ``"forget"`` use the forget truth-ratio score;
            ``real_authors`` / ``world_facts`` use the option-normalised probability.
        generate: also generate greedy answers for the ROUGE score (the slow part).

    Returns:
        ``(samples, scores)``: per-question dicts (``answer_nll``, ``paraphrased_nll``,
        ``perturbed_nll``, ``truth_ratio``, ``probability``, and ``generated`` /
        ``rougeL_recall`` when generating) and the split's scores (``probability``,
        ``truth_ratio_score``, ``rougeL_recall`` when generating, ``n``).
    """
    if not records:
        raise ValueError("records is empty")
    questions = [r["question"] for r in records]
    if min(len(r["perturbed_answer"]) for r in records) == 0:
        raise ValueError("every record needs at least one perturbed answer")
    gt, para, pert = _split_nlls(model, tokenizer, records, split, batch_size, progress)
    # questions may have different numbers of perturbed answers, so ratios go row by row
    ratios = np.concatenate([
        truth_ratios([para[i]], [pert[i]], perturbed_mean=perturbed_mean) for i in range(len(records))
    ])
    forget = split.startswith("forget")
    if split in ("real_authors", "world_facts"):
        probs = [math.exp(-g) / (math.exp(-g) + sum(math.exp(-x) for x in p)) for g, p in zip(gt, pert)]
    else:
        probs = [math.exp(-g) for g in gt]
    samples = [
        {"question": q, "answer": r["answer"], "answer_nll": g, "paraphrased_nll": pa,
         "perturbed_nll": p, "truth_ratio": float(t), "probability": pr}
        for q, r, g, pa, p, t, pr in zip(questions, records, gt, para, pert, ratios, probs)
    ]
    scores = {
        "n": len(records),
        "probability": float(np.mean(probs)),
        "truth_ratio_score": truth_ratio_score(ratios, forget=forget),
    }
    if generate:
        answers = generate_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress)
        for s, a in zip(samples, answers):
            s["generated"] = a
            s["rougeL_recall"] = rouge_l_recall(a, s["answer"], use_stemmer=True)
        scores["rougeL_recall"] = float(np.mean([s["rougeL_recall"] for s in samples]))
    return samples, scores


def evaluate_tofu(
    model,
    tokenizer,
    folder: str | Path,
    *,
    forget_split: str = "forget01",
    retain_ratios: Sequence[float] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    perturbed_mean: str = "geometric",
    progress: bool = True,
) -> tuple[dict[str, list[dict]], dict]:
    """Full TOFU evaluation: the forget split and the three utility splits.

    Args:
        folder: a TOFU folder (e.g. ``shared/data/tofu``).
        forget_split: ``forget01`` | ``forget05`` | ``forget10``.
        retain_ratios: forget-split truth ratios of a retain model (e.g. the ``truth_ratio``
            values of that model's ``samples[forget_split]``); forget quality is computed when given.
        limit: first ``limit`` records of each split (quick runs).

    Returns:
        ``(samples_by_split, summary)``; ``summary`` has per-split scores, ``model_utility`` and,
        with ``retain_ratios``, ``forget_quality`` and ``ks_statistic``.
    """
    if not forget_split.startswith("forget") or forget_split not in SPLIT_FILES:
        raise ValueError(f"forget_split must be forget01, forget05 or forget10, got {forget_split!r}")
    samples: dict[str, list[dict]] = {}
    summary: dict = {"splits": {}, "perturbed_mean": perturbed_mean}
    for split in (forget_split, *UTILITY_SPLITS):
        recs = load_tofu_split(folder, split, limit=limit)
        samples[split], summary["splits"][split] = evaluate_tofu_split(
            model, tokenizer, recs, split, batch_size=batch_size, max_new_tokens=max_new_tokens,
            perturbed_mean=perturbed_mean, progress=progress)
    summary["model_utility"] = model_utility(summary["splits"])
    if retain_ratios is not None:
        summary.update(forget_quality([s["truth_ratio"] for s in samples[forget_split]], retain_ratios))
    return samples, summary
