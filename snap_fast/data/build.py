"""Build a SNAP data folder for one target: forget, hard-positive and held-out sets.

:func:`build_dataset` is the Python API behind ``snap-fast data``. It reads top to bottom:

1. forget candidates: built-in patterns x (name, aliases, description), an optional LLM
   generator (the model itself or an endpoint), an optional user JSONL; de-duplicated;
2. held-out forget questions: the held-out paraphrase patterns (and a share of the generated
   questions), never equal to a training question;
3. hard positives: neighbour entities (given, a built-in preset, or proposed by the generator
   and checked, filled up from a pool of well-known entities when too few) asked through the
   same patterns; general instructions (built-in + user file);
4. the original model's greedy answers to every prompt (cached per model on disk); a hard
   positive or general request whose answer names the target becomes a reverse forget question;
5. atomic writes of every file; ``manifest.json`` last, so its presence marks a complete folder.
"""

from __future__ import annotations

import functools
import os
import random
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..checks import check_int
from ..generation import DEFAULT_GEN_BATCH_SIZE
from ..io import read_jsonl, write_json, write_jsonl
from .generators import (
    FilterStats,
    ModelGenerator,
    filter_neighbours,
    generate_questions,
    propose_neighbours,
)
from .originals import fill_original_answers
from .patterns import patterns_for, reverse_questions
from .positives import (
    GENERAL_INSTRUCTIONS,
    HELDOUT_GENERAL_INSTRUCTIONS,
    HELDOUT_TEXTS,
    MIN_NEIGHBOURS,
    fallback_neighbours,
    load_instruction_file,
)
from .responses import obliterated_response
from .reverse import reverse_records
from .sets import QA_SETS  # noqa: F401 (re-exported: the sets this module writes)
from .target import TargetSpec, builtin_target, mentions, normalize

_HELDOUT_GENERATED_SHARE = 0.2  # share of LLM-generated forget questions kept for evaluation

#: Set sizes and generation settings of ``snap-fast data`` / ``snap-fast forget`` when none are
#: given: the data the default training recipe was validated on (benchmarks/forget_targets.py).
#: 128 forget questions forgot more than 64 at the same steps (95 % against 85 %, docs/demo.md);
#: original answers are capped at 32 new tokens, the cap evaluation uses, so both compare fairly.
DEFAULT_SIZES = {"n_forget": 128, "n_retain": 256, "n_general": 38, "n_heldout_forget": 40,
                 "n_heldout_retain": 40, "n_heldout_general": 64, "max_new_tokens": 32}


