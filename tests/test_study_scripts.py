"""The study scripts' bookkeeping (no model runs): configurations are valid UnlearnConfig
overrides, result rows are keyed by recipe, tables and figures are written from JSONL rows."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import forget_targets
import regularizer_study


def test_every_configuration_is_a_valid_unlearn_config(tmp_path):
    from snap_fast.train import UnlearnConfig

    for name in regularizer_study.CONFIGS:
        cfg = UnlearnConfig(data="d", out=str(tmp_path / "o"), **regularizer_study.overrides_for(name)).resolved()
        cfg._validate_fields()
        assert name.split("/")[0] in ("lora", "full", "full-lr1e-4", "over")
        assert (cfg.lam == 0) == name.endswith("/none"), name
        assert cfg.lora == (not name.startswith("full")), name
    assert regularizer_study.CONFIGS["lora/swd-0.1"] == {"lam": 0.1}  # the paper's λ is in the grid
    lora_default = UnlearnConfig(data="d", out=str(tmp_path / "o")).resolved()
    assert lora_default.lam == UnlearnConfig(**regularizer_study.CONFIGS["lora/none"]).resolved().lam  # shipped


def test_regularizer_study_table_and_figure_from_rows(tmp_path):
    rows = [{"target": t, "seed": 0, "config": c, "regime": c.split("/")[0], "obliteration": o, "retain_rouge": r,
             "general_false_refusal": 0.0, "perplexity_change": 0.01, "reg_grad_share": s, "minutes": 5.0}
            for t, c, o, r, s in [("A", "lora/none", 0.9, 0.80, None), ("B", "lora/none", 0.8, 0.84, None),
                                  ("A", "lora/swd-10", 0.7, 0.9, 0.2), ("A", "full/l2sp-10", 0.1, 0.99, 0.5)]]
    text = regularizer_study.write_outputs(rows, tmp_path / "t.md", tmp_path / "f.png")
    assert "| lora/none | 2 | 85.0 ± 7.1 | 0.820 ± 0.028 |" in text
    assert "| lora/swd-10 | 1 | 70.0 | 0.900 |" in text and "| over/" not in text
    assert (tmp_path / "f.png").stat().st_size > 1000
    # paired with lora/none on the same target and seed: only A pairs (0.7 - 0.9, 0.9 - 0.80);
    # full/l2sp-10 has no full/none partner, so no row
    assert "| lora/swd-10 | 1 | -20.0 | 0.100 | 0.0 | — | — |" in text
    assert "| full/l2sp-10 |" not in text.split("## Paired with no penalty")[1]


def test_forget_targets_rows_are_keyed_by_recipe(tmp_path, monkeypatch):
    from snap_fast import forget
    from snap_fast.io import write_jsonl

    key = forget_targets.recipe_key()
    default_alpha = forget.PRESETS["full"].alpha
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{"target": "A", "recipe": key}, {"target": "B", "recipe": "old"}, {"target": "C"}])
    assert [r["target"] for r in forget_targets.read_results(path, key)] == ["A"]
    assert len(forget_targets.read_results(path)) == 3
    changed = dict(forget.PRESETS, full=replace(forget.PRESETS["full"], alpha=default_alpha + 1))
    monkeypatch.setattr(forget, "PRESETS", changed)
    assert forget_targets.recipe_key() != key  # a change of defaults starts a new table
    monkeypatch.setattr(forget, "PRESETS", dict(changed, full=replace(changed["full"], alpha=default_alpha, seed=5)))
    assert forget_targets.recipe_key() == key  # the seed is not part of the recipe


def test_forget_targets_recipe_probe_overrides(tmp_path, capsys):
    """--set KEY=VALUE: typed ForgetSettings overrides, a recipe key of their own (the same key
    when they change nothing), a table that names them, a clear error for a bad item."""
    from snap_fast import forget

    assert forget_targets.parse_overrides(["alpha=30", "max_steps=none", "lr=1e-3", "lora_r=4"]) == {
        "alpha": 30.0, "max_steps": None, "lr": 1e-3, "lora_r": 4}
    assert forget_targets.recipe_key({"alpha": forget.PRESETS["full"].alpha}) == forget_targets.recipe_key()
    assert forget_targets.recipe_key({"alpha": forget.PRESETS["full"].alpha + 10}) != forget_targets.recipe_key()
    for bad, message in ((["alfa=3"], "KEY one of"), (["seed=1"], "KEY one of"), (["alpha"], "KEY=VALUE"),
                         (["alpha=x"], "alpha takes a float")):
        with pytest.raises(ValueError, match=message):
            forget_targets.parse_overrides(bad)
    text = forget_targets.write_table([], tmp_path / "t.md", {"alpha": 30.0})
    assert "Recipe probe: alpha = 30.0" in text and forget_targets.recipe_key({"alpha": 30.0}) in text
    with pytest.raises(SystemExit):
        forget_targets.main(["--set", "alfa=1", "--table-only", "--table", str(tmp_path / "x.md")])
    assert "--set 'alfa=1'" in capsys.readouterr().err and not (tmp_path / "x.md").exists()


def test_attack_comparison_table_from_rows(tmp_path):
    import attack_comparison

    def row(method, target, oblit):
        return {"target": target, "seed": 0, "method": method, "obliteration": oblit, "retain_rouge": 0.8,
                "quant8_obliteration": oblit, "quant4_obliteration": 0.5, "torchao_int8_obliteration": oblit,
                "relearn0_obliteration": oblit,
                "relearn10_obliteration": 0.1, "relearn25_obliteration": 0.0, "prompt_leak_mean": 0.25,
                "mia_auc": {"loss": 0.4, "min_k_plus_plus": 0.6}, "attack_seconds": {"quant": 60.0, "mia": 10.0},
                "threads": 2}

    text = attack_comparison.write_table([row("snap", "A", 0.9), row("snap", "B", 0.7), row("ga", "A", 1.0)],
                                         tmp_path / "t.md")
    assert "| snap | 2 | 80.0 ± 14.1 | 0.800 ± 0.000 |" in text and "| ga | 1 | 100.0 |" in text
    assert text.index("| snap |") < text.index("| ga |")  # methods in their fixed order
    assert "quant 60, mia 10; threads [2]" in text


def test_attack_comparison_leak_columns_come_from_each_attacks_saved_summary(tmp_path):
    import attack_comparison
    from forget_targets import read_results

    from snap_fast.io import write_json, write_jsonl

    eval_dir = tmp_path / "work" / "barack_obama_seed0" / "methods" / "snap" / "eval"
    for i, (_, folder) in enumerate(attack_comparison.ATTACK_FOLDERS):  # a distinct leak rate per folder
        write_json(eval_dir / folder / "summary.json",
                   {"sets": {"heldout_forget": {"leak_rate": i / 10, "gibberish_rate": 0.25}}})
    done = {"target": "Barack Obama", "seed": 0, "method": "snap", "leak_rate": 0.99}
    write_jsonl(tmp_path / "r.jsonl", [{"target": "Barack Obama", "seed": 0, "method": "snap"}, done,
                                       {"target": "Barack Obama", "seed": 0, "method": "ga"}])  # ga: no folder
    attack_comparison.add_leak_columns(tmp_path / "r.jsonl", tmp_path / "work")
    filled, kept, missing = read_results(tmp_path / "r.jsonl")
    assert filled["leak_rate"] == 0.0 and filled["gibberish_rate"] == 0.25
    assert [filled[f"{k}_leak_rate"] for k in ("quant8", "quant4", "torchao_int8")] == [0.1, 0.2, 0.3]
    assert [filled[f"relearn{k}_leak_rate"] for k in attack_comparison.RELEARN_STEPS] == [0.4, 0.5, 0.6]
    assert kept == done and "leak_rate" not in missing


def test_sequential_study_chain_resumes_and_tabulates(tmp_path):
    """Two stages on a tiny model: each starts from the previous merged model, rows say which
    targets are forgotten, a rerun adds nothing, and the table has one line per stage."""
    import sequential_study

    from snap_fast.io import read_jsonl
    from tests.eval_helpers import write_data_folder
    from tests.helpers import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    folders = {}
    for name in ("Barack Obama", "Sherlock Holmes"):
        folders[name] = tmp_path / name.replace(" ", "_")
        write_data_folder(folders[name] / "data", n=4)
    results = tmp_path / "seq.jsonl"
    chain = list(folders)
    sequential_study.run_chain("lora/none", 0, chain, folders, tmp_path / "work", results, base_model=str(base))
    rows = read_jsonl(results)
    assert [r["stage"] for r in rows] == [1, 2]
    first, second = rows
    assert first["per_target"]["Barack Obama"]["forgotten"] and not first["per_target"]["Sherlock Holmes"]["forgotten"]
    assert all(m["forgotten"] for m in second["per_target"].values()) and second["kept_forget_rouge"] is None
    stage2 = sequential_study.stage_dir(tmp_path / "work", "lora/none", 0, 2, "Sherlock Holmes")
    config = (stage2 / "config.yaml").read_text()
    assert str(sequential_study.stage_dir(tmp_path / "work", "lora/none", 0, 1, "Barack Obama")) in config
    sequential_study.run_chain("lora/none", 0, chain, folders, tmp_path / "work", results, base_model=str(base))
    assert len(read_jsonl(results)) == 2  # resumed: nothing redone
    text = sequential_study.write_outputs(rows, tmp_path / "t.md", tmp_path / "f.png")
    assert text.count("| lora/none |") == 2 and (tmp_path / "f.png").stat().st_size > 1000


def test_sequential_paired_differences_by_seed_and_stage():
    import sequential_study

    def row(config, seed, stage, kept, retain):
        return {"config": config, "seed": seed, "stage": stage, "forgotten_obliteration": 0.9,
                "kept_forget_rouge": kept, "kept_obliteration": 0.1, "retain_rouge": retain}

    rows = [row("lora/none", 0, 1, 0.60, 0.80), row("lora/swd-100", 0, 1, 0.70, 0.82),
            row("lora/none", 1, 1, 0.50, 0.70), row("lora/swd-100", 1, 1, 0.54, 0.70),
            row("lora/swd-100", 2, 1, 0.99, 0.99),  # no partner at seed 2: left out
            row("lora/none", 0, 2, None, 0.75), row("lora/swd-100", 0, 2, None, 0.74)]
    lines = sequential_study.paired_stage_differences(rows)
    # stage 1: kept Δ = 0.10, 0.04 -> 0.070 ± 0.042; retain Δ = 0.02, 0.00 -> 0.010 ± 0.014
    assert "| lora/swd-100 | 1 | 2 | 0.0 ± 0.0 | 0.070 ± 0.042 | 0.0 ± 0.0 | 0.010 ± 0.014 |" in lines
    assert "| lora/swd-100 | 2 | 1 | 0.0 | — | 0.0 | -0.010 |" in lines
    assert sequential_study.paired_stage_differences([row("lora/none", 0, 1, 0.6, 0.8)]) == []


def test_regularizer_study_relearning_fills_only_missing_selected_rows(tmp_path, monkeypatch):
    from snap_fast.io import read_jsonl, write_jsonl

    path = tmp_path / "r.jsonl"
    rows = [{"target": "A", "seed": 0, "config": "lora/none"},
            {"target": "A", "seed": 0, "config": "lora/swd-10",
             **{f"relearn{k}_obliteration": 0.4 for k in regularizer_study.RELEARN_STEPS}},
            {"target": "A", "seed": 1, "config": "lora/swd-10", "relearn25_obliteration": 0.4},  # one step missing
            {"target": "B", "seed": 0, "config": "lora/none"}]
    write_jsonl(path, rows)
    calls = []

    def fake(folder, row):
        calls.append((folder.name, row["config"]))
        return {f"relearn{k}_obliteration": 0.1 for k in regularizer_study.RELEARN_STEPS}

    monkeypatch.setattr(regularizer_study, "relearn_columns", fake)
    regularizer_study.add_relearning(path, tmp_path, lambda r: r["target"] == "A")
    assert calls == [("a_seed0", "lora/none"), ("a_seed1", "lora/swd-10")]
    after = read_jsonl(path)
    assert after[0]["relearn25_obliteration"] == 0.1 and after[1]["relearn25_obliteration"] == 0.4
    assert after[2]["relearn2_obliteration"] == 0.1
    assert "relearn25_obliteration" not in after[3]
    text = regularizer_study.write_outputs([{**r, "regime": "lora", "obliteration": 0.9, "retain_rouge": 0.8}
                                            for r in after], tmp_path / "t.md", tmp_path / "f.png")
    assert "obliteration after 25 relearning steps" in text


def test_new_target_check_on_the_tiny_model(tmp_path):
    """The hand-written check end to end on the tiny preset: its questions (not the builder's) are
    asked, per-kind rates add up, the file's facts reach the leak check, and a rerun is cached."""
    import json

    import new_target_check

    questions = tmp_path / "q.json"
    questions.write_text(json.dumps({
        "target": "Ada Lovelace", "aliases": ["Lovelace"], "facts": ["Ada Lovelace wrote the first program."],
        "questions": [{"kind": "direct", "prompt": "Who was Ada Lovelace?"},
                      {"kind": "reverse", "prompt": "Who wrote the first computer program?"},
                      {"kind": "reverse", "prompt": "Which countess worked with Charles Babbage?"}]}))
    results, out = tmp_path / "r.jsonl", tmp_path / "run"
    argv = [str(questions), "--out", str(out), "--threads", "1", "--preset", "tiny", "--results", str(results)]
    assert new_target_check.main(argv) == 0
    target = json.loads((out / "check_data" / "target.json").read_text())
    assert "Lovelace" in target["aliases"] and "Ada Lovelace wrote the first program." in target["facts"]
    samples = [json.loads(line) for line in (out / "check_eval" / "unlearned" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples if s["set"] == "heldout_forget"][1] == "Who wrote the first computer program?"
    row = json.loads(results.read_text())
    for label in ("original", "unlearned"):
        rates = row["hand_written"][label]
        assert (rates["direct"]["n"], rates["reverse"]["n"], rates["all"]["n"]) == (1, 2, 3)
        assert rates["all"]["obliteration"] * 3 == rates["direct"]["obliteration"] + rates["reverse"]["obliteration"] * 2
    assert set(row["hand_written_known"]) <= {"direct", "reverse", "all"}
    assert new_target_check.main(argv) == 0  # resumed: every stage cached
    assert len(results.read_text().splitlines()) == 2


def test_known_answer_rates_count_only_what_the_original_knew():
    import new_target_check

    def sample(prompt, kind, leaked, obliterated=False):
        return {"prompt": prompt, "kind": kind, "leaked": leaked, "obliterated": obliterated}

    original = [sample("a", "direct", True), sample("b", "direct", True), sample("c", "reverse", True),
                sample("d", "reverse", False), sample("e", "reverse", False)]
    unlearned = [sample("a", "direct", False, True), sample("b", "direct", False), sample("c", "reverse", True),
                 sample("d", "reverse", False, True), sample("e", "reverse", True)]
    rates = new_target_check.known_answer_rates(original, unlearned)
    # d and e were unknown to the original: neither the refusal of d nor the leak of e counts
    assert rates["direct"] == {"n": 2, "removed": 1.0, "obliterated": 0.5}
    assert rates["reverse"] == {"n": 1, "removed": 0.0, "obliterated": 0.0}
    assert rates["all"] == {"n": 3, "removed": 2 / 3, "obliterated": 1 / 3}
    assert new_target_check.known_answer_rates(original[3:], unlearned[3:]) == {}


def test_new_target_check_rejects_a_bad_question_file(tmp_path):
    import json

    import new_target_check
    import pytest

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"target": "X", "questions": [{"kind": "sideways", "prompt": "?"}]}))
    with pytest.raises(ValueError, match="question 1"):
        new_target_check.load_questions(bad)


