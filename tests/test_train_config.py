"""UnlearnConfig: every bad input fails fast with a clear message; YAML round trip; the CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from snap_fast.train import METHODS, UnlearnConfig, unlearn
from tests.helpers import save_tiny_model
from tests.train_data import write_data_folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_config")
    return {"model": str(save_tiny_model(root / "llama", "llama")), "data": str(write_data_folder(root / "data"))}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the model would be loaded: errors must come before any heavy work."""
    import snap_fast.models

    def refuse(*args, **kwargs):
        raise AssertionError("load_model was called before the bad input was reported")

    monkeypatch.setattr(snap_fast.models, "load_model", refuse)


def _cfg(assets, tmp_path, **kw):
    values = {"model": assets["model"], "data": assets["data"], "out": str(tmp_path / "run"), "batch_size": 2,
                  "progress": False}
    values.update(kw)
    return UnlearnConfig(**values)


@pytest.mark.parametrize("overrides, exc, message", [
    ({"lam": -0.1}, ValueError, "lam must be >= 0"),
    ({"n_projections": 0}, ValueError, "n_projections must be >= 1"),
    ({"method": "forgetful"}, ValueError, "valid: snap, snap-npo, ga, grad-diff, npo, idk"),
    ({"model": "./no/such/model"}, ValueError, "model: model path not found"),
    ({"model": "/tmp/nowhere/m.gguf"}, ValueError, "GGUF model file not found"),
    ({"batch_size": 9}, ValueError, r"batch_size \(9\) is larger than the forget set \(8 examples\)"),
    ({"reg_mode": "sometimes"}, ValueError, "unknown reg_mode"),
    ({"retain_loss": "mse"}, ValueError, "unknown retain_loss 'mse'; valid: nll, kl"),
    ({"retain_batch_size": 0}, ValueError, "retain_batch_size must be >= 1"),
    ({"reference_cache_gib": -1.0}, ValueError, "reference_cache_gib must be >= 0"),
    ({"reference_cache_gib": "2"}, TypeError, "reference_cache_gib must be a number"),
    ({"retain_batch_size": 2.5}, TypeError, "retain_batch_size must be an int"),
    ({"general_batch_size": 0}, ValueError, "general_batch_size must be >= 1"),
    ({"general_batch_size": "4"}, TypeError, "general_batch_size must be an int"),
    ({"precision": "fp8"}, ValueError, "unknown precision"),
    ({"max_steps": 0}, ValueError, "max_steps must be >= 1"),
    ({"lr": 0.0}, ValueError, "lr must be > 0"),
    ({"lam": float("nan")}, ValueError, "lam must be finite"),
    ({"epochs": -1}, ValueError, "epochs must be > 0"),
    ({"grad_accum": 1.5}, TypeError, "grad_accum must be an int"),
    ({"lora": "yes"}, TypeError, "lora must be a bool"),
    ({"device": "tpu"}, ValueError, "device must be"),
    ({"resume": True, "overwrite": True}, ValueError, "exclude each other"),
    ({"merge": True, "lora": False}, ValueError, "merge only applies to LoRA"),
    ({"data": "/tmp/no-such-data-folder"}, ValueError, "data: folder not found"),
    ({"out": ""}, ValueError, "out"),
    ({"lora_layers": "1-"}, ValueError, "lora_layers must look like '15-29'"),
    ({"lora_layers": 1.5}, ValueError, r"lora_layers as a fraction must be in \(0, 1\]"),
    ({"lora_layers": "0.0"}, ValueError, "lora_layers as a fraction"),
    ({"lora_layers": "3-1"}, ValueError, "lora_layers must look like"),
    ({"lora_layers": [0, -1]}, ValueError, "lora_layers must be >= 0"),
    ({"lora_layers": []}, ValueError, "lora_layers must be None, a range"),
    ({"lora_layers": "1", "lora": False}, ValueError, "lora_layers only applies to LoRA"),
])
def test_bad_input_fails_before_loading(assets, tmp_path, no_model_loading, overrides, exc, message):
    with pytest.raises(exc, match=message):
        unlearn(_cfg(assets, tmp_path, **overrides))
    assert not (tmp_path / "run").exists()  # nothing written either


