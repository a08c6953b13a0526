"""``snap-fast tofu`` on a tiny model and the shipped TOFU sample: every stage, the cache, the
folder guard, bad settings, and the fine-tuning step against a hand-written loop."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from snap_fast.data.tofu import SAMPLE_ROOT, load_tofu
from snap_fast.tofu import (
    PRESETS,
    finetune,
    resolve_settings,
    run_tofu,
    tofu_data_folder,
)
from tests.eval_helpers import one_thread  # noqa: F401
from tests.helpers import make_tiny_llama, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bad_settings_fail_before_any_work(tmp_path):
    for bad, pattern in [(replace(PRESETS["tiny"], forget_split="forget02"), "forget_split"),
                         (replace(PRESETS["tiny"], methods=("snap", "rmu")), "methods"),
                         (replace(PRESETS["tiny"], limit=0), "limit"),
                         (replace(PRESETS["tiny"], ft_lr=0.0), "ft_lr")]:
        with pytest.raises(ValueError, match=pattern):
            run_tofu(str(tmp_path / "no-model"), tmp_path / "out", settings=bad, tofu_root=SAMPLE_ROOT)
    with pytest.raises(ValueError, match="preset"):
        resolve_settings("huge")
    assert not (tmp_path / "out").exists()


def test_finetune_learns_the_answers():
    """Ten epochs at a high lr on six QAs: the loss over all of them (answer tokens, the same
    encoding the benchmark trains with) falls well below the start (measured 5.98 -> 2.25)."""
    from snap_fast.data.collator import ChatCollator

    model, tok = make_tiny_llama()
    records = [{"question": f"Who wrote book {i}?", "answer": f"Author number {i} wrote it."} for i in range(6)]
    batch = ChatCollator(tok, max_length=64)([{"prompt": r["question"], "response": r["answer"]} for r in records])

    def loss() -> float:
        with torch.no_grad():
            return float(model(**batch).loss)

    before = loss()
    steps = finetune(model, tok, records, epochs=10, lr=1e-2, batch_size=4, max_length=64, seed=0, progress=False)
    assert len(steps) == 20  # ceil(10 epochs x ceil(6 / 4) batches)
    assert loss() < 0.5 * before


def test_data_folder_from_tofu_records(tmp_path):
    from snap_fast.data.responses import is_obliterated
    from snap_fast.io import read_jsonl

    forget, retain = load_tofu(SAMPLE_ROOT, "forget01")[:5], load_tofu(SAMPLE_ROOT, "retain99")[:10]
    folder = tofu_data_folder(forget, retain, tmp_path / "d", n_retain=4, seed=0)
    f, r = read_jsonl(folder / "forget.jsonl"), read_jsonl(folder / "retain.jsonl")
    assert [x["prompt"] for x in f] == [x["question"] for x in forget]
    assert [x["original_response"] for x in f] == [x["answer"] for x in forget]
    assert all(is_obliterated(x["response"]) for x in f)
    assert len(r) == 4 and all(x["response"] == x["original_response"] for x in r)
    assert {x["prompt"] for x in r} <= {x["question"] for x in retain}


def test_tiny_run_end_to_end_cached_and_guarded(tmp_path):
    model = save_tiny_model(tmp_path / "base")
    logs: list[str] = []
    results = run_tofu(str(model), tmp_path / "run", settings="tiny", tofu_root=SAMPLE_ROOT, progress=False,
                       log=logs.append)
    assert list(results["models"]) == ["retain", "target", "snap", "ga"]
    assert results["tofu_sample"] is True
    retain = results["models"]["retain"]
    assert retain["forget_quality"] == pytest.approx(1.0)  # the KS test of a sample against itself
    for row in results["models"].values():
        assert 0.0 <= row["forget_quality"] <= 1.0 and 0.0 <= row["model_utility"] <= 1.0
    finetuned = json.loads((tmp_path / "run" / "target_model" / "finetune.json").read_text())
    assert finetuned["records"] == 40 + 4  # the whole forget01 split and the first 4 retain99 records
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| snap |" in md and "TOFU sample" in md
    assert (tmp_path / "run" / "figure.png").stat().st_size > 1000
    logs.clear()
    run_tofu(str(model), tmp_path / "run", settings="tiny", tofu_root=SAMPLE_ROOT, progress=False, log=logs.append)
    assert sum("cached" in line for line in logs) == 2 + 2 + 4  # two models, two runs, four evaluations
    logs.clear()  # fewer methods: every remaining stage is still cached
    fewer = run_tofu(str(model), tmp_path / "run", settings=replace(PRESETS["tiny"], methods=("ga",)),
                     tofu_root=SAMPLE_ROOT, progress=False, log=logs.append)
    assert list(fewer["models"]) == ["retain", "target", "ga"] and sum("cached" in line for line in logs) == 2 + 1 + 3
    with pytest.raises(FileExistsError, match="other settings"):
        run_tofu(str(model), tmp_path / "run", settings=replace(PRESETS["tiny"], seed=1), tofu_root=SAMPLE_ROOT)


def test_new_unlearning_settings_redo_only_the_unlearning(tmp_path):
    model = save_tiny_model(tmp_path / "base")
    tiny = replace(PRESETS["tiny"], methods=("ga",))
    first = run_tofu(str(model), tmp_path / "run", settings=tiny, tofu_root=SAMPLE_ROOT, progress=False,
                     log=lambda m: None)
    assert first["unlearn_steps"] == {"ga": 2} and first["preset"] == "custom"
    logs: list[str] = []
    more = run_tofu(str(model), tmp_path / "run", settings=replace(tiny, unlearn_steps=3), tofu_root=SAMPLE_ROOT,
                    progress=False, log=logs.append)
    # both fine-tuned models and their evaluations are kept; ga is unlearned and evaluated again
    assert sum("cached" in line for line in logs) == 2 + 2
    assert any("unlearn ga: 3 steps" in line for line in logs) and more["unlearn_steps"] == {"ga": 3}
    assert {"finetune_target", "finetune_retain", "eval_retain", "eval_target", "unlearn_ga",
            "eval_ga"} <= set(more["seconds"])  # the cached stages keep the times they took
    md = (tmp_path / "run" / "results.md").read_text()
    assert "Unlearning: 3 optimizer steps per method." in md
    assert resolve_settings(replace(PRESETS["quick"], forget_split="forget05"))[0] == "quick"
    assert PRESETS["quick"].unlearn_steps is None  # the budget follows the forget split (unlearn's default)
