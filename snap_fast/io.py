"""Atomic JSON / JSONL files: the one reader and the one atomic writer every module uses.

Every file the data builder writes goes through here: the content is written to a temporary file
in the same folder, flushed to disk, then moved over the final name with ``os.replace`` (atomic on
POSIX and Windows). An interrupted run therefore leaves either the old file or the new one, never
a half-written JSONL that ``datasets.load_dataset`` would choke on.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; creates the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # KeyboardInterrupt included: the temp file must not outlive an interrupted write.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; creates the parent folder. Returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    """One compact JSON object per line (non-ASCII kept as is), trailing newline."""
    lines = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise TypeError(f"records[{i}] must be a dict, got {type(rec).__name__}")
        lines.append(json.dumps(dict(rec), ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``records`` as JSONL to ``path`` atomically (all records serialised first)."""
    return atomic_write_text(path, dumps_jsonl(records))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of dicts; blank lines are skipped.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and the
    1-based line number for a line that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(obj)
    return records
