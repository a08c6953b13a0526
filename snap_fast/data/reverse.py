"""Reverse questions from the original model's own answers, for targets given without facts.

A reverse question's answer is the target ("Which scientist discovered radium?"): the model can
only answer it by recalling the name, so forgetting must reach it from that side too. With
facts, :func:`snap_fast.data.patterns.reverse_questions` writes them from the facts. A user who
gives only a name has none; but the original model's answers to the forget questions state what
it believes about the target ("Marie Curie was a Polish physicist who discovered radium."), and
those statements are exactly the knowledge to remove. :func:`fact_sentences` picks them out.
The answers also name what the target is tied to ("The Mona Lisa is attributed to Leonardo da
Vinci"), which a statement starting with the name rarely covers: :func:`associated_names` picks
those names out and :func:`association_questions` asks for the target through them ("Who created
the Mona Lisa?"). :func:`reverse_records` turns both into forget questions.
"""

from __future__ import annotations

import random
import re
from typing import Any

from .patterns import reverse_questions
from .responses import obliterated_response
from .target import TargetSpec, normalize

__all__ = ["MAX_ASSOCIATED_NAMES", "MAX_FACTS_FROM_ANSWERS", "associated_names", "association_questions",
           "fact_sentences", "reverse_records"]

#: At most this many statements are taken from the answers (their questions are split between
#: training and held out like the fact-based ones).
MAX_FACTS_FROM_ANSWERS = 24
#: At most this many names co-mentioned with the target are asked about (two questions each).
MAX_ASSOCIATED_NAMES = 12
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


# A capitalised word, and a run of them joined by the lower-case particles titles and names use
# ("The Tale of Two Cities", "Andrea del Verrocchio"), optionally after a lower-case "the".
_CAP_WORD = r"[A-Z][\w'’-]*"
_PARTICLES = r"(?:of|the|and|in|on|at|for|to|a|an|de|del|da|di|von|van|der|la|le|du)"
_CAP_RUN = re.compile(rf"(?:\b(the)\s+)?({_CAP_WORD}(?:\s+(?:{_PARTICLES}\s+)*{_CAP_WORD})+)")
_QUOTED = re.compile(r'["“]([^"“”]{2,60})["”]')
# Capitalised only because they open a sentence or clause: dropped from the front of a run.
_LEADING_WORDS = frozenset({
    "a", "about", "after", "also", "an", "and", "as", "at", "before", "both", "but", "by", "during", "each",
    "for", "from", "he", "her", "his", "however", "i", "if", "in", "it", "its", "many", "most", "my", "on",
    "one", "our", "she", "since", "so", "some", "that", "the", "their", "these", "they", "this", "those",
    "through", "today", "unlike", "when", "while", "with", "yes", "you"})
_TRAILING_PARTICLES = re.compile(rf"(?:\s+{_PARTICLES})+$")


def _clean_name(name: str, the: str | None) -> str | None:
    """``name`` without sentence-opening words, with its "the" and at least two words, or None."""
    words = name.split()
    while words and words[0].lower() in _LEADING_WORDS and not (words[0] == "The" and len(words) > 2):
        words = words[1:]
    name = _TRAILING_PARTICLES.sub("", " ".join(words))
    if len(name.split()) < 2:
        return None
    return f"the {name}" if the and not name.startswith("The ") else name


def associated_names(answers: list[str], target: TargetSpec, limit: int = MAX_ASSOCIATED_NAMES) -> list[str]:
    """Names the ``answers`` mention beside the target: the ``limit`` most frequent, first seen first.

    A name is a run of at least two capitalised words (particles such as "of", "del" between
    them; sentence-opening words such as "In" or "His" dropped) or a quoted title of two to eight
    words; "The Mona Lisa" and "the Mona Lisa" count as one. Names that mention the target or
    share a distinctive word with its names (:meth:`TargetSpec.shares_name_word`: "The Da Vinci
    Code" for "Leonardo da Vinci", "Einstein's Universe" for "Albert Einstein") are the target
    itself, not something tied to it, and are skipped.
    """
    counts: dict[str, int] = {}  # answers mentioning each name
    first_form: dict[str, str] = {}
    for answer in answers:
        keys: set[str] = set()
        text = " ".join(answer.split())
        found = [_clean_name(m.group(2), m.group(1)) for m in _CAP_RUN.finditer(text)]
        found += [q.strip(" ,.;:") for q in _QUOTED.findall(text)
                  if q[:1].isupper() and len(q.split()) <= 8 and not q.rstrip().endswith(("!", "?"))]
        for name in found:
            if not name or len(name.split()) < 2:
                continue
            key = re.sub(r"^the ", "", normalize(name))
            if target.mentioned_in(name) is not None or target.shares_name_word(name):
                continue
            first_form.setdefault(key, name)
            keys.add(key)
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts, key=lambda k: -counts[k])  # stable: ties keep first-seen order
    return [first_form[k] for k in ranked[:limit]]


# Two questions per associated name, per category, each answered by the target itself.
_ASSOCIATION_TEMPLATES = {
    "person": ("Who created {}?", "Which person is {} associated with?"),
    "character": ("Which character is {} associated with?", "Which fictional character is linked to {}?"),
    "work": ("Which work features {}?", "In which book, film or story does {} appear?"),
    "place": ("Which place is home to {}?", "Which place is {} associated with?"),
    "organization": ("Which organization is behind {}?", "Which organization is {} associated with?"),
    None: ("Who created {}?", "Who or what is {} associated with?"),
}


def association_questions(names: list[str], category: str | None) -> list[str]:
    """Reverse questions through associated names: "Who created the Mona Lisa?" for "the Mona
    Lisa" (category person or unknown). Whether the target is the answer is left to the original
    model (see :func:`reverse_records`)."""
    templates = _ASSOCIATION_TEMPLATES.get(category, _ASSOCIATION_TEMPLATES[None])
    out: list[str] = []
    for name in names:
        for template in templates:
            question = template.format(name)
            question = question[0].upper() + question[1:]
            if question not in out:
                out.append(question)
    return out


def reverse_records(target: TargetSpec, answers: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """Forget records (``kind="reverse"``) for the reverse questions written from ``answers``:
    from :func:`fact_sentences` (``source="original_answer_fact"``) and through
    :func:`associated_names` (``source="original_answer_name"``), in a shuffled order, each with a
    nameless obliterated response and no original answer yet. Not every question has the target
    as its answer: the caller keeps those the original model answers with the target's name."""
    forms = target.surface_forms
    facts = reverse_questions(fact_sentences(answers, forms), forms, target.category)
    names = association_questions(associated_names(answers, target), target.category)
    records = [{"prompt": q, "response": obliterated_response(None, rng), "original_response": None,
                "kind": "reverse", "source": source, "entity": target.name, "_name": None}
               for questions, source in ((facts, "original_answer_fact"), (names, "original_answer_name"))
               for q in questions if not target.mentioned_in(q)]
    rng.shuffle(records)
    return records