def test_empty_forget_set_and_missing_fields(assets, tmp_path, no_model_loading):
    data = tmp_path / "data"
    data.mkdir()
    (data / "forget.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="forget set .* is empty"):
        unlearn(_cfg(assets, tmp_path, data=str(data)))
    (data / "forget.jsonl").write_text(json.dumps({"prompt": "Who?", "response": "I don't know."}) + "\n" * 2)
    with pytest.raises(ValueError, match="needs hard positives"):
        unlearn(_cfg(assets, tmp_path, data=str(data), batch_size=1))
    with pytest.raises(ValueError, match="'original_response'"):
        unlearn(_cfg(assets, tmp_path, data=str(data), batch_size=1, method="ga"))
    (data / "retain.jsonl").write_text(json.dumps({"prompt": "Who else?", "response": None}) + "\n")
    with pytest.raises(ValueError, match="retain.jsonl record 1 needs 'prompt' and 'response'"):
        unlearn(_cfg(assets, tmp_path, data=str(data), batch_size=1))
    (data / "forget.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="forget.jsonl:1: malformed JSON"):
        unlearn(_cfg(assets, tmp_path, data=str(data), batch_size=1))


def test_existing_run_folder_needs_resume_or_overwrite(assets, tmp_path, no_model_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists; pass resume=True"):
        unlearn(_cfg(assets, tmp_path))
    # Never delete a folder that is not a run folder, even when asked to overwrite.
    with pytest.raises(ValueError, match="not a run folder"):
        unlearn(_cfg(assets, tmp_path, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"


def test_lora_layer_indices():
    from snap_fast.train.config import lora_layer_indices

    assert lora_layer_indices(None, 30) is None
    assert lora_layer_indices(0.5, 30) == list(range(15, 30))
    assert lora_layer_indices(1.0, 30) == list(range(30))
    assert lora_layer_indices(0.01, 2) == [1]  # at least one layer, the top one
    assert lora_layer_indices(1 / 3, 30) == list(range(20, 30))
    assert lora_layer_indices([0, 4], 5) == [0, 4]
    with pytest.raises(ValueError, match=r"lora_layers: \[5\] out of range; the model has 5 decoder layers"):
        lora_layer_indices([0, 5], 5)


def test_defaults_resolve_and_yaml_round_trip(tmp_path):
    cfg = UnlearnConfig(data="d", out="o").resolved()
    assert (cfg.lr, cfg.lam, cfg.method, cfg.lora_r, cfg.reg_mode) == (1.5e-3, 0.0, "snap", 8, "fixed")
    assert cfg.lora_layers == 0.5 and cfg.resolved() == cfg  # the upper half; resolving twice changes nothing
    full = UnlearnConfig(data="d", out="o", lora=False).resolved()
    assert full.lr == 1e-5 and full.lora_layers is None  # the layer rule is LoRA's only
    assert full.lam == 0.0  # off in full fine-tuning too: λ = 10 changed nothing at its learning rate
    assert UnlearnConfig(lam=0.1).resolved().lam == 0.1  # an explicit λ is kept
    full._validate_lora()  # no "lora_layers only applies to LoRA runs" from a default
    assert UnlearnConfig(lora_layers="all").resolved().lora_layers == 1.0
    assert cfg.retain_loss == full.retain_loss == "kl"
    assert UnlearnConfig(lora=False, parallel="fsdp").resolved().retain_loss == "nll"  # no unsharded copy
    assert UnlearnConfig(parallel="fsdp").resolved().retain_loss == "kl"  # LoRA: the base is the original
    assert UnlearnConfig(data="d", out="o", method="idk").resolved().lam == 0.0
    assert UnlearnConfig(data="d", out="o", method="ga", lam=0.2).resolved().lam == 0.2
    assert UnlearnConfig(lora_targets="q_proj, v_proj").resolved().lora_targets == ["q_proj", "v_proj"]
    assert UnlearnConfig(lora_layers="15-17").resolved().lora_layers == [15, 16, 17]
    assert UnlearnConfig(lora_layers="4, 0-1").resolved().lora_layers == [0, 1, 4]
    assert UnlearnConfig(lora_layers="0.5").resolved().lora_layers == 0.5  # resolved at model load
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert UnlearnConfig.from_yaml(path) == cfg
    path.write_text("method: snap\nlambda: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lambda'\]"):
        UnlearnConfig.from_yaml(path)
    assert set(METHODS) == {"snap", "snap-npo", "ga", "grad-diff", "npo", "idk"}


def test_cli_end_to_end_and_bad_input(assets, tmp_path, capsys):
    from snap_fast.cli import main

    out = tmp_path / "run"
    argv = ["unlearn", "--model", assets["model"], "--data", assets["data"], "--out", str(out),
            "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--n-projections", "8",
            "--reg-backend", "torch", "--lam", "0.5", "--merge", "--no-progress"]
    assert main(argv) == 0
    cfg = UnlearnConfig.from_yaml(out / "config.yaml")
    assert (cfg.lam, cfg.max_steps, cfg.merge, cfg.lora) == (0.5, 2, True, True)
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "final" / "merged" / "config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # The same command again: the folder exists → exit 2 with the reason on stderr.
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["unlearn", "--data", assets["data"], "--out", str(tmp_path / "x"), "--lam", "-1"]) == 2
    assert "lam must be >= 0" in capsys.readouterr().err
    # --resume with only --out reads the run's config.yaml: the completed run has nothing left.
    assert main(["unlearn", "--out", str(out), "--resume", "--no-progress"]) == 0
    # A YAML config, with a flag on top.
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(UnlearnConfig(model=assets["model"], data=assets["data"], out=str(tmp_path / "y"),
                                       max_steps=1, batch_size=2, method="idk", progress=False).to_yaml())
    assert main(["unlearn", "--config", str(yaml_path), "--full"]) == 0
    cfg = UnlearnConfig.from_yaml(tmp_path / "y" / "config.yaml")
    assert (cfg.method, cfg.lora, cfg.lam) == ("idk", False, 0.0)
    assert (tmp_path / "y" / "final" / "merged" / "config.json").is_file()


def test_cli_sigint_in_a_subprocess_saves_a_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "snap_fast.cli", "unlearn", "--model", assets["model"], "--data", assets["data"],
           "--out", str(out), "--max-steps", "100000", "--batch-size", "2", "--lam", "0.1", "--n-projections", "8",
           "--reg-backend", "torch", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: checkpoint saved" in err
    from snap_fast.train.checkpoint import last_checkpoint

    ckpt = last_checkpoint(out)
    steps = len(metrics.read_text().splitlines())
    assert ckpt == Path(out) / "checkpoints" / f"step-{steps}"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == steps and state["regularizer"]["calls"] == steps


def test_flags_help_and_docs_come_from_the_config_fields():
    """Every UnlearnConfig field but ``notes`` has exactly one flag whose help ends with the
    field's default, and docs/training.md's flag table is the generated one."""
    import argparse
    import dataclasses
    import pathlib

    from snap_fast.train.cli import add_arguments, cli_options, options_markdown

    options = cli_options()
    assert sorted(kwargs["dest"] for _, kwargs, _ in options) == sorted(
        f.name for f in dataclasses.fields(UnlearnConfig) if f.name != "notes")
    for _, kwargs, _ in options:
        default = getattr(UnlearnConfig, kwargs["dest"])
        if "action" not in kwargs and default not in (None, ""):
            assert kwargs["help"].endswith(f"(default {default})"), kwargs
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--reg-backend", "cpp", "--full", "--fsdp", "--lam", "0.3"])
    assert (args.reg_backend, args.lora, args.parallel, args.lam) == ("cpp", False, "fsdp", 0.3)
    assert "method" not in vars(args)  # only given flags override the YAML / defaults
    page = (pathlib.Path(__file__).parent.parent / "docs" / "training.md").read_text(encoding="utf-8")
    start = page.index("-->\n", page.index("<!-- options:start")) + 4
    assert page[start:page.index("<!-- options:end -->")] == options_markdown(), (
        "docs/training.md's flag table is stale: paste snap_fast.train.cli.options_markdown() there")
