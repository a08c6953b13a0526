"""The TOFU loader and where it finds the data: the full release when one is found (an explicit
folder, $SNAP_FAST_TOFU, ../shared/data/tofu, the hub), else the sample shipped with the package,
so these tests run on a bare clone too."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest

from snap_fast.data import tofu
from snap_fast.data.tofu import (
    SAMPLE_ROOT,
    is_tofu_sample,
    load_tofu,
    resolve_tofu_root,
    write_tofu_sample,
)

try:
    with warnings.catch_warnings():  # the sample's warning is for users, not for collection
        warnings.simplefilter("ignore")
        ROOT = resolve_tofu_root(hub=False)
except FileNotFoundError:
    ROOT = None
needs_tofu = pytest.mark.skipif(ROOT is None, reason="no TOFU data: neither a full copy (../shared/data/tofu, "
                                "$SNAP_FAST_TOFU) nor the package's tofu_sample folder was found")
# Line counts of the full release (Maini et al., 2024); the sample lists its own in MANIFEST.json.
RELEASE_LINES = {"forget01.json": 40, "forget05.json": 200, "forget10.json": 400, "retain90.json": 3600,
                 "real_authors.json": 100}


def _raw(root, name):
    return [json.loads(line) for line in (root / name).read_text().splitlines() if line.strip()]


def _expected_lines(root):
    if is_tofu_sample(root):
        return json.loads((root / "MANIFEST.json").read_text())["lines"]
    return RELEASE_LINES


@needs_tofu
@pytest.mark.parametrize("split", ["forget01", "forget05", "forget10"])
def test_forget_splits_with_perturbed(split):
    recs = load_tofu(ROOT, split)
    raw, pert = _raw(ROOT, f"{split}.json"), _raw(ROOT, f"{split}_perturbed.json")
    assert len(recs) == len(raw) == _expected_lines(ROOT)[f"{split}.json"]
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
    assert len(retain) == _expected_lines(ROOT)["retain90.json"]
    with_pert = [r for r in retain if "perturbed_answers" in r]
    pert_questions = {p["question"] for p in _raw(ROOT, "retain_perturbed.json")}
    assert with_pert and {r["question"] for r in with_pert} == pert_questions & {r["question"] for r in retain}
    assert not ({r["question"] for r in load_tofu(ROOT, "forget10")} & {r["question"] for r in retain})
    authors = load_tofu(ROOT, "real_authors")
    assert len(authors) == _expected_lines(ROOT)["real_authors.json"]
    assert all(len(r["options"]) == 4 and r["answer"] in r["options"] for r in authors)
    assert all(r["answer"] not in r["perturbed_answers"] for r in authors)


def test_the_shipped_sample_is_consistent():
    manifest = json.loads((SAMPLE_ROOT / "MANIFEST.json").read_text())
    assert (SAMPLE_ROOT / "LICENSE").read_text().startswith("MIT License")
    for name, count in manifest["lines"].items():
        assert len(_raw(SAMPLE_ROOT, name)) == count, name
    full = {r["question"] for r in _raw(SAMPLE_ROOT, "full.json")}
    for split in ("forget01", "forget05", "forget10", "retain90", "retain95", "retain99"):
        assert {r["question"] for r in _raw(SAMPLE_ROOT, f"{split}.json")} <= full, split
    assert manifest["lines"]["forget01.json"] == RELEASE_LINES["forget01.json"]  # forget01 is whole


def test_the_sample_is_cut_unchanged_from_the_release(tmp_path):
    try:
        release = resolve_tofu_root(hub=False, sample=False)
    except FileNotFoundError:
        pytest.skip("no full TOFU release found (../shared/data/tofu or $SNAP_FAST_TOFU) to compare the sample with")
    manifest = json.loads((SAMPLE_ROOT / "MANIFEST.json").read_text())
    for name, digest in manifest["source_sha256"].items():
        assert hashlib.sha256((release / name).read_bytes()).hexdigest() == digest, name
    counts = write_tofu_sample(release, tmp_path / "sample")
    assert counts == manifest["lines"]
    for name in counts:  # byte for byte, and every line is a line of the release file
        assert (tmp_path / "sample" / name).read_bytes() == (SAMPLE_ROOT / name).read_bytes(), name
        assert set((SAMPLE_ROOT / name).read_text().splitlines()) <= set((release / name).read_text().splitlines())


def _no_local_copies(monkeypatch):
    monkeypatch.delenv("SNAP_FAST_TOFU", raising=False)
    monkeypatch.setattr(tofu, "_sibling_folders", list)


def test_resolution_order(tmp_path, monkeypatch):
    _no_local_copies(monkeypatch)
    hub_copy, env_copy = tmp_path / "hub", tmp_path / "env"
    for folder in (hub_copy, env_copy):
        folder.mkdir()
        (folder / "full.json").write_text('{"question": "q", "answer": "a"}\n')
    monkeypatch.setattr(tofu, "_from_hub", lambda: hub_copy)
    assert resolve_tofu_root() == hub_copy
    monkeypatch.setenv("SNAP_FAST_TOFU", str(env_copy))
    assert resolve_tofu_root() == env_copy  # the environment before the hub
    assert resolve_tofu_root(hub_copy) == hub_copy  # an explicit folder before everything
    monkeypatch.setenv("SNAP_FAST_TOFU", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"\$SNAP_FAST_TOFU = .*empty"):  # asked for, not found
        resolve_tofu_root()
    monkeypatch.delenv("SNAP_FAST_TOFU")
    monkeypatch.setattr(tofu, "_from_hub", lambda: None)  # offline
    with pytest.warns(UserWarning, match="tofu_sample"):
        assert resolve_tofu_root() == SAMPLE_ROOT
    with pytest.raises(FileNotFoundError, match=r"hub locuslab/TOFU"):
        resolve_tofu_root(sample=False)
    calls = []
    monkeypatch.setattr(tofu, "_from_hub", lambda: calls.append(1))
    with pytest.warns(UserWarning):
        resolve_tofu_root(hub=False)
    assert not calls


def test_offline_hub_is_not_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub asked while offline"))
    assert tofu._from_hub() is None


def test_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split"):
        load_tofu(tmp_path, "forget50")
    with pytest.raises(FileNotFoundError, match="TOFU"):
        load_tofu(tmp_path / "nowhere", "forget10")
    with pytest.raises(FileNotFoundError, match=f"root = {tmp_path / 'nowhere'}"):
        resolve_tofu_root(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="source"):
        write_tofu_sample(tmp_path, tmp_path / "out")
