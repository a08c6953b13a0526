"""The original model's greedy answers to every prompt of a data folder, cached per model on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..io import read_jsonl, write_jsonl
from .sets import FORGET_SETS

__all__ = ["OriginalsCache", "fill_original_answers"]


class OriginalsCache:
    """Original answers on disk, one JSONL per model identity under ``cache_dir``; keyed by the
    prompt and the generation length. Rewritten atomically after each batch of new answers."""

    def __init__(self, cache_dir: Path, model_id: str):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
        self.path = cache_dir / f"{safe}.jsonl"
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            for rec in read_jsonl(self.path):
                self.entries[rec["key"]] = rec

    @staticmethod
    def key(prompt: str, max_new_tokens: int) -> str:
        return hashlib.sha256(f"{max_new_tokens}\n{prompt}".encode()).hexdigest()[:32]

    def get(self, prompt: str, max_new_tokens: int) -> tuple[str, bool] | None:
        """``(answer, finished)``, or None when absent (entries written before the ``finished``
        flag existed count as absent: whether they were cut is unknown)."""
        rec = self.entries.get(self.key(prompt, max_new_tokens))
        return None if rec is None or "finished" not in rec else (rec["answer"], rec["finished"])

    def put_many(self, prompts: list[str], answers: list[str], finished: list[bool], max_new_tokens: int) -> None:
        for p, a, f in zip(prompts, answers, finished):
            k = self.key(p, max_new_tokens)
            self.entries[k] = {"key": k, "max_new_tokens": max_new_tokens, "prompt": p, "answer": a, "finished": f}
        write_jsonl(self.path, self.entries.values())


def fill_original_answers(
    sets: dict[str, list[dict[str, Any]]], model, tokenizer, *, model_id: str | None, cache_dir: Path | None,
    max_new_tokens: int, batch_size: int, seed: int, progress: bool,
) -> tuple[str, int, int]:
    """Set ``original_response`` (and ``original_truncated``) of every record; the response of
    every non-forget record becomes the original answer (hard positives keep them).

    Answers already in the cache are reused; the others are generated in batches and the cache
    is saved every few batches, so an interrupted run keeps what it paid for.

    Returns ``(model_id, generated, cached)``: the identity the cache is keyed by and how many
    answers were generated now or reused.
    """
    from ..generation import generate_answers

    if model_id is None:
        from ..models import model_identity

        model_id = model_identity(getattr(model.config, "_name_or_path", "") or "model", model)
    cache = OriginalsCache(Path(cache_dir) if cache_dir else _default_cache_dir(), model_id)
    prompts = list(dict.fromkeys(r["prompt"] for recs in sets.values() for r in recs))
    missing = [p for p in prompts if cache.get(p, max_new_tokens) is None]
    pending: tuple[list[str], list[str], list[bool]] = ([], [], [])

    def save(indices: list[int], answers: list[str], finished: list[bool], final: bool = False) -> None:
        pending[0].extend(missing[i] for i in indices)
        pending[1].extend(answers)
        pending[2].extend(finished)
        if pending[0] and (final or len(pending[0]) >= 4 * batch_size):
            cache.put_many(*pending, max_new_tokens)
            for part in pending:
                part.clear()

    if missing:
        generate_answers(model, tokenizer, missing, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         seed=seed, progress=progress, on_batch=save)
        save([], [], [], final=True)
    for name, recs in sets.items():
        for r in recs:
            r["original_response"], finished = cache.get(r["prompt"], max_new_tokens)
            # cut at max_new_tokens: trained on without an EOS after it (collator)
            r["original_truncated"] = not finished
            if name not in FORGET_SETS:
                r["response"] = r["original_response"]
    return model_id, len(missing), len(prompts) - len(missing)


def _default_cache_dir() -> Path:
    from ..models import cache_root

    return cache_root() / "originals"
