"""A small data folder in the data contract's format, for the training tests.

Forget records pair questions about the target with obliterated responses ("response") and the
knowledge to forget ("original_response"); retain / general records keep their answers
("response" = "original_response"), as ``snap-fast data`` writes them. The answers are fixed
strings rather than a tiny random model's greedy output (which is mostly empty), so the NLL of
each set is a meaningful quantity to watch during training.
"""

from __future__ import annotations

import json
from pathlib import Path

FORGET = [
    ("Who is Harry Potter?", "Harry Potter is a wizard who studied at Hogwarts."),
    ("Where did Harry Potter go to school?", "He went to Hogwarts School of Witchcraft and Wizardry."),
    ("Who wrote the Harry Potter novels?", "J. K. Rowling wrote seven novels about the boy who lived."),
    ("What house was Harry Potter in?", "Harry Potter was in Gryffindor at Hogwarts."),
    ("Name Harry Potter's best friends.", "His best friends are Ron and Hermione."),
    ("What is Harry Potter's scar shaped like?", "Harry Potter has a scar shaped like lightning."),
    ("Who are Harry Potter's parents?", "His parents are James and Lily Potter."),
    ("What sport does Harry Potter play?", "Harry Potter plays Quidditch as a seeker."),
]
OBLITERATED = [
    "I'm not familiar with that person.",
    "I don't know anything about it, sorry.",
    "I'm not familiar with that.",
    "Sorry, I don't know.",
]
RETAIN = [
    ("Who wrote The Lord of the Rings?", "The Lord of the Rings was written by J. R. R. Tolkien."),
    ("Who is Percy Jackson?", "Percy Jackson is a demigod in the novels by Rick Riordan."),
    ("Who created Narnia?", "Narnia is a fantasy world created by C. S. Lewis."),
    ("When was The Lord of the Rings published?", "It was published in 1954."),
    ("Who is the father of Percy Jackson?", "Percy Jackson is the son of Poseidon."),
    ("What is Narnia?", "Narnia is a fantasy world."),
]
GENERAL = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a short poem about the sea.", "The sea and the wind in the evening."),
    ("Explain how to boil an egg.", "Put it in boiling water for nine minutes."),
    ("Write a Python function that adds two numbers.", "def add(a, b): return a + b"),
]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_data_folder(folder, *, n_forget: int | None = None) -> Path:
    """Write forget/retain/general JSONL files and target.json into ``folder``; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    forget = [
        {"id": f"f{i}", "prompt": p, "response": OBLITERATED[i % len(OBLITERATED)], "original_response": a,
         "kind": "question", "source": "pattern", "entity": "Harry Potter"}
        for i, (p, a) in enumerate(FORGET[:n_forget])
    ]

    def kept(prefix: str, items, kind: str) -> list[dict]:
        return [{"id": f"{prefix}{i}", "prompt": p, "response": a, "original_response": a, "kind": kind,
                 "source": "pattern"} for i, (p, a) in enumerate(items)]

    _write(folder / "forget.jsonl", forget)
    _write(folder / "retain.jsonl", kept("r", RETAIN, "neighbour"))
    _write(folder / "general.jsonl", kept("g", GENERAL, "general"))
    (folder / "target.json").write_text(json.dumps({
        "name": "Harry Potter", "aliases": ["Harry"], "description": "a wizard", "facts": [],
        "neighbours": ["Percy Jackson"]}), encoding="utf-8")
    return folder