@dataclass
class DatasetSummary:
    """What :func:`build_dataset` wrote.

    Attributes:
        out_dir: the data folder.
        counts: records per set (``forget``, ``retain``, ..., ``heldout_text``).
        by_source / by_kind: per set, record counts by ``source`` / ``kind``.
        neighbours: the neighbour entities used, and ``neighbour_source`` where they came from
            ("spec": given in the target spec, "builtin": a preset, "model", "endpoint" or "none").
        neighbours_dropped: proposed neighbours the original model ties to the target (dropped).
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
    neighbours_dropped: list[str] = field(default_factory=list)

    def format(self) -> str:
        """A human-readable multi-line summary (the CLI prints it)."""
        lines = [f"data folder: {self.out_dir}  ({self.seconds:.1f} s)"]
        lines.append(f"{'set':<16} {'records':>7}  by source / by kind")
        for name, n in self.counts.items():
            src = ", ".join(f"{k} {v}" for k, v in sorted(self.by_source.get(name, {}).items()))
            kind = ", ".join(f"{k} {v}" for k, v in sorted(self.by_kind.get(name, {}).items()))
            lines.append(f"{name:<16} {n:>7}  {src}" + (f" | {kind}" if kind else ""))
        lines.append(f"neighbours ({self.neighbour_source}): {', '.join(self.neighbours) or '-'}")
        if self.neighbours_dropped:
            lines.append(f"proposed neighbours tied to the target (dropped): {', '.join(self.neighbours_dropped)}")
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


def build_dataset(
    target: TargetSpec,
    out_dir: str | os.PathLike,
    *,
    model=None,
    tokenizer=None,
    model_id: str | None = None,
    generator: Any = "patterns",
    n_forget: int = DEFAULT_SIZES["n_forget"],
    n_retain: int = DEFAULT_SIZES["n_retain"],
    n_general: int | None = DEFAULT_SIZES["n_general"],
    n_heldout_forget: int = DEFAULT_SIZES["n_heldout_forget"],
    n_heldout_retain: int = DEFAULT_SIZES["n_heldout_retain"],
    n_heldout_general: int = DEFAULT_SIZES["n_heldout_general"],
    n_neighbours: int = 8,
    user_forget: str | os.PathLike | None = None,
    general_file: str | os.PathLike | None = None,
    seed: int = 0,
    generate_originals: bool = True,
    max_new_tokens: int = DEFAULT_SIZES["max_new_tokens"],
    batch_size: int = DEFAULT_GEN_BATCH_SIZE,
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
            candidates run out). User forget questions are always included, and so are the
            training requests whose original answer names the target (moved from the retain
            and general sets).
        n_general: built-in general instructions for training (at most; None: all of them);
            every instruction of ``general_file`` is added to them.
        n_heldout_forget, n_heldout_retain, n_heldout_general: held-out set sizes (at most;
            ``heldout_forget`` also receives the held-out requests whose original answer names
            the target, taken from the other held-out sets). The
            held-out general requests come from their own built-in bank of 64 (never trained on;
            those naming the target or a neighbour are dropped): false refusals are measured there.
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
    _check_build_args(target, model, tokenizer, generator, n_forget=n_forget, n_retain=n_retain,
                      n_general=n_general, n_heldout_forget=n_heldout_forget, n_heldout_retain=n_heldout_retain,
                      n_heldout_general=n_heldout_general, n_neighbours=n_neighbours,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, generate_originals=generate_originals)
    out_dir = _check_out_dir(Path(out_dir), overwrite)
    user_records = _read_user_forget(user_forget, target) if user_forget is not None else []
    user_general = load_instruction_file(general_file) if general_file is not None else []

    rng_for = functools.partial(_rng_for, seed)
    llm = ModelGenerator(model, tokenizer, progress=progress) if generator == "self" else (
        None if isinstance(generator, str) else generator)
    neighbours, neighbour_source, dropped = _choose_neighbours(target, llm, model, tokenizer, n_neighbours,
                                                               batch_size, progress)
    seen: set[str] = set()
    forget, heldout_forget, gen_stats = _forget_sets(target, llm, _dedupe(user_records, seen), seen, rng_for,
                                                     n_forget, n_heldout_forget)
    retain, heldout_retain = (_neighbour_questions(target, neighbours, seen, rng_for, heldout)[:n]
                              for heldout, n in ((False, n_retain), (True, n_heldout_retain)))
    general, heldout_general = _general_sets(user_general, rng_for, n_general, n_heldout_general,
                                             [target.name, *target.aliases, *neighbours])
    sets = {"forget": forget, "retain": retain, "general": general, "heldout_forget": heldout_forget,
            "heldout_retain": heldout_retain, "heldout_general": heldout_general}

    originals_generated = originals_cached = 0
    if generate_originals:
        model_id, originals_generated, originals_cached = fill_original_answers(
            sets, model, tokenizer, model_id=model_id, cache_dir=cache_dir, max_new_tokens=max_new_tokens,
            batch_size=batch_size, seed=seed, progress=progress)
        tied = _promote_target_answers(sets, target, rng_for("promoted"))
        # the user's own neighbours stay, and so does the last one (an empty retain set trains nothing)
        if neighbour_source not in ("spec", "builtin") and tied and any(n not in tied for n in neighbours):
            _drop_tied_neighbours(sets, tied)
            warnings.warn(f"neighbours dropped because the original model answered a question about them with "
                          f"{target.name!r}: {', '.join(n for n in neighbours if n in tied)}", stacklevel=2)
            dropped += [n for n in neighbours if n in tied]
            neighbours = [n for n in neighbours if n not in tied]
        if not target.facts:  # reverse questions from what the original model says about the target
            candidates = {"forget": _reverse_candidates(sets, target, seen, rng_for)}
            _, more, _ = fill_original_answers(
                candidates, model, tokenizer, model_id=model_id, cache_dir=cache_dir, max_new_tokens=max_new_tokens,
                batch_size=batch_size, seed=seed, progress=progress)
            originals_generated += more
            _add_reverse_from_answers(sets, target, candidates["forget"], n_forget, n_heldout_forget)
    summary = DatasetSummary(out_dir, {}, {}, {}, neighbours, neighbour_source, originals_generated,
                             originals_cached, vars(gen_stats) if gen_stats else None, neighbours_dropped=dropped)
    _write_folder(summary, sets, target, {
        "model_identity": model_id, "seed": seed, "target": target.name,
        "generator": generator if isinstance(generator, str) else generator.source,
        "max_new_tokens": max_new_tokens if generate_originals else None,
    })
    summary.seconds = time.time() - t0
    return summary


def _rng_for(seed: int, part: str) -> random.Random:
    """One random stream per set: a held-out set depends on the seed and its own size only, not
    on how many training examples were drawn before it (runs with a larger forget set are
    evaluated on the same questions)."""
    return random.Random(f"{seed}:{part}")


_RECORD_KEYS = ("id", "prompt", "response", "original_response", "original_truncated", "kind", "source", "entity")


def _check_build_args(target, model, tokenizer, generator, *, generate_originals: bool, **counts) -> None:
    """build_dataset's argument checks, before any generation."""
    if not isinstance(target, TargetSpec):
        raise TypeError(f"target must be a TargetSpec, got {type(target).__name__}")
    minimum = {"n_forget": 1, "max_new_tokens": 1, "batch_size": 1}
    for name, value in counts.items():
        check_int(name, value, minimum=minimum.get(name, 0), allow_none=name == "n_general")
    if counts["n_heldout_general"] > len(HELDOUT_GENERAL_INSTRUCTIONS):
        raise ValueError(f"n_heldout_general must be <= {len(HELDOUT_GENERAL_INSTRUCTIONS)}, "
                         f"got {counts['n_heldout_general']}")
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


