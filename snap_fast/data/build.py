"""Build a SNAP data folder for one target: forget, hard-positive and held-out sets.

:func:`build_dataset` is the Python API behind ``snap-fast data``. It reads top to bottom:

1. forget candidates: built-in patterns x (name, aliases, description), an optional LLM
   generator (the model itself or an endpoint), an optional user JSONL; de-duplicated;
2. held-out forget questions: the held-out paraphrase patterns (and a share of the generated
   questions), never equal to a training question;
3. hard positives: neighbour entities (given, a built-in preset, or proposed by the generator
   and checked) asked through the same patterns; general instructions (built-in + user file);
4. the original model's greedy answers to every prompt (cached per model on disk);
5. atomic writes of every file; ``manifest.json`` last, so its presence marks a complete folder.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .generators import FilterStats, ModelGenerator, generate_questions, propose_neighbours
from .io import read_jsonl, write_json, write_jsonl
from .patterns import patterns_for
from .positives import GENERAL_INSTRUCTIONS, HELDOUT_TEXTS, load_instruction_file
from .responses import obliterated_response
from .target import TargetSpec, builtin_target, normalize

QA_SETS = ("forget", "retain", "general", "heldout_forget", "heldout_retain", "heldout_general")
SOURCES = ("pattern", "model", "endpoint", "user", "builtin")
_HELDOUT_GENERATED_SHARE = 0.2  # share of LLM-generated forget questions kept for evaluation


@dataclass
class DatasetSummary:
    """What :func:`build_dataset` wrote.

    Attributes:
        out_dir: the data folder.
        counts: records per set (``forget``, ``retain``, ..., ``heldout_text``).
        by_source / by_kind: per set, record counts by ``source`` / ``kind``.
        neighbours: the neighbour entities used, and ``neighbour_source`` where they came from
            ("spec": given in the target spec, "builtin": a preset, "model", "endpoint" or "none").
        originals_generated / originals_cached: original answers generated now / reused.
        generation_stats: how many generated questions were kept or dropped and why.
        examples: up to three records per set, for the printed summary.
        seconds: wall time of the build.
    """

    out_dir: Path
    counts: dict[str, int]
    by_source: dict[str, dict[str, int]]
    by_kind: dict[str, dict[str, int]]
    neighbours: list[str]
    neighbour_source: str
    originals_generated: int = 0
    originals_cached: int = 0
    generation_stats: dict[str, int] | None = None
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0

    def format(self) -> str:
        """A human-readable multi-line summary (the CLI prints it)."""
        lines = [f"data folder: {self.out_dir}  ({self.seconds:.1f} s)"]
        lines.append(f"{'set':<16} {'records':>7}  by source / by kind")
        for name, n in self.counts.items():
            src = ", ".join(f"{k} {v}" for k, v in sorted(self.by_source.get(name, {}).items()))
            kind = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.get(name, {}).items()))
            lines.append(f"{name:<16} {n:>7}  {src}" + (f" | {kind}" if kind else ""))
        lines.append(f"neighbours ({self.neighbour_source}): {', '.join(self.neighbours) or '-'}")
        lines.append(f"original answers: {self.originals_generated} generated, {self.originals_cached} from cache")
        if self.generation_stats:
            lines.append("generated questions: " + ", ".join(f"{k} {v}" for k, v in self.generation_stats.items()))
        for name, recs in self.examples.items():
            for r in recs:
                resp = (r.get("response") or "")[:100].replace("\n", " ")
                lines.append(f"  [{name}] {r['prompt'][:90]!r} -> {resp!r}")
        return "\n".join(lines)


def _record(prompt: str, kind: str, source: str, entity: str | None, response: str | None = None,
            name_used: str | None = None) -> dict[str, Any]:
    return {"prompt": prompt, "response": response, "original_response": None, "kind": kind,
            "source": source, "entity": entity, "_name": name_used}


def _interleave(records: list[dict[str, Any]], key: str, rng: random.Random,
                within: str | None = None) -> list[dict[str, Any]]:
    """Shuffle within groups (by ``key``) and deal round-robin, so any prefix is balanced across
    kinds or entities instead of dominated by the largest group; ``within`` balances each group
    the same way by a second key (e.g. kinds within each neighbour)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r[key], []).append(r)
    order = list(groups)
    rng.shuffle(order)
    for g in order:
        if within is None:
            rng.shuffle(groups[g])
        else:  # pop() below takes from the end: reverse so the balanced order comes first
            groups[g] = _interleave(groups[g], within, rng)[::-1]
    out = []
    while any(groups[g] for g in order):
        for g in order:
            if groups[g]:
                out.append(groups[g].pop())
    return out


