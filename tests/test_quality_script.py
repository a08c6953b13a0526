"""benchmarks/quality.py: the default-mode rule and the back-to-back timing of the modes."""

from dataclasses import replace

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def _row(config, seed, obliteration, rouge, step_s):
    return {"config": config, "seed": seed, "obliteration_rate": obliteration, "retain_rougeL_recall": rouge,
            "median_step_s": step_s}


def _grid(refresh_obliteration=(0.95, 0.90)):
    """Two seeds per mode; refresh has the shortest step times of the separate runs."""
    rows = []
    for seed in (0, 1):
        rows += [_row("snap-resample", seed, (0.95, 0.90)[seed], (0.67, 0.70)[seed], 26.0),
                 _row("snap-fixed", seed, (0.95, 0.90)[seed], (0.67, 0.70)[seed], 25.0),
                 _row("snap-refresh10", seed, refresh_obliteration[seed], (0.67, 0.70)[seed], 16.0)]
    return rows


def test_recommendation_follows_the_timed_regularizer_calls_not_the_step_times(quality):
    reg_ms = {"snap-resample": 950.0, "snap-refresh10": 250.0, "snap-fixed": 150.0}
    text = quality.recommend(_grid(), reg_ms)
    assert text.startswith("recommended default: snap-fixed ")
    assert "provisional" not in text and "fixed 150 ms" in text
    # refresh cheaper than fixed in the timing: refresh is recommended
    assert quality.recommend(_grid(), {**reg_ms, "snap-refresh10": 100.0}).startswith(
        "recommended default: snap-refresh10 ")


def test_a_mode_that_does_not_match_resample_is_not_recommended(quality):
    # refresh obliterates 20 points less than resample (noise 2.5 points): excluded even if cheapest
    reg_ms = {"snap-resample": 950.0, "snap-refresh10": 10.0, "snap-fixed": 150.0}
    assert quality.recommend(_grid(refresh_obliteration=(0.75, 0.70)), reg_ms).startswith(
        "recommended default: snap-fixed ")


def test_no_recommendation_without_timing_or_resample(quality):
    assert quality.recommend(_grid(), None).startswith("no recommendation: the modes' regularizer calls")
    rows = [r for r in _grid() if r["config"] != "snap-resample"]
    assert quality.recommend(rows, {"snap-resample": 1.0, "snap-refresh10": 1.0, "snap-fixed": 1.0}).startswith(
        "no recommendation: snap-resample was not run")
    one_seed = [r for r in _grid() if r["seed"] == 0]
    assert "provisional" in quality.recommend(one_seed, {"snap-resample": 3.0, "snap-refresh10": 2.0,
                                                         "snap-fixed": 1.0})


def test_time_modes_times_every_mode_on_tiny_shapes(quality):
    settings = replace(quality.PRESETS["tiny"], n_projections=8, reg_refresh_every=3)
    reg_ms = quality.time_modes(settings, repeats=2, shape="tiny")
    assert set(reg_ms) == set(quality.MODES)
    assert all(v > 0 for v in reg_ms.values())
    with pytest.raises(ValueError, match="repeats"):
        quality.time_modes(settings, repeats=0, shape="tiny")


def test_mode_timing_is_cached_per_settings(quality, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(quality, "time_modes", lambda settings: calls.append(settings.lora_r) or {"x": 1.0})
    settings = quality.PRESETS["full"]
    assert quality._mode_timing(settings, tmp_path, retime=False) == {"x": 1.0}
    assert quality._mode_timing(settings, tmp_path, retime=False) == {"x": 1.0}
    assert calls == [settings.lora_r]  # the second call read mode_timing.json
    quality._mode_timing(replace(settings, lora_r=4), tmp_path, retime=False)  # other settings: measured
    quality._mode_timing(replace(settings, lora_r=4), tmp_path, retime=True)  # asked: measured again
    assert calls == [settings.lora_r, 4, 4]


def test_overrides_reach_the_runs_and_the_table_header(quality, tmp_path, monkeypatch):
    """``--retain-batch-size`` and the like change every run's settings and the table's budget
    line; ``--lam`` replaces each configuration's own λ (run_one is stubbed: no training)."""
    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    (demo / "data" / "manifest.json").write_text("{}")
    (demo / "eval" / "original").mkdir(parents=True)
    (demo / "eval" / "original" / "summary.json").write_text('{"headline": {"perplexity": 30.0}}')
    seen = []

    def fake_run_one(name, seed, settings, demo_dir, model, out, overrides, tag):
        seen.append((name, settings, overrides))
        return {**_row(name, seed, 0.9, 0.8, 1.0), "settings": {}}

    monkeypatch.setattr(quality, "run_one", fake_run_one)
    table = tmp_path / "t.md"
    assert quality.main(["--demo-dir", str(demo), "--out", str(tmp_path / "q"), "--table", str(table),
                         "--only", "snap-fixed", "ga", "--seeds", "0", "--no-timing", "--threads", "1",
                         "--retain-batch-size", "12", "--general-batch-size", "2", "--lora-layers", "15-29",
                         "--lora-r", "4", "--lam", "0.5"]) == 0
    assert [name for name, _, _ in seen] == ["snap-fixed", "ga"]
    for _, settings, overrides in seen:
        assert (settings.retain_batch_size, settings.general_batch_size, settings.lora_layers,
                settings.lora_r) == (12, 2, "15-29", 4)
        assert overrides == {"lam": 0.5}
    header = table.read_text().splitlines()[2]
    assert "LoRA r=4 (all-linear, layers 15-29)" in header
    assert "4 forget + 12 hard-positive + 2 general examples per step" in header
