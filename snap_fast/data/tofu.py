"""TOFU benchmark files (Maini et al., 2024): where they are found, and the one place they are read.

The folder holds ``forget01/05/10.json`` and ``retain90/95/99.json`` (question, answer),
``*_perturbed.json`` companions (paraphrased question and answer, perturbed = wrong answers) for
the forget splits and for 400 retain questions (``retain_perturbed.json``), ``full.json``, and
the ``real_authors`` / ``world_facts`` sets (multiple-choice options). Despite the ``.json``
suffix every file is JSON Lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, read_jsonl, write_json

SPLITS = (
    "forget01", "forget05", "forget10", "retain90", "retain95", "retain99", "full",
    "retain_perturbed", "real_authors", "world_facts",
)


HUB_DATASET = "locuslab/TOFU"
# Shipped with the package: a few authors of every file, lines unchanged (see its NOTICE.md).
SAMPLE_ROOT = Path(__file__).resolve().parent / "resources" / "tofu_sample"
# Questions the sample keeps: the first two authors (retain side) and the last four (all of
# forget01, the tail of forget05/10), 20 questions each in full.json's order.
_SAMPLE_FULL_ROWS = (slice(0, 40), slice(3920, 4000))
_SAMPLE_OPTION_ROWS = 20  # real_authors / world_facts: the first records
_FILES = (*SPLITS, "forget01_perturbed", "forget05_perturbed", "forget10_perturbed",
          "real_authors_perturbed", "world_facts_perturbed")


def _sibling_folders() -> list[Path]:
    """``shared/data/tofu`` beside the repository and beside the current directory."""
    repo = Path(__file__).resolve().parents[2]
    return [repo.parent / "shared" / "data" / "tofu", Path.cwd().parent / "shared" / "data" / "tofu"]


def _is_tofu_folder(path: Path) -> bool:
    return (path / "forget10.json").is_file() or (path / "full.json").is_file()


def _from_hub() -> Path | None:
    """The dataset's JSON files from the Hugging Face hub (cached by huggingface_hub), or None
    when offline (``HF_HUB_OFFLINE=1``, no network) and nothing is cached."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(HUB_DATASET, repo_type="dataset", allow_patterns=["*.json"]))
    except Exception:  # noqa: BLE001 - no network, hub down, or no such repo: try the next place
        return None


def resolve_tofu_root(root: str | os.PathLike | None = None, *, hub: bool = True, sample: bool = True) -> Path:
    """The TOFU folder, from the first of these that has the files:

    1. ``root``, when given, else ``$SNAP_FAST_TOFU``, when set (then nothing else is tried: a
       folder asked for that has no TOFU files is an error);
    2. ``../shared/data/tofu`` beside the repository or the current directory;
    3. the hub dataset ``locuslab/TOFU`` (``hub=True`` and online; cached by huggingface_hub);
    4. the sample shipped with the package (``sample=True``; a warning says it is a sample):
       a few authors of every file, enough for tests and smoke runs, not for reported numbers.

    Raises FileNotFoundError naming every place tried.
    """
    explicit = root if root is not None else os.environ.get("SNAP_FAST_TOFU") or None
    if explicit is not None:  # asked for one folder: that one or an error, never a silent substitute
        if _is_tofu_folder(Path(explicit)):
            return Path(explicit)
        source = "root" if root is not None else "$SNAP_FAST_TOFU"
        raise FileNotFoundError(f"TOFU data folder not found: {source} = {explicit} has no forget10.json or full.json")
    candidates = _sibling_folders()
    for c in candidates:
        if _is_tofu_folder(c):
            return c
    tried = [str(c) for c in candidates]
    if hub:
        found = _from_hub()
        if found is not None and _is_tofu_folder(found):
            return found
        tried.append(f"hub {HUB_DATASET}")
    if sample and _is_tofu_folder(SAMPLE_ROOT):
        warnings.warn(f"TOFU: using the {SAMPLE_ROOT.name} shipped with snap_fast (a few authors of each file); "
                      "set SNAP_FAST_TOFU to the full release for real numbers", stacklevel=2)
        return SAMPLE_ROOT
    raise FileNotFoundError(
        "TOFU data folder not found (tried: " + ", ".join(tried) + "); pass root= or set SNAP_FAST_TOFU"
    )


