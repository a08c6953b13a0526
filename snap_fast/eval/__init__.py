"""Evaluation of unlearning: metrics, TOFU metrics, the report and the demo.

* :func:`evaluate_model` — a model on a data folder → per-sample JSONL + ``summary.json``.
* :mod:`.metrics` — ROUGE-L recall, answer probability, perplexity, fluency (gibberish flag).
* :mod:`.classifier` — the "I don't know" classifier and the leak check (obliteration).
* :mod:`.tofu_metrics` — TOFU truth ratio, forget quality (KS test), model utility.
* :func:`build_report` — ``report.md`` + self-contained ``report.html`` with figures.
"""

from .classifier import IgnoranceClassifier, ObliterationJudge, leaked_terms
from .evaluate import check_targets, evaluate_model, headline
from .metrics import (
    answer_probabilities,
    fluency_stats,
    is_gibberish,
    perplexity,
    rouge_l_recall,
)
from .report import build_report
from .tofu_metrics import (
    evaluate_tofu,
    forget_quality,
    model_utility,
    truth_ratio_score,
    truth_ratios,
)

__all__ = [
    "IgnoranceClassifier",
    "ObliterationJudge",
    "answer_probabilities",
    "build_report",
    "check_targets",
    "evaluate_model",
    "evaluate_tofu",
    "fluency_stats",
    "forget_quality",
    "headline",
    "is_gibberish",
    "leaked_terms",
    "model_utility",
    "perplexity",
    "rouge_l_recall",
    "truth_ratio_score",
    "truth_ratios",
]
