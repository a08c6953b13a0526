"""The demo pipeline end to end on a tiny random model: data → SNAP (LoRA) → evaluation of both
models → report, through the `snap-fast demo` command."""

from __future__ import annotations

import json

import pytest

from snap_fast.eval.demo import PRESETS, DemoSettings, choose_threads, run_demo
from snap_fast.eval.evaluate import read_jsonl
from snap_fast.eval.report import HEADINGS
from tests.eval_helpers import one_thread  # noqa: F401
from tests.helpers import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_tiny_end_to_end(tmp_path, capsys):
    from snap_fast.cli import main

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--model", str(model), "--out", str(out), "--threads", "1",
                 "--answer-cache", str(tmp_path / "answers")]) == 0
    printed = capsys.readouterr().out
    for n, stage in enumerate(["Loading the model", "Building the data", "Unlearning with SNAP",
                               "Evaluating", "Writing the report"], 1):
        assert f"[{n}/5] {stage}" in printed
    assert "before:" in printed and "after:" in printed and "obliteration_rate" in printed

    tiny = PRESETS["tiny"]
    assert len(read_jsonl(out / "data" / "forget.jsonl")) == tiny.n_forget
    assert len(read_jsonl(out / "data" / "heldout_forget.jsonl")) == tiny.n_heldout_forget
    metrics = read_jsonl(out / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, tiny.max_steps + 1))
    assert (out / "run" / "final" / "adapter" / "adapter_config.json").is_file()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["preset"] == "tiny"  # the CLI passes the preset's settings: still named
    assert set(summary["timings_s"]) >= {"load", "data", "unlearn", "eval", "report", "total"}
    assert summary["original"]["perplexity"] > 1.0 and summary["unlearned"]["perplexity"] > 1.0
    assert (tmp_path / "answers").is_dir()  # original answers cached where asked
    for key in ("obliteration_rate", "retain_rougeL_recall", "forget_rougeL_recall"):
        assert 0.0 <= summary["unlearned"][key] <= 1.0
    page = (out / "report" / "report.html").read_text()
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    unl = json.loads((out / "eval" / "unlearned" / "summary.json").read_text())
    assert "+adapter-" in unl["model"] and unl["sets"]["heldout_forget"]["n"] == tiny.n_heldout_forget


def test_demo_bad_input(tmp_path):
    with pytest.raises(ValueError, match="settings"):
        run_demo(tmp_path, settings="huge")
    with pytest.raises(TypeError, match="settings"):
        run_demo(tmp_path, settings=3)
    with pytest.raises(ValueError, match="threads"):
        run_demo(tmp_path, settings=DemoSettings(), threads=0)
    assert 1 <= choose_threads()