def _dedupe(records: list[dict[str, Any]], seen: set[str]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        k = normalize(r["prompt"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def _pattern_questions(entity: str, forms: list[str], description: str | None, category: str | None,
                       heldout: bool, kind_prefix: str = "") -> list[dict[str, Any]]:
    out = []
    for p in patterns_for(category, heldout=heldout, indirect=description is not None):
        if p.indirect:
            out.append(_record(p.fill(entity, description), kind_prefix + p.kind, "pattern", entity))
        else:
            for form in forms:
                out.append(_record(p.fill(form), kind_prefix + p.kind, "pattern", entity, name_used=form))
    return out


def _read_user_forget(path: str | os.PathLike, target: TargetSpec) -> list[dict[str, Any]]:
    records = []
    for i, rec in enumerate(read_jsonl(path), start=1):
        prompt = rec.get("prompt", rec.get("question", rec.get("instruction")))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: record {i} has no 'prompt' (or 'question') string")
        response = rec.get("response")
        if response is not None and not isinstance(response, str):
            raise ValueError(f"{path}: record {i}: 'response' must be a string")
        records.append(_record(prompt.strip(), str(rec.get("kind", "user")), "user", target.name,
                               response=response, name_used=target.mentioned_in(prompt)))
    return records


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


def _check_count(name: str, value: int | None, allow_none: bool = False, minimum: int = 0) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def build_dataset(
    target: TargetSpec,
    out_dir: str | os.PathLike,
    *,
    model=None,
    tokenizer=None,
    model_id: str | None = None,
    generator: Any = "patterns",
    n_forget: int = 200,
    n_retain: int = 200,
    n_general: int | None = None,
    n_heldout_forget: int = 50,
    n_heldout_retain: int = 50,
    n_heldout_general: int = 10,
    n_neighbours: int = 8,
    user_forget: str | os.PathLike | None = None,
    general_file: str | os.PathLike | None = None,
    seed: int = 0,
    generate_originals: bool = True,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DatasetSummary:
    """Build the SNAP data folder for ``target`` (see the module docstring for the steps).

    Args:
        target: the :class:`TargetSpec`. Without neighbours, a built-in preset's neighbours are
            used when one exists for the name (e.g. "Harry Potter"); otherwise the generator
            (or, with ``generator="patterns"``, the model) proposes up to ``n_neighbours``.
        out_dir: the data folder. An existing non-empty folder is refused unless ``overwrite``.
        model, tokenizer: the model being unlearned (needed for original answers and for
            ``generator="self"``).
        model_id: its stable identity (``snap_fast.models.model_identity``), keying the
            originals cache and recorded in the manifest; derived from the config when None.
        generator: ``"patterns"`` (built-in patterns only), ``"self"`` (the model also writes
            questions) or an object with ``complete(prompts) -> answers`` and ``source``, such
            as :class:`snap_fast.data.generators.EndpointGenerator`.
        n_forget, n_retain: training forget / neighbour questions (at most; fewer if the
            candidates run out). User forget questions are always included.
        n_general: general instructions for training (None: all built-in ones not held out,
            plus every instruction of ``general_file``).
        n_heldout_forget, n_heldout_retain, n_heldout_general: held-out set sizes (at most).
        user_forget: a JSONL of extra forget questions (``prompt`` or ``question``; optional
            ``response`` and ``kind``).
        general_file: extra general instructions, Alpaca or ShareGPT format (JSON or JSONL).
        seed: fixes sampling and the choice of obliterated responses.
        generate_originals: generate the original model's greedy answers (needs the model);
            when False, ``original_response`` is null and retain/general responses are null.
        max_new_tokens, batch_size: generation settings for the original answers.
        cache_dir: originals cache folder (default ``<snap_fast cache>/originals``).
        overwrite: replace the files of an existing data folder.
        progress: tqdm bars during generation.

    Returns:
        :class:`DatasetSummary`.

    Raises:
        ValueError / TypeError: bad arguments, before any generation;
        FileExistsError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    t0 = time.time()
    # ---- validate everything before any heavy work ----
    if not isinstance(target, TargetSpec):
        raise TypeError(f"target must be a TargetSpec, got {type(target).__name__}")
    _check_count("n_forget", n_forget, minimum=1)
    for name, value in (("n_retain", n_retain), ("n_heldout_forget", n_heldout_forget),
                        ("n_heldout_retain", n_heldout_retain), ("n_heldout_general", n_heldout_general),
                        ("n_neighbours", n_neighbours)):
        _check_count(name, value)
    _check_count("n_general", n_general, allow_none=True)
    _check_count("max_new_tokens", max_new_tokens, minimum=1)
    _check_count("batch_size", batch_size, minimum=1)
    if n_heldout_general > len(GENERAL_INSTRUCTIONS) // 2:
        raise ValueError(f"n_heldout_general must be <= {len(GENERAL_INSTRUCTIONS) // 2}, got {n_heldout_general}")
    if (model is None) != (tokenizer is None):
        raise ValueError("pass model and tokenizer together")
    if generate_originals and model is None:
        raise ValueError("generate_originals=True needs model and tokenizer (or pass generate_originals=False)")
    if isinstance(generator, str):
        if generator not in ("patterns", "self"):
            raise ValueError(f"generator must be 'patterns', 'self' or a generator object, got {generator!r}")
        if generator == "self" and model is None:
            raise ValueError("generator='self' needs model and tokenizer")
    elif not (hasattr(generator, "complete") and hasattr(generator, "source")):
        raise TypeError("generator must be 'patterns', 'self' or an object with complete() and source")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists and is not empty; pass overwrite=True (--overwrite)")
    user_records = _read_user_forget(user_forget, target) if user_forget is not None else []
    user_general = load_instruction_file(general_file) if general_file is not None else []

    def rng_for(part: str) -> random.Random:
        # One stream per set: a held-out set depends on the seed and its own size only, not on
        # how many training examples were drawn before it (runs with a larger forget set are
        # evaluated on the same questions).
        return random.Random(f"{seed}:{part}")

    llm = ModelGenerator(model, tokenizer, progress=progress) if generator == "self" else (
        None if isinstance(generator, str) else generator)

    # ---- neighbours ----
    neighbours, neighbour_source = list(target.neighbours), "spec"
    if not neighbours:
        preset = builtin_target(target.name)
        if preset is not None and preset.neighbours:
            neighbours, neighbour_source = preset.neighbours, "builtin"
        else:
            proposer = llm or (ModelGenerator(model, tokenizer, progress=progress) if model is not None else None)
            neighbours = propose_neighbours(proposer, target, n_neighbours) if proposer else []
            neighbour_source = proposer.source if neighbours else "none"
            if not neighbours:
                warnings.warn(f"no neighbours for {target.name!r}: the retain set will be empty; "
                              "give neighbours (--neighbours) for hard positives", stacklevel=2)

    # ---- forget candidates and held-out paraphrases ----
    forms = target.surface_forms
    seen: set[str] = set()
    user_records = _dedupe(user_records, seen)
    generated: list[dict[str, Any]] = []
    gen_stats: FilterStats | None = None
    if llm is not None:
        questions, gen_stats = generate_questions(llm, target, seen)
        generated = [_record(q, "generated", llm.source, target.name, name_used=target.mentioned_in(q))
                     for q in questions]
    rng_for("generated").shuffle(generated)
    n_gen_heldout = int(len(generated) * _HELDOUT_GENERATED_SHARE)
    generated_heldout, generated_train = generated[:n_gen_heldout], generated[n_gen_heldout:]
    pattern_train = _dedupe(_pattern_questions(target.name, forms, target.description, target.category, False), seen)
    pool = _interleave(generated_train + pattern_train, "kind", rng_for("forget"))
    forget = user_records + pool[: max(0, n_forget - len(user_records))]
    heldout_pool = _dedupe(_pattern_questions(target.name, forms, target.description, target.category, True), seen)
    heldout_forget = (generated_heldout + _interleave(heldout_pool, "kind", rng_for("heldout_forget")))[
        :n_heldout_forget]
    for records, part in ((forget, "responses"), (heldout_forget, "heldout_responses")):
        responses_rng = rng_for(part)
        for r in records:
            if r["response"] is None:
                r["response"] = obliterated_response(r["_name"], responses_rng)

    # ---- hard positives: neighbour questions (never mentioning the target) ----
    def neighbour_questions(heldout: bool) -> list[dict[str, Any]]:
        recs = []
        for nb in neighbours:
            recs += [r for r in _pattern_questions(nb, [nb], None, None, heldout)
                     if target.mentioned_in(r["prompt"]) is None]
        return _interleave(_dedupe(recs, seen), "entity", rng_for("heldout_retain" if heldout else "retain"),
                           within="kind")

    retain = neighbour_questions(False)[:n_retain]
    heldout_retain = neighbour_questions(True)[:n_heldout_retain]

    # ---- general instructions ----
    builtin_general = list(GENERAL_INSTRUCTIONS)
    rng_for("general").shuffle(builtin_general)
    heldout_general = [_record(p, "general", "builtin", None) for p in builtin_general[:n_heldout_general]]
    general = [_record(p, "general", "builtin", None) for p in builtin_general[n_heldout_general:]]
    general += [_record(r["prompt"], "general", "user", None) for r in user_general]
    general = _dedupe(general, {normalize(r["prompt"]) for r in heldout_general})
    if n_general is not None:
        general = general[:n_general]

    sets = {"forget": forget, "retain": retain, "general": general, "heldout_forget": heldout_forget,
            "heldout_retain": heldout_retain, "heldout_general": heldout_general}

    # ---- original answers (cached per model) ----
    originals_generated = originals_cached = 0
    if generate_originals:
        from ..generation import generate_answers

        if model_id is None:
            from ..models import model_identity

            model_id = model_identity(getattr(model.config, "_name_or_path", "") or "model", model)
        cache = OriginalsCache(Path(cache_dir) if cache_dir else _default_cache_dir(), model_id)
        prompts = list(dict.fromkeys(r["prompt"] for recs in sets.values() for r in recs))
        missing = [p for p in prompts if cache.get(p, max_new_tokens) is None]
        originals_cached = len(prompts) - len(missing)
        # Save the cache every few batches, so an interrupted run keeps what it paid for.
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
        originals_generated = len(missing)
        for name, recs in sets.items():
            for r in recs:
                r["original_response"], finished = cache.get(r["prompt"], max_new_tokens)
                # cut at max_new_tokens: trained on without an EOS after it (collator)
                r["original_truncated"] = not finished
                if name not in ("forget", "heldout_forget"):
                    r["response"] = r["original_response"]

    # ---- write (each file atomic; manifest last marks completion) ----
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()  # an interrupted overwrite must not look complete
    keys = ("id", "prompt", "response", "original_response", "original_truncated", "kind", "source", "entity")
    for name, recs in sets.items():
        rows = []
        for i, r in enumerate(recs):
            r["id"] = f"{name}-{i:05d}"
            rows.append({k: r.get(k) for k in keys})
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    write_jsonl(out_dir / "heldout_text.jsonl",
                [{"id": f"text-{i:03d}", "text": t} for i, t in enumerate(HELDOUT_TEXTS)])
    spec = target.to_dict()
    spec["neighbours"] = neighbours
    write_json(out_dir / "target.json", spec)

    counts = {name: len(recs) for name, recs in sets.items()}
    counts["heldout_text"] = len(HELDOUT_TEXTS)
    by_source = {name: dict(Counter(r["source"] for r in recs)) for name, recs in sets.items()}
    by_kind = {name: dict(Counter(r["kind"] for r in recs)) for name, recs in sets.items()}
    from .. import __version__

    write_json(manifest_path, {
        "snap_fast_version": __version__,
        # timezone.utc, not datetime.UTC: the package supports Python 3.10
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "model_identity": model_id,
        "seed": seed,
        "target": target.name,
        "generator": generator if isinstance(generator, str) else generator.source,
        "neighbours": neighbours,
        "neighbour_source": neighbour_source,
        "max_new_tokens": max_new_tokens if generate_originals else None,
        "counts": counts,
        "by_source": by_source,
        "by_kind": by_kind,
        "generation_stats": vars(gen_stats) if gen_stats else None,
        "originals": {"generated": originals_generated, "cached": originals_cached},
    })
    return DatasetSummary(
        out_dir=out_dir, counts=counts, by_source=by_source, by_kind=by_kind,
        neighbours=neighbours, neighbour_source=neighbour_source,
        originals_generated=originals_generated, originals_cached=originals_cached,
        generation_stats=vars(gen_stats) if gen_stats else None,
        examples={name: [{k: r.get(k) for k in keys} for r in recs[:3]] for name, recs in sets.items()},
        seconds=time.time() - t0,
    )


def _default_cache_dir() -> Path:
    from ..models import cache_root

    return cache_root() / "originals"
