"""The run folder's files: config.yaml first, metrics.jsonl (and TensorBoard), summary.json, final/.

Every file is written atomically, so a reader (or a resumed run) never sees a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..io import atomic_write_text
from .config import UnlearnConfig

__all__ = ["MetricsLog", "prepare_run_folder", "save_final", "write_summary"]


def prepare_run_folder(cfg: UnlearnConfig) -> Path:
    """Create (or clear, or reuse for resume) the run folder and write config.yaml first."""
    out = Path(cfg.out)
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    if cfg.resume and config_path.is_file():
        diffs = UnlearnConfig.from_yaml(config_path).differences(cfg)
        if diffs:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diffs.items()))
            raise ValueError(f"resume: the config differs from the run's config.yaml ({listed}); "
                             "resume with the same settings or start a new run")
    atomic_write_text(config_path, cfg.to_yaml())
    return out


def write_summary(run_dir: Path, cfg: UnlearnConfig, **fields) -> None:
    """``summary.json``: the run's outcome, with the settings that identify it."""
    from ..version import __version__

    summary = {"snap_fast_version": __version__, "method": cfg.method, "lora": cfg.lora, "lam": cfg.lam,
               "model": cfg.model, "data": cfg.data, **fields}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def save_final(run_dir: Path, model, tokenizer, cfg: UnlearnConfig,
                model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """``final/adapter`` (+ ``final/merged`` when merging) or ``final/merged`` for full FT.

    ``model_state``: the trainable weights gathered on rank 0 under FSDP2 (see
    ``DataParallel.full_state``), saved instead of the sharded model's own; a merged LoRA model
    is then built on the CPU from a fresh copy of the base model and the saved adapter.
    """
    final = run_dir / "final"
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=run_dir))
    try:
        model.config.use_cache = True  # saved configs should generate normally
        tokenizer.save_pretrained(tmp)
        if cfg.lora:
            model.save_pretrained(tmp / "adapter", state_dict=model_state)
        if not cfg.lora or cfg.merge:
            if cfg.lora and model_state is not None:
                from peft import PeftModel

                from ..models import load_model

                base, _ = load_model(cfg.model, dtype=torch.float32, device="cpu",
                                     trust_remote_code=cfg.trust_remote_code)
                base.config.use_cache = True
                merged = PeftModel.from_pretrained(base, tmp / "adapter").merge_and_unload()
                model_state = None  # the fresh merged model saves its own weights
            else:
                merged = model.merge_and_unload() if cfg.lora else model
            merged.save_pretrained(tmp / "merged", safe_serialization=True, state_dict=model_state)
            tokenizer.save_pretrained(tmp / "merged")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class MetricsLog:
    """``metrics.jsonl``, one JSON record per logged step, mirrored to TensorBoard when installed.

    Args:
        run_dir: the run folder.
        resume_step: the step the run starts from; records of later steps are dropped from an
            existing log (a resumed run logs them again; 0 starts an empty one).
        enabled: False on ranks other than 0 (nothing is written).
    """

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self._truncate(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def _truncate(self, upto_step: int) -> None:
        """Drop metrics lines after ``upto_step`` (steps re-run after a resume are logged again)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= upto_step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def append(self, metrics: dict) -> None:
        """Append one record (it must hold ``step``)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