def is_tofu_sample(root: str | os.PathLike) -> bool:
    """True for a folder written by :func:`write_tofu_sample` (it has a ``MANIFEST.json``)."""
    return (Path(root) / "MANIFEST.json").is_file()


def write_tofu_sample(source: str | os.PathLike, out: str | os.PathLike) -> dict[str, int]:
    """Write the package's TOFU sample from a full release folder ``source`` into ``out``.

    Every line is copied unchanged from the release: the rows of ``full.json`` in
    ``_SAMPLE_FULL_ROWS`` decide which QA lines of every split (and of its ``_perturbed``
    companion) are kept; real_authors / world_facts keep their first ``_SAMPLE_OPTION_ROWS``
    records and the matching perturbed lines. ``MANIFEST.json`` records the line count and the
    source file's SHA-256 of each file. Returns the line counts.
    """
    source, out = Path(source), Path(out)
    if not (source / "full.json").is_file():
        raise FileNotFoundError(f"source: no full.json in {source}")
    full = (source / "full.json").read_text(encoding="utf-8").splitlines()
    keep = {json.loads(line)["question"] for rows in _SAMPLE_FULL_ROWS for line in full[rows]}
    for name in ("real_authors", "world_facts"):
        lines = [x for x in (source / f"{name}.json").read_text(encoding="utf-8").splitlines() if x.strip()]
        keep |= {json.loads(line)["question"] for line in lines[:_SAMPLE_OPTION_ROWS]}
    counts, hashes = {}, {}
    for name in _FILES:
        src = source / f"{name}.json"
        data = src.read_bytes()
        kept = [line for line in data.decode("utf-8").splitlines()
                if line.strip() and json.loads(line)["question"] in keep]
        atomic_write_text(out / src.name, "".join(line + "\n" for line in kept))
        counts[src.name], hashes[src.name] = len(kept), hashlib.sha256(data).hexdigest()
    write_json(out / "MANIFEST.json", {"dataset": HUB_DATASET, "licence": "MIT", "lines": counts,
                                       "source_sha256": hashes})
    return counts


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


#: The files the TOFU metrics read per split (the Hugging Face dataset "locuslab/TOFU" layout).
EVAL_SPLIT_FILES = {
    "retain": "retain_perturbed.json",
    "real_authors": "real_authors_perturbed.json",
    "world_facts": "world_facts_perturbed.json",
    "forget01": "forget01_perturbed.json",
    "forget05": "forget05_perturbed.json",
    "forget10": "forget10_perturbed.json",
}


def load_tofu_eval_split(folder: str | os.PathLike, split: str, limit: int | None = None) -> list[dict]:
    """Records of one TOFU split: ``{"question", "answer", "paraphrased_answer"?,
    "perturbed_answer": [...]}``, read from the JSON-lines file of :data:`EVAL_SPLIT_FILES` as released (what the TOFU
    metrics read: every record has its paraphrased and perturbed answers).

    ``limit`` keeps the first ``limit`` records (for quick runs and tests).
    """
    if split not in EVAL_SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(EVAL_SPLIT_FILES)}, got {split!r}")
    path = Path(folder) / EVAL_SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"TOFU file not found: {path}")
    records = read_jsonl(path)[:limit] if limit is not None else read_jsonl(path)
    for i, rec in enumerate(records, 1):
        for key in ("question", "answer", "perturbed_answer"):
            if key not in rec:
                raise ValueError(f"{path}: record {i}: missing key {key!r}")
    return records
