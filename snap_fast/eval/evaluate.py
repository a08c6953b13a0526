"""Evaluate one model on a data folder: per-sample JSONL + a summary JSON, with a metric cache.

Layout of the output folder (``out``)::

    generations.<set>.jsonl   {"id", "answer"} greedy answers            (cached)
    probability.<set>.jsonl   {"id", "sum_nll", "n_tokens", "probability"} of original_response (cached)
    perplexity.jsonl          {"id", "sum_nll", "n_tokens"} per heldout_text paragraph (cached)
    cache.json                {file name: fingerprint}; a file is reused only when its fingerprint
                              (model identity, data file hash, settings) matches
    samples.jsonl             one record per (set, question): every per-sample metric
    summary.json              per-set means, headline numbers, settings, timings

The expensive steps (generation, likelihoods) are cached; the cheap ones (ROUGE, the ignorance
classifier, the leak check, fluency) are recomputed from the cached answers every time, so
changing the classifier never needs a new generation.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from snap_fast.checks import check_int
from snap_fast.data.sets import FORGET_SETS, QA_SETS
from snap_fast.generation import DEFAULT_GEN_BATCH_SIZE, generate_answers
from snap_fast.io import read_jsonl, write_json, write_jsonl

from .classifier import ObliterationJudge
from .metrics import answer_nll, fluency_stats, rouge_l_recall, text_nll

ALL_SETS = QA_SETS
DEFAULT_SETS = ("heldout_forget", "forget", "heldout_retain", "heldout_general")


# ----------------------------------------------------------------------------------------- files
def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class _Cache:
    """Maps output file names to the fingerprint they were computed under (``cache.json``)."""

    def __init__(self, out: Path, force: bool):
        self.out, self.force = out, force
        self.path = out / "cache.json"
        self.table = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, name: str, fingerprint: str) -> list[dict] | None:
        f = self.out / name
        if self.force or self.table.get(name) != fingerprint or not f.is_file():
            return None
        return read_jsonl(f)

    def put(self, name: str, fingerprint: str, records: list[dict]) -> None:
        write_jsonl(self.out / name, records)
        self.table[name] = fingerprint
        write_json(self.path, self.table)


# ------------------------------------------------------------------------------------------ data
def load_data_folder(data_dir: str | Path, sets: Sequence[str]) -> tuple[dict, dict[str, list[dict]], dict]:
    """``(target, {set: records}, manifest)`` of a data folder written by ``snap-fast data``.

    Raises ``FileNotFoundError`` naming a missing file and ``ValueError`` for unknown sets or
    records without ``id`` / ``prompt``.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder not found: {data_dir}")
    unknown = [s for s in sets if s not in ALL_SETS]
    if unknown:
        raise ValueError(f"sets: unknown set(s) {unknown}; choose from {list(ALL_SETS)}")
    target_path = data_dir / "target.json"
    if not target_path.is_file():
        raise FileNotFoundError(f"{target_path} not found (is {data_dir} a `snap-fast data` folder?)")
    target = json.loads(target_path.read_text(encoding="utf-8"))
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    records = {}
    for s in sets:
        path = data_dir / f"{s}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        recs = read_jsonl(path)
        for i, r in enumerate(recs):
            if not isinstance(r.get("prompt"), str) or "id" not in r:
                raise ValueError(f"{path}: record {i + 1} lacks an 'id' or a 'prompt' string")
        records[s] = recs
    return target, records, manifest


def _mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


