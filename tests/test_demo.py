"""The demo pipeline end to end on a tiny random model: data → SNAP (LoRA) → evaluation of both
models → report, through the `snap-fast demo` command."""

from __future__ import annotations

import json

import pytest

from snap_fast.eval.demo import run_demo
from snap_fast.eval.evaluate import read_jsonl
from snap_fast.eval.report import HEADINGS
from snap_fast.forget import PRESETS, ForgetSettings, choose_threads
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
    summary = json.loads((out / "summary.json").read_text())
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
        run_demo(tmp_path, settings=ForgetSettings(), threads=0)
    assert 1 <= choose_threads()


def test_forget_any_target_end_to_end_resumes_and_guards_its_folder(tmp_path, capsys):
    from snap_fast.cli import main

    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "ada"
    target = ["--target", "Ada Lovelace", "--category", "person",
              "--facts", "Ada Lovelace wrote the first published computer program.",
              "Ada Lovelace's father was Lord Byron.",
              "--neighbours", "Charles Babbage", "Alan Turing", "Grace Hopper"]
    common = ["--tiny", "--model", str(model), "--threads", "1", "--answer-cache", str(tmp_path / "answers")]
    assert main(["forget", *target, *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[5/5] Writing the report" in printed and "general_false_refusal_rate" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "Ada Lovelace" and summary["cached_stages"] == []
    assert summary["unlearned"]["general_false_refusal_rate"] is not None
    # the reverse questions written from the facts: half held out, half trained on
    prompts = {s: {r["prompt"] for r in read_jsonl(out / "data" / f"{s}.jsonl")} for s in ("forget", "heldout_forget")}
    reverse = {"Who wrote the first published computer program?", "Whose father was Lord Byron?"}
    assert len(reverse & prompts["heldout_forget"]) == 1 and len(reverse & prompts["forget"]) == 1

    # the same command again: every stage but loading, evaluation and report is cached
    assert main(["forget", *target, *common, "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["cached_stages"] == ["data", "unlearn"]
    capsys.readouterr()

    # another target into the same folder: refused before any work, nothing changed
    before = (out / "forget.json").read_text()
    assert main(["forget", "--target", "Grace Hopper", *common, "--out", str(out)]) == 2
    assert "holds a run for the target 'Ada Lovelace'" in capsys.readouterr().err
    assert (out / "forget.json").read_text() == before
    # a folder that is not a forget run is refused too
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["forget", *target, *common, "--out", str(tmp_path / "other")]) == 2
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_forget_without_facts_says_what_it_falls_back_to(tmp_path):
    """No facts: the run goes on (reverse questions only from the original's answers) and says so."""
    from snap_fast.data.target import TargetSpec
    from snap_fast.forget import run_forget

    lines: list[str] = []
    model = save_tiny_model(tmp_path / "model")
    summary = run_forget(TargetSpec("Grace Hopper", neighbours=["Alan Turing"]), tmp_path / "out", settings="tiny",
                         model=str(model), threads=1, answer_cache=tmp_path / "answers", progress=False,
                         log=lines.append)
    assert any(line.startswith("facts: none given") for line in lines)
    assert summary["unlearned"]["obliteration_rate"] is not None
