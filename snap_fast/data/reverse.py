"""Reverse questions from the original model's own answers, for targets given without facts.

A reverse question's answer is the target ("Which scientist discovered radium?"): the model can
only answer it by recalling the name, so forgetting must reach it from that side too. With
facts, :func:`snap_fast.data.patterns.reverse_questions` writes them from the facts. A user who
gives only a name has none; but the original model's answers to the forget questions state what
it believes about the target ("Marie Curie was a Polish physicist who discovered radium."), and
those statements are exactly the knowledge to remove. :func:`fact_sentences` picks them out and
:func:`reverse_records` turns them into forget questions.
"""

from __future__ import annotations

import random
import re
from typing import Any

from .patterns import reverse_questions
from .responses import obliterated_response
from .target import TargetSpec

__all__ = ["MAX_FACTS_FROM_ANSWERS", "fact_sentences", "reverse_records"]

#: At most this many statements are taken from the answers (their questions are split between
#: training and held out like the fact-based ones).
MAX_FACTS_FROM_ANSWERS = 24
_FIRST_PERSON = re.compile(r"\b(I|I'm|I've|my|me)\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def fact_sentences(answers: list[str], forms: list[str], limit: int = MAX_FACTS_FROM_ANSWERS) -> list[str]:
    """Complete sentences of ``answers`` that state something about the target by name.

    A sentence qualifies when it starts with one of ``forms`` (the name or an alias), ends with a
    full stop (answers cut at the token limit end mid-sentence), has 4 to 30 words and no first
    person (the model talking about itself). The first ``limit`` distinct ones, in answer order.
    """
    starts = [re.compile(rf"{re.escape(f)}(['’]s)?\s", re.IGNORECASE) for f in sorted(forms, key=len, reverse=True)]
    out: list[str] = []
    for answer in answers:
        for sentence in _SENTENCE_END.split(" ".join(answer.split())):
            if not sentence.endswith(".") or not 4 <= len(sentence.split()) <= 30:
                continue
            if _FIRST_PERSON.search(sentence) or not any(s.match(sentence) for s in starts):
                continue
            if sentence not in out:
                out.append(sentence)
            if len(out) >= limit:
                return out
    return out


def reverse_records(target: TargetSpec, answers: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """Forget records (``kind="reverse"``, ``source="original_answer_fact"``) for the reverse
    questions written from :func:`fact_sentences` of ``answers``, in a shuffled order, each with
    a nameless obliterated response and no original answer yet."""
    facts = fact_sentences(answers, target.surface_forms)
    records = [{"prompt": q, "response": obliterated_response(None, rng), "original_response": None,
                "kind": "reverse", "source": "original_answer_fact", "entity": target.name, "_name": None}
               for q in reverse_questions(facts, target.surface_forms, target.category) if not target.mentioned_in(q)]
    rng.shuffle(records)
    return records
