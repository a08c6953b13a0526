"""Loader for the TOFU benchmark files (Maini et al., 2024) in their released JSONL layout.

The folder holds ``forget01/05/10.json`` and ``retain90/95/99.json`` (question, answer),
``*_perturbed.json`` companions (paraphrased question and answer, perturbed = wrong answers) for
the forget splits and for 400 retain questions (``retain_perturbed.json``), ``full.json``, and
the ``real_authors`` / ``world_facts`` sets (multiple-choice options). Despite the ``.json``
suffix every file is JSON Lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .io import read_jsonl

SPLITS = (
    "forget01", "forget05", "forget10", "retain90", "retain95", "retain99", "full",
    "retain_perturbed", "real_authors", "world_facts",
)


def resolve_tofu_root(root: str | os.PathLike | None = None) -> Path:
    """The TOFU folder: ``root`` if given, else ``$SNAP_FAST_TOFU``, else ``../shared/data/tofu``
    next to the repository (or the current directory). Raises FileNotFoundError naming every
    place tried."""
    if root is not None:
        candidates = [Path(root)]
    elif os.environ.get("SNAP_FAST_TOFU"):
        candidates = [Path(os.environ["SNAP_FAST_TOFU"])]
    else:
        repo = Path(__file__).resolve().parents[2]
        candidates = [repo.parent / "shared" / "data" / "tofu", Path.cwd().parent / "shared" / "data" / "tofu"]
    for c in candidates:
        if (c / "forget10.json").is_file() or (c / "full.json").is_file():
            return c
    raise FileNotFoundError(
        "TOFU data folder not found (tried: " + ", ".join(str(c) for c in candidates)
        + "); pass root= or set SNAP_FAST_TOFU"
    )


def _companion(root: Path, split: str) -> Path | None:
    if split.startswith("forget") or split in ("real_authors", "world_facts"):
        path = root / f"{split}_perturbed.json"
    elif split.startswith("retain") or split == "full":
        path = root / "retain_perturbed.json"
    else:
        return None
    return path if path.is_file() else None


def load_tofu(root: str | os.PathLike | None = None, split: str = "forget10") -> list[dict[str, Any]]:
    """Records of one TOFU split, in file order.

    Each record: ``id`` ("tofu-<split>-<i>"), ``question``, ``answer``; and where the companion
    ``*_perturbed`` file has the question: ``paraphrased_question``, ``paraphrased_answer``,
    ``perturbed_answers`` (list of wrong answers); for real_authors / world_facts also
    ``options`` (the four choices). Only the keys present are set.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = resolve_tofu_root(root)
    path = root / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"TOFU split file not found: {path}")
    extra: dict[str, dict[str, Any]] = {}
    companion = _companion(root, split) if split != "retain_perturbed" else None
    if companion is not None:
        extra = {r["question"]: r for r in read_jsonl(companion)}
    out = []
    for i, rec in enumerate(read_jsonl(path)):
        if not isinstance(rec.get("question"), str) or "answer" not in rec:
            raise ValueError(f"{path}: record {i + 1} lacks question/answer")
        item: dict[str, Any] = {"id": f"tofu-{split}-{i}", "question": rec["question"], "answer": rec["answer"]}
        options = [rec[k] for k in ("option1", "option2", "option3", "option4") if k in rec]
        if options:
            item["options"] = options
        src = extra.get(rec["question"], rec)
        for key_in, key_out in (("paraphrased_question", "paraphrased_question"),
                                ("paraphrased_answer", "paraphrased_answer"),
                                ("perturbed_answer", "perturbed_answers")):
            if key_in in src:
                item[key_out] = src[key_in]
        out.append(item)
    return out
