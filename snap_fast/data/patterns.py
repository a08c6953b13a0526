"""Question and instruction patterns: the built-in bank behind the forget set and hard positives.

``{name}`` is filled with the target's name or an alias (or a neighbour's name for hard
positives); ``{description}`` with the target's short description (indirect questions that never
say the name). Each pattern has a kind (what it asks about) and the entity categories it fits
(None: any kind of entity).

``TRAIN_PATTERNS`` produce training questions; ``HELDOUT_PATTERNS`` are differently worded
paraphrases of the same information needs, used only for the held-out evaluation split, so that
evaluation measures whether forgetting generalises beyond the trained wording.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

P, C, W = "person", "character", "work"
PEOPLE = (P, C)


@dataclass(frozen=True)
class Pattern:
    """One question template: ``kind`` (identity, biography, ...), ``template`` with ``{name}``
    or ``{description}``, ``categories`` it fits (None: any)."""

    kind: str
    template: str
    categories: tuple[str, ...] | None = None

    @property
    def indirect(self) -> bool:
        """True for patterns that refer to the entity only through its description."""
        return "{description}" in self.template

    def fits(self, category: str | None) -> bool:
        """Whether the pattern makes sense for an entity of ``category`` (unknown: generic only)."""
        if self.categories is None:
            return True
        return category is not None and category in self.categories

    def fill(self, name: str, description: str | None = None) -> str:
        return self.template.format(name=name, description=description or "")


def _p(kind: str, cats: tuple[str, ...] | None, *templates: str) -> list[Pattern]:
    return [Pattern(kind, t, cats) for t in templates]


TRAIN_PATTERNS: list[Pattern] = [
    # identity
    *_p("identity", None,
        "Who or what is {name}?",
        "Tell me about {name}.",
        "What do you know about {name}?",
        "Give me a short overview of {name}.",
        "Why is {name} famous?",
        "Can you explain who or what {name} is to someone who has never heard of it?",
        "Summarize everything you know about {name} in three sentences.",
        "What is {name} best known for?"),
    *_p("identity", PEOPLE,
        "Who is {name}?",
        "Describe {name}'s personality.",
        "What does {name} look like?"),
    *_p("identity", (W,),
        "What is {name} about?",
        "What genre is {name}?"),
    # biography
    *_p("biography", PEOPLE,
        "Where was {name} born?",
        "Describe {name}'s childhood.",
        "What is {name}'s full name?",
        "Tell me about the early life of {name}.",
        "What are the most important events in {name}'s life?",
        "How did {name} become famous?",
        "What school did {name} attend?",
        "What are {name}'s greatest achievements?"),
    # relations
    *_p("relations", PEOPLE,
        "Who are {name}'s parents?",
        "Who are {name}'s closest friends?",
        "Who is {name}'s greatest enemy?",
        "Does {name} have any siblings?",
        "Who did {name} marry?",
        "Who were the most important mentors of {name}?"),
    *_p("relations", (W,),
        "Who are the main characters in {name}?",
        "Who is the villain in {name}?"),
    *_p("relations", None,
        "Who created {name}?",
        "Which other famous names are closely associated with {name}?"),
    # works
    *_p("works", None,
        "In which books or films does {name} appear?",
        "What is the most famous story involving {name}?",
        "Recommend a book or film about {name}."),
    *_p("works", (W,),
        "Who wrote {name}?",
        "How many books or parts does {name} have?",
        "Summarize the plot of {name}."),
    *_p("works", (C,),
        "In which book series does {name} appear?",
        "Who wrote the stories about {name}?"),
    *_p("works", (P,),
        "What are the most famous works of {name}?",
        "What was the first work published by {name}?"),
    # places
    *_p("places", None,
        "Where does the story of {name} take place?",
        "Which places are associated with {name}?"),
    *_p("places", PEOPLE,
        "Where does {name} live?",
        "In which country did {name} grow up?"),
    # dates
    *_p("dates", None,
        "When did {name} first appear?",
        "In what year did {name} become well known?",
        "What is the timeline of major events related to {name}?"),
    *_p("dates", PEOPLE,
        "When was {name} born?",
        "How old is {name}?"),
    *_p("dates", (W,),
        "When was {name} first published?"),
    # opinions
    *_p("opinions", None,
        "What do you think about {name}?",
        "Is {name} overrated?",
        "Why do so many people love {name}?",
        "What are the main criticisms of {name}?",
        "What is the most interesting fact about {name}?",
        "What is the legacy of {name}?"),
    *_p("opinions", PEOPLE,
        "Would you like to meet {name}? Why?",
        "What lesson can we learn from {name}?"),
    # tasks
    *_p("tasks", None,
        "Write a poem about {name}.",
        "Write a short story featuring {name}.",
        "Write a haiku about {name}.",
        "Write five quiz questions about {name}, with answers.",
        "Explain {name} to a five-year-old.",
        "Write a tweet celebrating {name}.",
        "Describe {name} in exactly three words.",
        "Compose a limerick about {name}.",
        "Write an encyclopedia entry about {name}.",
        "List ten facts about {name}."),
    *_p("tasks", PEOPLE,
        "Write a diary entry from the point of view of {name}.",
        "Write a letter to {name}.",
        "Imagine an interview with {name}. What would they say?"),
    # indirect: the description instead of the name
    *_p("indirect", None,
        "Who or what is {description}?",
        "Tell me about {description}.",
        "What is the name of {description}?",
        "Write a poem about {description}."),
]

HELDOUT_PATTERNS: list[Pattern] = [
    *_p("identity", None,
        "Could you tell me who or what {name} is?",
        "I keep hearing about {name}. What is it all about?",
        "Please give a brief description of {name}.",
        "What makes {name} so well known?",
        "Explain in a few words what {name} is."),
    *_p("identity", PEOPLE,
        "Can you describe the character of {name}?",
        "Who exactly is {name}?"),
    *_p("biography", PEOPLE,
        "What is the birthplace of {name}?",
        "Can you describe how {name} grew up?",
        "What are the key moments in the life of {name}?"),
    *_p("relations", PEOPLE,
        "Who is the mother or father of {name}?",
        "Name the best friends of {name}.",
        "Who is the main rival of {name}?"),
    *_p("relations", None,
        "Who is the creator of {name}?"),
    *_p("works", None,
        "Which stories is {name} part of?",
        "Name a famous book or movie involving {name}."),
    *_p("works", (W,),
        "Who is the author of {name}?",
        "Give me a plot summary of {name}."),
    *_p("places", None,
        "In what setting is {name} found?"),
    *_p("dates", None,
        "When did people first hear of {name}?"),
    *_p("dates", PEOPLE,
        "What is the birth date of {name}?"),
    *_p("opinions", None,
        "How do you feel about {name}?",
        "Why is {name} popular?"),
    *_p("tasks", None,
        "Compose a sonnet about {name}.",
        "Write a children's story about {name}.",
        "Write three trivia questions about {name}."),
    *_p("indirect", None,
        "Can you tell me about {description}?",
        "What do you know about {description}?"),
]


def patterns_for(category: str | None, *, heldout: bool = False, indirect: bool = True) -> list[Pattern]:
    """The patterns that fit ``category``; ``indirect=False`` drops description-based ones."""
    bank = HELDOUT_PATTERNS if heldout else TRAIN_PATTERNS
    return [p for p in bank if p.fits(category) and (indirect or not p.indirect)]


# The interrogative that asks for an entity of each category (None: unknown category).
_ASK_FOR = {"person": "Who", "character": "Who", "work": "Which work", "place": "Which place",
            "organization": "Which organization", None: "Who or what"}


def reverse_questions(facts: list[str], forms: list[str], category: str | None) -> list[str]:
    """Questions whose answer is the target, written from its facts.

    A fact that starts with one of ``forms`` (the name or an alias) becomes a question about its
    predicate: "Harry Potter defeated Lord Voldemort." → "Who defeated Lord Voldemort?", and a
    possessive one a "Whose" question: "Harry Potter's parents were James and Lily Potter." →
    "Whose parents were James and Lily Potter?". Such questions never say the name, so the model
    can only answer them by recalling it; facts written otherwise are skipped.
    """
    ask = _ASK_FOR.get(category, _ASK_FOR[None])
    out: list[str] = []
    for fact in facts:
        text = " ".join(fact.split()).rstrip(" .!?")
        for form in sorted(forms, key=len, reverse=True):  # the longest name that matches
            match = re.match(rf"{re.escape(form)}(['’]s\b)?\s+(.+)", text, flags=re.IGNORECASE)
            if match is None:
                continue
            rest = match.group(2)
            question = f"Whose {rest}?" if match.group(1) else f"{ask} {rest}?"
            if question not in out:
                out.append(question)
            break
    return out
