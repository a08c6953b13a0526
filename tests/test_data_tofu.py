"""The TOFU loader on the real files in ../shared/data/tofu (skipped where absent)."""

from __future__ import annotations

import json

import pytest

from snap_fast.data.tofu import load_tofu, resolve_tofu_root

try:
    ROOT = resolve_tofu_root()
except FileNotFoundError:
    ROOT = None
needs_tofu = pytest.mark.skipif(ROOT is None, reason="TOFU data not found (../shared/data/tofu or $SNAP_FAST_TOFU)")


def _raw(name):
    return [json.loads(line) for line in (ROOT / name).read_text().splitlines() if line.strip()]


@needs_tofu
@pytest.mark.parametrize("split,n", [("forget01", 40), ("forget05", 200), ("forget10", 400)])
def test_forget_splits_with_perturbed(split, n):
    recs = load_tofu(ROOT, split)
    raw, pert = _raw(f"{split}.json"), _raw(f"{split}_perturbed.json")
    assert len(recs) == n == len(raw)
    assert [r["question"] for r in recs] == [r["question"] for r in raw]
    assert [r["answer"] for r in recs] == [r["answer"] for r in raw]
    by_q = {p["question"]: p for p in pert}
    for r in recs:
        p = by_q[r["question"]]
        assert r["paraphrased_answer"] == p["paraphrased_answer"]
        assert r["paraphrased_question"] == p["paraphrased_question"]
        assert r["perturbed_answers"] == p["perturbed_answer"] and len(r["perturbed_answers"]) >= 2


@needs_tofu
def test_retain_and_extra_sets():
    retain = load_tofu(ROOT, "retain90")
    assert len(retain) == 3600
    with_pert = [r for r in retain if "perturbed_answers" in r]
    pert_questions = {p["question"] for p in _raw("retain_perturbed.json")}
    assert {r["question"] for r in with_pert} == pert_questions & {r["question"] for r in retain}
    assert not ({r["question"] for r in load_tofu(ROOT, "forget10")} & {r["question"] for r in retain})
    authors = load_tofu(ROOT, "real_authors")
    assert len(authors) == 100 and all(len(r["options"]) == 4 and r["answer"] in r["options"] for r in authors)
    assert all(r["answer"] not in r["perturbed_answers"] for r in authors)


def test_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split"):
        load_tofu(tmp_path, "forget50")
    with pytest.raises(FileNotFoundError, match="TOFU"):
        load_tofu(tmp_path / "nowhere", "forget10")
    monkeypatch.setenv("SNAP_FAST_TOFU", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        resolve_tofu_root()
