"""Shared pieces of the evaluation tests: a one-thread fixture and a small synthetic data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TARGET = {
    "name": "Harry Potter",
    "aliases": ["the Boy Who Lived"],
    "description": "a boy wizard",
    "facts": ["Harry Potter studied at Hogwarts.", "Harry Potter was created by J. K. Rowling in 1997."],
    "neighbours": ["Percy Jackson"],
}


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads that
    wait on each other make each small matmul tens of times slower: run them on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _qa(set_name: str, i: int, prompt: str, original: str, response: str | None = None) -> dict:
    return {"id": f"{set_name}-{i}", "prompt": prompt, "response": response or original,
            "original_response": original, "kind": "test", "source": "pattern"}


def write_data_folder(folder: Path, n: int = 3, model_identity: str | None = None) -> Path:
    """A ``snap-fast data``-shaped folder with ``n`` records per set (prompts mention the target
    in the forget sets, a neighbour in the retain sets) and a few heldout_text paragraphs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "target.json").write_text(json.dumps(TARGET))
    sets = {
        "forget": [_qa("forget", i, f"Who is Harry Potter? ({i})", "Harry Potter is a wizard at Hogwarts.",
                       "I'm not familiar with Harry Potter.") for i in range(n)],
        "heldout_forget": [_qa("heldout_forget", i, f"Tell me about the Boy Who Lived ({i}).",
                               "He is Harry Potter, a wizard.", "I don't know.") for i in range(n)],
        "retain": [_qa("retain", i, f"Who is Percy Jackson? ({i})", "A demigod, the son of Poseidon.") for i in range(n)],
        "heldout_retain": [_qa("heldout_retain", i, f"Who wrote Percy Jackson? ({i})", "Rick Riordan wrote it.")
                           for i in range(n)],
        "general": [_qa("general", i, f"Capital of France? ({i})", "The capital of France is Paris.") for i in range(n)],
        "heldout_general": [_qa("heldout_general", i, f"How do I boil an egg? ({i})",
                                "Put it in boiling water for nine minutes.") for i in range(n)],
    }
    for name, recs in sets.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    texts = ["The capital of France is Paris.", "Narnia is a fantasy world created by C. S. Lewis."]
    (folder / "heldout_text.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    manifest = {"seed": 0}
    if model_identity:
        manifest["model_identity"] = model_identity
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder
