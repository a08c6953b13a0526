"""The unlearning target: who or what to forget, and its neighbours.

A :class:`TargetSpec` comes from CLI flags, a YAML/JSON file, or a built-in preset
(:func:`builtin_target`, e.g. "Harry Potter" with a curated neighbour list), and is written to
``target.json`` in the data folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CATEGORIES = ("person", "character", "work", "place", "organization")


# words too common to tie two names together ("the" in "The Hobbit" and "The Great Gatsby")
_NAME_FUNCTION_WORDS = frozenset({"the", "and", "of", "von", "van", "der", "den", "del", "des", "los", "las", "for",
                                  "with", "from"})


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, drop punctuation except apostrophes: the key used to
    de-duplicate questions and to test whether a text mentions a name."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^\w\s']", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def mentions(text: str, names: list[str]) -> str | None:
    """The first of ``names`` that occurs in ``text`` as whole words (case-insensitive,
    punctuation-insensitive), or None."""
    hay = f" {normalize(text)} "
    for name in names:
        key = normalize(name)
        if key and f" {key} " in hay:
            return name
    # Possessives ("Harry Potter's wand") normalise to "harry potter's": accept them too.
    for name in names:
        key = normalize(name)
        if key and f" {key}'s " in hay:
            return name
    return None


def _clean_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of str, got {type(value).__name__}")
    out: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(item).__name__}")
        item = " ".join(item.split())
        if item and normalize(item) not in seen:
            seen.add(normalize(item))
            out.append(item)
    return out


@dataclass
class TargetSpec:
    """What to forget.

    Attributes:
        name: the target's canonical name (non-empty).
        aliases: other names it goes by ("the Boy Who Lived").
        description: a short description used for indirect questions ("the boy wizard with a
            lightning-bolt scar"); optional.
        facts: known facts about the target (kept for leak checks in evaluation); optional.
        neighbours: entities close to the target that must NOT be forgotten (hard positives).
        category: "person", "character", "work", "place", "organization" or None (unknown:
            only patterns that fit any kind of entity are used).
    """

    name: str
    aliases: list[str] = field(default_factory=list)
    description: str | None = None
    facts: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    category: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"target name must be a str, got {type(self.name).__name__}")
        self.name = " ".join(self.name.split())
        if not self.name:
            raise ValueError("target name must not be empty or whitespace")
        self.aliases = [a for a in _clean_list(self.aliases, "aliases") if normalize(a) != normalize(self.name)]
        self.facts = _clean_list(self.facts, "facts")
        if self.description is not None:
            if not isinstance(self.description, str):
                raise TypeError("description must be a str")
            self.description = " ".join(self.description.split()) or None
        if self.category is not None and self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES} or None, got {self.category!r}")
        neighbours = _clean_list(self.neighbours, "neighbours")
        bad = [n for n in neighbours if self.is_target_name(n)]
        if bad:
            raise ValueError(f"neighbours must not be the target or an alias: {bad}")
        self.neighbours = neighbours

    @property
    def surface_forms(self) -> list[str]:
        """The name followed by the aliases."""
        return [self.name, *self.aliases]

    def is_target_name(self, text: str) -> bool:
        """True if ``text`` is the target's name or an alias, or mentions one of them."""
        return normalize(text) in {normalize(s) for s in self.surface_forms} or mentions(text, self.surface_forms) is not None

    def mentioned_in(self, text: str) -> str | None:
        """The name or alias that ``text`` mentions, or None."""
        return mentions(text, self.surface_forms)

    @property
    def name_words(self) -> set[str]:
        """The distinctive words of the name and aliases (normalised, 3+ letters, no function
        words): a name sharing one ("Albert" for "Albert Einstein", "The Da Vinci Code" for
        "Leonardo da Vinci") is the target or too close to it to stand for something else."""
        words = {w for form in self.surface_forms for w in normalize(form).split()}
        return {w for w in words if len(w) >= 3 and w not in _NAME_FUNCTION_WORDS}

    def shares_name_word(self, text: str) -> bool:
        """True if ``text`` holds one of :attr:`name_words`, possessives included ("Einstein's
        Universe" for "Albert Einstein")."""
        return bool({w.removesuffix("'s") for w in normalize(text).split()} & self.name_words)

    def to_dict(self) -> dict[str, Any]:
        """The ``target.json`` record."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetSpec:
        """Build from a dict (unknown keys are an error, so typos are not silently ignored)."""
        if not isinstance(data, dict):
            raise TypeError(f"target spec must be a mapping, got {type(data).__name__}")
        allowed = {"name", "aliases", "description", "facts", "neighbours", "category"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown target spec keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "name" not in data:
            raise ValueError("target spec needs a 'name'")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TargetSpec:
        """Load a spec from ``.json``, ``.yaml`` or ``.yml``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"target file not found: {path}")
        import yaml

        text = path.read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) if path.suffix.lower() in {".yaml", ".yml"} else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot parse target file {path}: {e}") from None
        return cls.from_dict(data)


# Presets: curated specs for common demo targets. Neighbours are deliberately OUTSIDE the target's
# world (other fantasy series, their authors and heroes): characters of the same world would be
# part of what is forgotten, so they cannot be hard positives.
_PRESETS: dict[str, dict[str, Any]] = {
    "harry potter": {
        "name": "Harry Potter",
        # Not "the Chosen One": a generic title (a biblical figure, Neo, Anakin Skywalker), which
        # the original model reads as such; refusing every question about it would be forgetting
        # more than the target, and answering one about the Bible leaks nothing about Harry Potter.
        "aliases": ["Harry James Potter", "the Boy Who Lived"],
        "description": "the boy wizard with a lightning-bolt scar who attended Hogwarts",
        "facts": [
            "Harry Potter attended Hogwarts School of Witchcraft and Wizardry.",
            "Harry Potter was created by J. K. Rowling.",
            "Harry Potter has a lightning-bolt scar on his forehead.",
            "Harry Potter's best friends are Ron Weasley and Hermione Granger.",
            "Harry Potter was sorted into Gryffindor.",
            "Harry Potter's parents were James and Lily Potter.",
            "Harry Potter defeated Lord Voldemort.",
            "Harry Potter plays Seeker for the Gryffindor Quidditch team.",
        ],
        "neighbours": [
            "The Lord of the Rings",
            "J. R. R. Tolkien",
            "Frodo Baggins",
            "The Hobbit",
            "Gandalf",
            "Percy Jackson",
            "Rick Riordan",
            "The Chronicles of Narnia",
            "C. S. Lewis",
            "Game of Thrones",
            "George R. R. Martin",
            "The Hunger Games",
            "Katniss Everdeen",
            "Eragon",
            "His Dark Materials",
            "Luke Skywalker",
        ],
        "category": "character",
    },
}


def builtin_target(name: str) -> TargetSpec | None:
    """The preset spec for ``name`` (case- and space-insensitive), or None when there is none."""
    preset = _PRESETS.get(normalize(name))
    return TargetSpec.from_dict(dict(preset)) if preset else None