def _check_out_dir(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists and is not empty; pass overwrite=True (--overwrite)")
    return out_dir


def _choose_neighbours(target: TargetSpec, llm, model, tokenizer, n_neighbours: int, batch_size: int,
                       progress: bool) -> tuple[list[str], str, list[str]]:
    """The neighbour entities, where they came from (the spec, a built-in preset, or proposed by
    the generator (or the model) and checked), and the proposed ones dropped by
    :func:`_tied_to_target`."""
    if target.neighbours:
        return list(target.neighbours), "spec", []
    preset = builtin_target(target.name)
    if preset is not None and preset.neighbours:
        return preset.neighbours, "builtin", []
    proposer = llm or (ModelGenerator(model, tokenizer, progress=progress) if model is not None else None)
    # twice as many proposals as needed: the model's check below may drop some
    neighbours = propose_neighbours(proposer, target, 2 * n_neighbours) if proposer else []
    pool = fallback_neighbours(target.category)
    pool = [p for p in filter_neighbours(pool, target, len(pool)) if p not in neighbours]
    tied = (_tied_to_target([*neighbours, *pool], target, model, tokenizer, batch_size, progress)
            if model is not None else set())
    dropped = [n for n in neighbours if n in tied]
    neighbours = [n for n in neighbours if n not in tied][:n_neighbours]
    source = proposer.source if neighbours else ""
    if len(neighbours) < min(MIN_NEIGHBOURS, n_neighbours):
        filled = filter_neighbours([*neighbours, *(p for p in pool if p not in tied)], target, n_neighbours)
        if len(filled) > len(neighbours):
            warnings.warn(f"{len(neighbours)} neighbours proposed for {target.name!r}: filled up with well-known "
                          f"{target.category or 'entities'} ({', '.join(filled[len(neighbours):])}); give "
                          "neighbours (--neighbours) for harder positives", stacklevel=3)
            neighbours, source = filled, f"{source}+fallback" if source else "fallback"
    if dropped:
        warnings.warn(f"proposed neighbours dropped because the original model ties them to {target.name!r} "
                      f"(its own works, relatives, places): {', '.join(dropped)}", stacklevel=3)
    return neighbours, source or "none", dropped


# How a candidate neighbour is described: an answer naming the target means the model knows it
# through the target (a work, a relative, a place of its life), so it cannot be kept as a hard
# positive without teaching the target back ("Hamlet" for "William Shakespeare").
_TIE_PROMPTS = ("Tell me about {} in one sentence.", "Who created {}?")


def _tied_to_target(candidates: list[str], target: TargetSpec, model, tokenizer, batch_size: int,
                    progress: bool) -> set[str]:
    """The candidates for which the original model names the target in an answer to
    :data:`_TIE_PROMPTS` (greedy, 32 new tokens, one batch)."""
    if not candidates:
        return set()
    prompts = [t.format(c) for c in candidates for t in _TIE_PROMPTS]
    describer = ModelGenerator(model, tokenizer, max_new_tokens=32, batch_size=batch_size, progress=progress)
    answers = describer.complete(prompts)
    k = len(_TIE_PROMPTS)
    return {c for i, c in enumerate(candidates) if any(target.mentioned_in(a) for a in answers[i * k:(i + 1) * k])}


def _forget_sets(target: TargetSpec, llm, user_records: list[dict[str, Any]], seen: set[str], rng_for,
                 n_forget: int, n_heldout_forget: int) -> tuple[list, list, FilterStats | None]:
    """Training and held-out forget questions, each with its obliterated response.

    Candidates: the user's questions first, then generated, pattern and reverse questions
    interleaved by kind; held out: half of the reverse questions, a share of the generated
    questions and the held-out paraphrase patterns, never equal to a training question.
    """
    forms = target.surface_forms
    generated: list[dict[str, Any]] = []
    gen_stats: FilterStats | None = None
    if llm is not None:
        questions, gen_stats = generate_questions(llm, target, seen)
        generated = [_record(q, "generated", llm.source, target.name, name_used=target.mentioned_in(q))
                     for q in questions]
    rng_for("generated").shuffle(generated)
    n_gen_heldout = int(len(generated) * _HELDOUT_GENERATED_SHARE)
    generated_heldout, generated_train = generated[:n_gen_heldout], generated[n_gen_heldout:]
    # Reverse questions (the answer is the target; see reverse_questions): half held out, first
    # in the held-out set so its size cap never drops them.
    reverse = [_record(q, "reverse", "pattern", target.name)
               for q in reverse_questions(target.facts, forms, target.category)]
    reverse = _dedupe(reverse, seen)
    rng_for("reverse").shuffle(reverse)
    reverse_heldout, reverse_train = reverse[: len(reverse) // 2], reverse[len(reverse) // 2:]
    pattern_train = _dedupe(_pattern_questions(target.name, forms, target.description, target.category, False), seen)
    pool = _interleave(generated_train + pattern_train + reverse_train, "kind", rng_for("forget"))
    forget = user_records + pool[: max(0, n_forget - len(user_records))]
    if len(forget) < n_forget and target.category is None:
        warnings.warn(f"{len(forget)} forget questions of the {n_forget} asked for: without a category only the "
                      "generic patterns apply; --category (person, character, work, place, organization) gives about "
                      "twice as many", stacklevel=3)
    heldout_pool = _dedupe(_pattern_questions(target.name, forms, target.description, target.category, True), seen)
    heldout_forget = (reverse_heldout + generated_heldout
                      + _interleave(heldout_pool, "kind", rng_for("heldout_forget")))[:n_heldout_forget]
    for records, part in ((forget, "responses"), (heldout_forget, "heldout_responses")):
        responses_rng = rng_for(part)
        for r in records:
            if r["response"] is None:
                r["response"] = obliterated_response(r["_name"], responses_rng)
    return forget, heldout_forget, gen_stats


# Where a question whose original answer names the target moves: hard positives and general
# requests answered with the target are reverse questions in disguise.
_PROMOTED_TO = {"retain": "forget", "general": "forget", "heldout_retain": "heldout_forget",
                "heldout_general": "heldout_forget"}


def _promote_target_answers(sets: dict[str, list[dict[str, Any]]], target: TargetSpec,
                            rng: random.Random) -> set[str]:
    """Move every non-forget record whose original answer names the target (or an alias) to the
    matching forget set as a reverse question (``source="original_answer"``) with a nameless
    obliterated response.

    Such a question reaches the target from another side ("Who was Michelle Obama's husband?"):
    kept as a hard positive it would train the model to go on saying the name; held out, it is a
    leak the evaluation must count. The held-out ones go first in ``heldout_forget``. Returns the
    neighbours (``entity``) that had a question moved.
    """
    tied: set[str] = set()
    for part, dest in _PROMOTED_TO.items():
        keep, moved = [], []
        for r in sets[part]:
            answer = r.get("original_response")
            (moved if isinstance(answer, str) and target.mentioned_in(answer) else keep).append(r)
        tied.update(r["entity"] for r in moved if r.get("entity"))
        for r in moved:
            r.update(kind="reverse", source="original_answer", entity=target.name, _name=None,
                     response=obliterated_response(None, rng))
        sets[part] = keep
        sets[dest] = moved + sets[dest] if dest.startswith("heldout") else sets[dest] + moved
    return tied


def _drop_tied_neighbours(sets: dict[str, list[dict[str, Any]]], tied: set[str]) -> None:
    """Remove every remaining hard positive about a ``tied`` neighbour.

    A proposed neighbour one of whose questions the original answers with the target is known to
    the model through the target (SmolLM2 answers "Who is the creator of Hamlet?" with William
    Shakespeare while its one-sentence description of Hamlet does not name him): its other
    questions, kept as hard positives, would hold on to what is being forgotten.
    """
    for part in ("retain", "heldout_retain"):
        sets[part] = [r for r in sets[part] if r.get("entity") not in tied]


def _reverse_candidates(sets: dict[str, list[dict[str, Any]]], target: TargetSpec, seen: set[str],
                        rng_for) -> list[dict[str, Any]]:
    """Reverse questions written from the training forget set's original answers
    (:func:`snap_fast.data.reverse.reverse_records`), new prompts only; their own original
    answers are still to generate."""
    answers = [r["original_response"] for r in sets["forget"] if isinstance(r.get("original_response"), str)]
    return _dedupe(reverse_records(target, answers, rng_for("answer_facts")), seen)


def _add_reverse_from_answers(sets: dict[str, list[dict[str, Any]]], target: TargetSpec,
                              candidates: list[dict[str, Any]], n_forget: int, n_heldout_forget: int) -> None:
    """Add the candidates the original model answers with the target's name: half to
    ``heldout_forget`` (first, within its size), the rest to ``forget`` within ``n_forget``.

    A statement rewritten as a question is often too vague to have one answer ("Who is a legendary
    figure in the history of science?"): the original names someone else, so refusing it would
    teach over-forgetting and not answering it would prove nothing. Only questions whose original
    answer names the target test whether the model still knows it.
    """
    kept = [r for r in candidates if target.mentioned_in(r.get("original_response") or "") is not None]
    held, train = kept[: len(kept) // 2], kept[len(kept) // 2:]
    sets["forget"] += train[: max(0, n_forget - len(sets["forget"]))]
    # the held-out set keeps its size: the last pattern paraphrases make room
    existing = sets["heldout_forget"]
    sets["heldout_forget"] = (held + existing)[:max(n_heldout_forget, len(existing), len(held))]


def _neighbour_questions(target: TargetSpec, neighbours: list[str], seen: set[str], rng_for,
                         heldout: bool) -> list[dict[str, Any]]:
    """Hard positives: the neighbours asked through the same patterns, never naming the target."""
    recs = []
    for nb in neighbours:
        recs += [r for r in _pattern_questions(nb, [nb], None, None, heldout)
                 if target.mentioned_in(r["prompt"]) is None]
    return _interleave(_dedupe(recs, seen), "entity", rng_for("heldout_retain" if heldout else "retain"),
                       within="kind")


def _general_sets(user_general: list[dict[str, Any]], rng_for, n_general: int | None,
                  n_heldout_general: int, names: list[str]) -> tuple[list, list]:
    """Training general instructions (built-in, plus the user's) and the held-out general
    requests (their own bank, minus any that mention one of ``names``)."""
    heldout = [p for p in HELDOUT_GENERAL_INSTRUCTIONS if mentions(p, names) is None]
    rng_for("heldout_general").shuffle(heldout)
    heldout_general = [_record(p, "general", "builtin", None) for p in heldout[:n_heldout_general]]
    builtin_general = list(GENERAL_INSTRUCTIONS)
    rng_for("general").shuffle(builtin_general)
    builtin_general = builtin_general[:n_general] if n_general is not None else builtin_general
    general = [_record(p, "general", "builtin", None) for p in builtin_general]
    general += [_record(r["prompt"], "general", "user", None) for r in user_general]
    return _dedupe(general, {normalize(r["prompt"]) for r in heldout_general}), heldout_general


def _write_folder(summary: DatasetSummary, sets: dict[str, list[dict[str, Any]]], target: TargetSpec,
                  manifest: dict[str, Any]) -> None:
    """Every file atomically, ``manifest.json`` last (its presence marks a complete folder);
    fills the summary's counts and examples."""
    out_dir = summary.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()  # an interrupted overwrite must not look complete
    for name, recs in sets.items():
        for i, r in enumerate(recs):
            r["id"] = f"{name}-{i:05d}"
        write_jsonl(out_dir / f"{name}.jsonl", [{k: r.get(k) for k in _RECORD_KEYS} for r in recs])
    write_jsonl(out_dir / "heldout_text.jsonl",
                [{"id": f"text-{i:03d}", "text": t} for i, t in enumerate(HELDOUT_TEXTS)])
    write_json(out_dir / "target.json", {**target.to_dict(), "neighbours": summary.neighbours})
    summary.counts = {name: len(recs) for name, recs in sets.items()}
    summary.counts["heldout_text"] = len(HELDOUT_TEXTS)
    summary.by_source = {name: dict(Counter(r["source"] for r in recs)) for name, recs in sets.items()}
    summary.by_kind = {name: dict(Counter(r["kind"] for r in recs)) for name, recs in sets.items()}
    summary.examples = {name: [{k: r.get(k) for k in _RECORD_KEYS} for r in recs[:3]] for name, recs in sets.items()}
    from ..version import __version__

    write_json(manifest_path, {
        "snap_fast_version": __version__,
        # timezone.utc, not datetime.UTC: the package supports Python 3.10
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        **{k: manifest[k] for k in ("model_identity", "seed", "target", "generator")},
        "neighbours": summary.neighbours,
        "neighbour_source": summary.neighbour_source,
        "neighbours_dropped": summary.neighbours_dropped,
        "max_new_tokens": manifest["max_new_tokens"],
        "counts": summary.counts,
        "by_source": summary.by_source,
        "by_kind": summary.by_kind,
        "generation_stats": summary.generation_stats,
        "originals": {"generated": summary.originals_generated, "cached": summary.originals_cached},
    })