def test_forget_targets_rescore_rekeys_only_earlier_pipeline_rows_with_folders(tmp_path, monkeypatch):
    """--rescore: a row of the earlier pipeline whose run folder exists gets the fresh metrics and
    the current key, keeps its wall time; rows without a folder or of other recipes are untouched;
    a run that was not cached (so retrained) is an error, not a rescore."""
    from snap_fast.io import write_jsonl

    old, new = forget_targets.recipe_key(None, forget_targets.RESCORE_FROM[0]), forget_targets.recipe_key()
    assert old != new
    obama, tesla = forget_targets.TARGETS[0]["name"], forget_targets.TARGETS[1]["name"]
    base = {"seed": 0, "minutes": 7.5, "peak_rss_gib": 5.7, "steps": 80, "threads": 2, "cached_stages": []}
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{**base, "target": obama, "recipe": old, "obliteration": 0.8},
                       {**base, "target": tesla, "recipe": old, "obliteration": 0.8},
                       {**base, "target": tesla, "seed": 1, "recipe": "other", "obliteration": 0.5}])
    folder = forget_targets.target_folder(tmp_path, obama, 0)
    folder.mkdir(parents=True)
    (folder / "stages.json").write_text("{}")
    calls = []

    def fake_run_one(spec, seed, work, threads, overrides=None, cached=("data", "unlearn")):
        calls.append((spec["name"], seed))
        return {"target": spec["name"], "seed": seed, "recipe": new, "obliteration": 0.9, "minutes": 0.3,
                "peak_rss_gib": 1.0, "steps": 80, "threads": 2, "cached_stages": list(cached)}

    monkeypatch.setattr(forget_targets, "run_one", fake_run_one)
    assert forget_targets.rescore(path, tmp_path, 2) == 1
    rows = forget_targets.read_results(path)
    assert calls == [(obama, 0)]
    assert rows[0]["recipe"] == new and rows[0]["obliteration"] == 0.9 and rows[0]["minutes"] == 7.5
    assert rows[0]["rescored_from"] == old and rows[0]["cached_stages"] == []
    assert rows[1]["recipe"] == old and rows[2]["recipe"] == "other"
    assert forget_targets.rescore(path, tmp_path, 2) == 0  # already rescored: nothing to do
    folder2 = forget_targets.target_folder(tmp_path, tesla, 0)
    folder2.mkdir(parents=True)
    (folder2 / "stages.json").write_text("{}")
    monkeypatch.setattr(forget_targets, "run_one", lambda *a, **k: fake_run_one(*a, cached=("data",)))
    with pytest.raises(RuntimeError, match="not cached"):
        forget_targets.rescore(path, tmp_path, 2)
