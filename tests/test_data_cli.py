"""``snap-fast data`` end to end on a tiny local model, and its error paths."""

from __future__ import annotations

import json

import pytest

from snap_fast.cli import main
from snap_fast.io import read_jsonl
from tests.helpers import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SNAP_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "data"
    argv = ["data", "--model", str(tiny_model_dir), "--target", "Harry Potter", "--out", str(out),
            "--n-forget", "12", "--n-retain", "8", "--n-general", "4", "--n-heldout-forget", "4",
            "--n-heldout-retain", "4", "--n-heldout-general", "2", "--max-new-tokens", "2",
            "--batch-size", "16", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "forget" in printed and "neighbours (builtin)" in printed and "original answers: 34 generated" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["forget"] == 12 and manifest["model_identity"].startswith("model-")
    target = json.loads((out / "target.json").read_text())
    assert target["name"] == "Harry Potter" and "the Boy Who Lived" in target["aliases"]
    assert all(r["original_response"] is not None for r in read_jsonl(out / "retain.jsonl"))
    # the same command again: refused without --overwrite, answers from the cache with it
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert "0 generated, 34 from cache" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (["data", "--target", "   ", "--out", out], "empty"),
        (["data", "--out", out], "--target"),
        (["data", "--target", "X", "--neighbours", "Y", "--out", out, "--forget-jsonl", str(tmp_path / "nope.jsonl")],
         "--forget-jsonl"),
        (["data", "--target", "X", "--neighbours", "Y", "--out", out, "--generator", "endpoint"], "--endpoint"),
        (["data", "--target", "X", "--neighbours", "Y", "--out", out, "--n-forget", "0"], "--n-forget"),
        (["data", "--target", "X", "--neighbours", "Y", "--out", out, "--model", str(tmp_path / "missing")],
         "not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_cli_unreachable_endpoint(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    argv = ["data", "--target", "X", "--neighbours", "Y", "--out", str(tmp_path / "o"), "--no-originals",
            "--endpoint", url, "--endpoint-model", "m", "--no-progress"]
    import snap_fast.data.generators as gens

    real_init = gens.EndpointGenerator.__init__

    def fast_init(self, *a, **k):  # keep the retry loop, drop the real back-off delays
        real_init(self, *a, **{**k, "backoff": 0.01, "retries": 2})

    gens.EndpointGenerator.__init__ = fast_init
    try:
        assert main(argv) == 1
    finally:
        gens.EndpointGenerator.__init__ = real_init
    err = capsys.readouterr().err
    assert url in err and "unreachable" in err
