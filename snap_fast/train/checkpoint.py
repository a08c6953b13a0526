"""Atomic checkpoints of a training run, and resuming from them.

A checkpoint is a folder ``<run>/checkpoints/step-N/`` (N = optimizer steps done) holding:

* ``adapter/`` — the LoRA adapter (PEFT ``save_pretrained``; loads with
  ``PeftModel.from_pretrained``), or ``model/`` — the whole model for full fine-tuning
  (``save_pretrained``, safetensors; loads with ``AutoModelForCausalLM.from_pretrained``);
* ``trainer_state.pt`` — step, optimizer, scheduler, the regularizer's ``state_dict``, RNG
  states (python, numpy, torch, CUDA) and the data-order position;
* under FSDP2 (``parallel: fsdp``), the weights are the same files, written from the full state
  dict gathered on rank 0; ``optimizer.pt`` holds the optimizer's full state dict (read by rank
  0 only, so ``trainer_state.pt``, which every rank reads, stays small) and ``trainer_state.pt``
  holds one regularizer state per rank (``regularizer_ranks``).

It is written into a temporary sibling folder and moved into place with ``os.replace``, so a
crash or a signal mid-write never leaves a half checkpoint: a ``step-N`` folder is complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "last_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_full_weights",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

STATE_FILE = "trainer_state.pt"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, folder), ...]`` of the complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _STEP_RE.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or ``None``."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    *,
    keep: int = 0,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoints/step-<step>/`` atomically and return it.

    Args:
        run_dir: the run folder.
        step: optimizer steps done.
        model: a PEFT model (its adapter is saved) or a plain model (all weights saved).
        trainer_state: everything else to restore (optimizer, scheduler, regularizer, RNG, data
            position…), saved with ``torch.save``.
        keep: keep only the ``keep`` newest checkpoints afterwards (0: keep all).
        model_state: the weights to save instead of ``model``'s own (FSDP2: the full state dict
            gathered on rank 0, see :meth:`snap_fast.train.parallel.DataParallel.full_state`).
        optimizer_state: written to ``optimizer.pt`` when given (FSDP2's full optimizer state).
    """
    parent = Path(run_dir) / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=parent))
    try:
        if _is_peft(model):
            model.save_pretrained(tmp / "adapter", state_dict=model_state)
        else:
            model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save({**trainer_state, "step": step}, tmp / STATE_FILE)
        if final.exists():  # a re-save of the same step (e.g. a signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a full-fine-tuning checkpoint's ``model/*.safetensors`` files."""
    from safetensors.torch import load_file

    files = sorted((folder / "model").glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {folder} has no model weights (is it a LoRA run?)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _load_weights(folder: Path, model: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    if _is_peft(model):
        from peft import set_peft_model_state_dict

        weights = folder / "adapter" / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no LoRA adapter (is it a full fine-tuning run?)")
        result = set_peft_model_state_dict(model, load_file(str(weights)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint {folder}: adapter keys the model does not have: {unexpected[:5]}")
        return
    state = _model_weights(folder)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {folder}: weights the model does not have: {result.unexpected_keys[:5]}")
    # save_pretrained drops tied copies (e.g. lm_head.weight = embed_tokens.weight); any other
    # missing tensor means the checkpoint does not match the model.
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in result.missing_keys if k in params and params[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"checkpoint {folder}: weights missing for {untied[:5]}")


def read_full_weights(folder: str | os.PathLike, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as a full state dict named like ``model``'s parameters (CPU).

    For a model whose weights cannot be loaded in place file by file (FSDP2: load the result
    with :meth:`~snap_fast.train.parallel.DataParallel.load_full_state`). LoRA: the adapter's
    tensors under the model's own names (PEFT saves them without the adapter name). Full
    fine-tuning: every weight, tied copies that ``save_pretrained`` dropped filled in from their
    twin, so loading the dict in any order gives the tied parameter one value.

    Raises:
        FileNotFoundError: no adapter / model files in ``folder``.
        ValueError: the files do not match ``model``'s parameters.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    if _is_peft(model):
        weights = folder / "adapter" / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no LoRA adapter (is it a full fine-tuning run?)")
        # PEFT's file names drop ".<adapter name>" from the parameter names.
        suffix = f".{model.active_adapter}"
        by_saved = {n.replace(suffix, ""): n for n, p in params.items() if p.requires_grad}
        saved = load_file(str(weights))
        unknown = sorted(set(saved) - set(by_saved))
        missing = sorted(set(by_saved) - set(saved))
        if unknown or missing:
            raise ValueError(f"checkpoint {folder}: adapter does not match the model (unknown: {unknown[:3]}, "
                             f"missing: {missing[:3]})")
        return {by_saved[k]: v for k, v in saved.items()}
    state = _model_weights(folder)
    unknown = sorted(set(state) - set(params) - {n for n, _ in model.named_buffers()})
    if unknown:
        raise ValueError(f"checkpoint {folder}: weights the model does not have: {unknown[:5]}")
    loaded = {id(params[n]): n for n in state if n in params}
    for name, p in params.items():
        if name not in state:
            if id(p) not in loaded:
                raise ValueError(f"checkpoint {folder}: weights missing for {name!r}")
            state[name] = state[loaded[id(p)]]
    return state


def load_checkpoint(folder: str | os.PathLike, model: torch.nn.Module | None) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (in place) and return its trainer state.

    The caller restores the optimizer, scheduler, regularizer and RNG from the returned dict
    (they must be built first, from the freshly loaded original model). ``model=None`` reads
    the trainer state only (FSDP2 loads the weights with :func:`read_full_weights`).
    """
    folder = Path(folder)
    if model is not None:
        _load_weights(folder, model)
    # Our own file: it holds NumPy RNG state, which weights_only loading rejects.
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