# ------------------------------------------------------------------------------------- evaluate
def evaluate_model(
    model,
    tokenizer,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    identity: str,
    sets: Sequence[str] = DEFAULT_SETS,
    limit: int | None = None,
    force: bool = False,
    batch_size: int = DEFAULT_GEN_BATCH_SIZE,
    max_new_tokens: int = 64,
    seed: int = 0,
    perplexity: bool = True,
    probability: bool = True,
    answers_from_data: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Evaluate ``model`` on the data folder and write ``samples.jsonl`` and ``summary.json``.

    Args:
        model, tokenizer: as returned by :func:`snap_fast.models.load_model` (adapter merged or not).
        data_dir: a ``snap-fast data`` folder.
        out_dir: where results and caches go (created).
        identity: a stable id of the model (``model_identity`` + adapter hash); part of every
            cache fingerprint, so a different model never reuses another's answers.
        sets: which QA sets to evaluate (see :data:`ALL_SETS`).
        limit: evaluate only the first ``limit`` records of each set and of heldout_text.
        force: recompute even when cached results match.
        batch_size, max_new_tokens, seed: generation settings (greedy, batched).
        perplexity: compute perplexity on ``heldout_text.jsonl`` (skipped if the file is absent).
        probability: compute the answer probability of ``original_response``.
        answers_from_data: use the records' ``original_response`` as the answers instead of
            generating. Only valid for the original model that wrote the data folder (its greedy
            answers are already there); refused when the manifest names another model.
        log: callable for one-line stage messages.

    Returns:
        the summary dict (also written to ``out_dir/summary.json``).
    """
    check_int("limit", limit, minimum=1, allow_none=True)
    if not isinstance(identity, str) or not identity:
        raise ValueError("identity must be a non-empty string (see snap_fast.models.model_identity)")
    check_int("batch_size", batch_size, minimum=1)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    data_dir, out = Path(data_dir), Path(out_dir)
    target, data, manifest = load_data_folder(data_dir, sets)
    if answers_from_data and manifest.get("model_identity") not in (None, identity):
        raise ValueError(
            f"answers_from_data: the data folder was built with {manifest['model_identity']}, not "
            f"{identity}; its original_response fields are another model's answers"
        )
    out.mkdir(parents=True, exist_ok=True)
    run = _EvalRun(model, tokenizer, identity, _Cache(out, force), batch_size, progress, log,
                   settings={"max_new_tokens": max_new_tokens, "seed": seed, "limit": limit})
    judge = ObliterationJudge.from_target(target)
    samples: list[dict] = []
    per_set: dict[str, dict] = {}
    for s in sets:
        recs = data[s][:limit] if limit else data[s]
        if not recs:
            continue
        data_hash = _file_hash(data_dir / f"{s}.jsonl")
        answers = _data_answers(s, recs) if answers_from_data else run.answers(s, recs, data_hash)
        probs = run.probabilities(s, recs, data_hash) if probability else [None] * len(recs)
        rows = [_sample_row(s, r, a, p, judge) for r, a, p in zip(recs, answers, probs)]
        samples.extend(rows)
        per_set[s] = _set_stats(s, rows)

    summary: dict = {"model": identity, "data": str(data_dir), "target": target.get("name"),
                     "answers_from_data": answers_from_data, "settings": run.settings, "sets": per_set}
    text_path = data_dir / "heldout_text.jsonl"
    if perplexity and text_path.is_file():
        summary.update(run.perplexity(text_path, limit))
    summary["headline"] = headline(summary)
    summary["timings_s"] = run.timings
    write_jsonl(out / "samples.jsonl", samples)
    write_json(out / "summary.json", summary)
    return summary


@dataclass
class _EvalRun:
    """The model-dependent, cached stages of one evaluation."""

    model: Any
    tokenizer: Any
    identity: str
    cache: _Cache
    batch_size: int
    progress: bool
    log: Any
    settings: dict
    timings: dict[str, float] = field(default_factory=dict)

    def _cached(self, name: str, fp: str, what: str, timing: str, compute, hit: str | None = None) -> list[dict]:
        """The cached rows of ``name`` when ``fp`` matches, else ``compute()`` (timed, logged, cached)."""
        cached = self.cache.get(name, fp)
        if cached is not None:
            if hit:
                self.log(hit)
            return cached
        self.log(f"[eval] {what}")
        t0 = time.perf_counter()
        cached = compute()
        self.timings[timing] = time.perf_counter() - t0
        self.cache.put(name, fp, cached)
        return cached

    def answers(self, s: str, recs: list[dict], data_hash: str) -> list[str]:
        """The model's greedy answers to a set's prompts (cached)."""
        name = f"generations.{s}.jsonl"
        fp = _fingerprint(kind="gen", model=self.identity, data=data_hash, **self.settings)

        def compute():
            gen = generate_answers(self.model, self.tokenizer, [r["prompt"] for r in recs],
                                   max_new_tokens=self.settings["max_new_tokens"], batch_size=self.batch_size,
                                   seed=self.settings["seed"], progress=self.progress)
            return [{"id": r["id"], "answer": a} for r, a in zip(recs, gen)]

        what = f"generating {len(recs)} answers for {s} (greedy, batch {self.batch_size})"
        cached = self._cached(name, fp, what, f"generate.{s}", compute, hit=f"[eval] {s}: answers cached ({name})")
        return [c["answer"] for c in cached]

    def probabilities(self, s: str, recs: list[dict], data_hash: str) -> list[float | None]:
        """The probability of each record's original answer (cached; None without one)."""
        probs: list[float | None] = [None] * len(recs)
        have_ref = [i for i, r in enumerate(recs)
                    if isinstance(r.get("original_response"), str) and r["original_response"].strip()]
        if not have_ref:
            return probs
        fp = _fingerprint(kind="prob", model=self.identity, data=data_hash, limit=self.settings["limit"])

        def compute():
            nll = answer_nll(self.model, self.tokenizer, [recs[i]["prompt"] for i in have_ref],
                             [recs[i]["original_response"] for i in have_ref],
                             truncated=[bool(recs[i].get("original_truncated")) for i in have_ref],
                             batch_size=self.batch_size, progress=self.progress, desc=f"P(original) {s}")
            return [{"id": recs[i]["id"], "sum_nll": sn, "n_tokens": n, "probability": math.exp(-sn / max(n, 1))}
                    for i, (sn, n) in zip(have_ref, nll)]

        cached = self._cached(f"probability.{s}.jsonl", fp, f"answer probability of the original answers on {s}",
                              f"probability.{s}", compute)
        for i, c in zip(have_ref, cached):
            probs[i] = c["probability"]
        return probs

    def perplexity(self, text_path: Path, limit: int | None) -> dict:
        """Perplexity on the held-out general text (cached): ``perplexity``, ``perplexity_tokens``."""
        texts = read_jsonl(text_path)[:limit] if limit else read_jsonl(text_path)
        fp = _fingerprint(kind="ppl", model=self.identity, data=_file_hash(text_path), limit=limit)

        def compute():
            nll = text_nll(self.model, self.tokenizer, [t["text"] for t in texts], batch_size=self.batch_size,
                           progress=self.progress)
            return [{"id": t.get("id", i), "sum_nll": sn, "n_tokens": n} for i, (t, (sn, n)) in enumerate(zip(texts, nll))]

        cached = self._cached("perplexity.jsonl", fp, f"perplexity on {len(texts)} held-out text paragraphs",
                              "perplexity", compute)
        tokens = sum(c["n_tokens"] for c in cached)
        if not tokens:
            return {}
        return {"perplexity": math.exp(sum(c["sum_nll"] for c in cached) / tokens), "perplexity_tokens": tokens}


def _data_answers(s: str, recs: list[dict]) -> list[str]:
    """The records' own original answers (the original model's, written by ``snap-fast data``)."""
    missing = [r["id"] for r in recs if not isinstance(r.get("original_response"), str)]
    if missing:
        raise ValueError(f"answers_from_data: {s} records without original_response: {missing[:5]}")
    return [r["original_response"] for r in recs]


def _sample_row(s: str, r: dict, answer: str, probability: float | None, judge: ObliterationJudge) -> dict:
    """One answer's per-sample metrics (cheap: recomputed every time)."""
    ref = r.get("original_response")
    row = {"set": s, "id": r["id"], "prompt": r["prompt"], "answer": answer, "original_response": ref,
           "kind": r.get("kind"), "source": r.get("source"),
           "rougeL_recall": rouge_l_recall(answer, ref) if isinstance(ref, str) else None,
           "probability": probability}
    verdict = judge.judge(r["prompt"], answer)
    row.update(ignorance=verdict["ignorance"], leaked=verdict["leaked"])
    if s in FORGET_SETS:
        row["obliterated"] = verdict["obliterated"]
    elif isinstance(ref, str):
        # a false refusal: "I don't know" to a request the original model answered
        row["false_refusal"] = verdict["ignorance"] and judge.classifier.matched_pattern(ref) is None
    flu = fluency_stats(answer)
    row["gibberish"] = flu["gibberish"]
    row["fluency"] = {k: v for k, v in flu.items() if k != "gibberish"}
    return row


def _set_stats(s: str, rows: list[dict]) -> dict:
    """A set's means of the per-sample metrics."""
    stats = {
        "n": len(rows),
        "rougeL_recall": _mean([x["rougeL_recall"] for x in rows]),
        "probability": _mean([x["probability"] for x in rows]),
        "ignorance_rate": _mean([float(x["ignorance"]) for x in rows]),
        "leak_rate": _mean([float(bool(x["leaked"])) for x in rows]),
        "gibberish_rate": _mean([float(x["gibberish"]) for x in rows]),
        "mean_answer_words": _mean([float(x["fluency"]["n_words"]) for x in rows]),
    }
    if s in FORGET_SETS:
        stats["obliteration_rate"] = _mean([float(x["obliterated"]) for x in rows])
    else:
        stats["false_refusal_rate"] = _mean([float(x["false_refusal"]) for x in rows if "false_refusal" in x])
    return stats


def headline(summary: Mapping) -> dict:
    """The numbers the quality targets are stated in (``None`` where not evaluated): obliteration
    rate on heldout_forget, ROUGE-L recall on heldout_retain, false-refusal rates on the held-out
    retain and general sets (the share of requests the original answered and this model refuses
    with "I don't know"), perplexity."""
    sets = summary.get("sets", {})
    return {
        "obliteration_rate": sets.get("heldout_forget", {}).get("obliteration_rate"),
        "forget_rougeL_recall": sets.get("heldout_forget", {}).get("rougeL_recall"),
        "retain_rougeL_recall": sets.get("heldout_retain", {}).get("rougeL_recall"),
        "general_rougeL_recall": sets.get("heldout_general", {}).get("rougeL_recall"),
        "retain_false_refusal_rate": sets.get("heldout_retain", {}).get("false_refusal_rate"),
        "general_false_refusal_rate": sets.get("heldout_general", {}).get("false_refusal_rate"),
        "perplexity": summary.get("perplexity"),
    }


# Quality targets of the demo: obliteration >= 90 %, hard-positive ROUGE-L recall >= 0.8,
# perplexity within +10 % of the original model, false refusals of unrelated requests <= 2 %.
TARGETS = {"obliteration_rate": 0.90, "retain_rougeL_recall": 0.80, "perplexity_increase": 0.10,
           "general_false_refusal_rate": 0.02}


def check_targets(original: Mapping, unlearned: Mapping) -> dict:
    """Which quality targets an unlearned model meets, given both summaries.

    Returns ``{name: {"value", "target", "met"}}`` for obliteration rate, retain ROUGE-L recall,
    the general false-refusal rate (where measured) and the relative perplexity increase over the
    original model.
    """
    h_u, h_o = headline(unlearned), headline(original)
    out = {}
    ob = h_u["obliteration_rate"]
    out["obliteration_rate"] = {"value": ob, "target": f">= {TARGETS['obliteration_rate']:.0%}",
                                "met": ob is not None and ob >= TARGETS["obliteration_rate"]}
    rr = h_u["retain_rougeL_recall"]
    out["retain_rougeL_recall"] = {"value": rr, "target": f">= {TARGETS['retain_rougeL_recall']}",
                                   "met": rr is not None and rr >= TARGETS["retain_rougeL_recall"]}
    fr = h_u["general_false_refusal_rate"]
    if fr is not None:
        out["general_false_refusal_rate"] = {"value": fr, "target": f"<= {TARGETS['general_false_refusal_rate']:.0%}",
                                             "met": fr <= TARGETS["general_false_refusal_rate"]}
    if h_u["perplexity"] is not None and h_o["perplexity"]:
        inc = h_u["perplexity"] / h_o["perplexity"] - 1.0
        out["perplexity_increase"] = {"value": inc, "target": f"<= +{TARGETS['perplexity_increase']:.0%}",
                                      "met": inc <= TARGETS["perplexity_increase"]}
    return out
