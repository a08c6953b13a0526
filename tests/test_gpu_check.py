"""benchmarks/gpu_check.py on the CPU: its control flow (time boxes, budget, failures, skips),
its output files, the shapes and the peer loop it times. The GPU measurements themselves run on
a GPU loan; here every GPU step must skip cleanly with its reason."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from tests.helpers import load_benchmark

gpu_check = load_benchmark("gpu_check")
Step = gpu_check.Step


def _numel(shapes):
    return sum(torch.Size(s).numel() for s in shapes)


def test_model_shapes_match_the_published_architectures():
    smol = gpu_check.smollm2_135m_shapes()
    assert len(smol) == 272  # SNAP.md §5: 272 tensors, 134.5 M parameters
    assert round(_numel(smol) / 1e6, 1) == 134.5
    llama = gpu_check.llama31_8b_shapes()
    assert len(llama) == 32 * 9 + 3
    assert 8.02e9 < _numel(llama) < 8.04e9  # Llama-3.1-8B: 8.03 B parameters, untied head


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_each_step_is_time_boxed_and_independent():
    steps = [
        Step("crashes", 10, False, ""),
        Step("hangs", 1.5, False, ""),
        Step("works", 10, False, ""),
        Step("no_gpu", 10, True, ""),
        Step("silent", 10, False, ""),
    ]
    commands = {
        "crashes": _python("raise SystemExit('boom')"),
        "hangs": _python("import time; time.sleep(60)"),
        "works": _python("import json; print('noise'); print(json.dumps({'markdown': 'fine', 'data': {'x': 1}}))"),
        "silent": _python("pass"),
    }
    start = time.monotonic()
    results = gpu_check.run_steps(
        steps, lambda s: commands[s.name], budget_s=60,
        skip_reason=lambda s: "no CUDA" if s.needs_cuda else None, env=None, log=lambda _: None,
    )
    assert time.monotonic() - start < 20  # the hanging step was killed at its own limit
    by_name = {r.name: r for r in results}
    assert by_name["crashes"].status == "failed" and "boom" in by_name["crashes"].reason
    assert by_name["hangs"].status == "timeout" and 1.0 < by_name["hangs"].seconds < 10
    assert by_name["works"].status == "ok" and by_name["works"].markdown == "fine"
    assert by_name["works"].data == {"x": 1}
    assert by_name["no_gpu"].status == "skipped" and by_name["no_gpu"].reason == "no CUDA"
    assert by_name["silent"].status == "failed" and "no JSON" in by_name["silent"].reason
    report = gpu_check.render("t", results, 1.0)
    assert "| hangs | timeout |" in report and "## works\n\nfine" in report


def test_the_total_budget_skips_what_would_start_after_it():
    steps = [Step("first", 30, False, ""), Step("second", 30, False, "")]
    results = gpu_check.run_steps(
        steps, lambda s: _python("import time; time.sleep(60)"), budget_s=1.5,
        skip_reason=lambda s: None, env=None, log=lambda _: None,
    )
    assert results[0].status == "timeout" and results[0].seconds < 5  # cut to the budget, not its 30 s
    assert results[1].status == "skipped" and "budget" in results[1].reason


def test_cpu_only_machine_skips_every_gpu_step_quickly(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    start = time.monotonic()
    rc = gpu_check.main(["--out-dir", str(tmp_path)])
    assert time.monotonic() - start < 60
    assert rc == 0
    payload = json.loads(next(tmp_path.glob("gpu_*.json")).read_text())
    statuses = {s["name"]: (s["status"], s["reason"]) for s in payload["steps"]}
    assert statuses["environment"][0] == "ok"
    gpu_steps = [s.name for s in gpu_check.STEPS if s.needs_cuda]
    assert len(gpu_steps) == len(gpu_check.STEPS) - 1
    for name in gpu_steps:
        assert statuses[name] == ("skipped", "no CUDA device visible (torch.cuda.is_available() is False)")
    markdown = next(tmp_path.glob("gpu_*.md")).read_text()
    assert "| llama8b | skipped |" in markdown
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]  # no temporary files left


def test_dry_run_runs_the_cpu_capable_steps(tmp_path):
    rc = gpu_check.main(["--dry-run", "--only", "precision,determinism,lora,cub", "--out-dir", str(tmp_path)])
    payload = json.loads(next(tmp_path.glob("gpu_*.json")).read_text())
    steps = {s["name"]: s for s in payload["steps"]}
    assert rc == 0, {n: s["reason"] for n, s in steps.items()}
    assert steps["cub"]["status"] == "skipped"
    assert steps["precision"]["status"] == "ok"
    rows = steps["precision"]["data"]["rows"]
    assert len(rows) == 4 and all(r["≤ 2 %"] for r in rows)
    checks = {r["check"]: r["result"] for r in steps["determinism"]["data"]["rows"]}
    assert all(v is True for k, v in checks.items() if "same" in k and "rel diff" not in k)
    assert float(next(v for k, v in checks.items() if "rel diff" in k)) < 1e-5
    lora_rows = steps["lora"]["data"]["rows"]
    assert lora_rows[0]["≤ 1e-4"] is True  # every statistic against the dense float64 computation
    assert float(lora_rows[-1]["result"]) < 1e-5


def test_arguments_are_checked():
    for bad in (["--budget-s", "400"], ["--budget-s", "0"], ["--only", "nope"], ["--only", ","]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
    assert gpu_check.parse_args(["--only", "cub, lora"]).only == ["cub", "lora"]
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"
