"""The unlearning recipe: config in, run folder out, one loop read top to bottom.

    result = unlearn(UnlearnConfig(model="smollm2-135m-instruct", data="hp_data", out="runs/hp"))

:func:`unlearn` validates the config, creates the run folder (``config.yaml`` first), loads the
model, wraps it with LoRA (or trains all weights), builds the regularizer from the *original*
weights, computes NPO reference log-probabilities if the method needs them, restores the last
checkpoint when resuming, then runs the loop: per optimizer step, ``grad_accum`` micro-batches
of forget / retain / general examples, the method's loss terms, ``λ · SWD`` once per step,
clipping, AdamW, the linear schedule; logs to ``metrics.jsonl`` (and TensorBoard when
installed); checkpoints atomically; stops cleanly on SIGINT/SIGTERM; and finally writes the
adapter (and merged model) under ``final/`` and ``summary.json``.

Under ``torchrun`` the loop is data parallel: DDP, or with ``parallel="fsdp"`` FSDP2 (the model
sharded right after it is built, the sharded regularizer, full state dicts gathered on rank 0
for checkpoints and the final model); see :mod:`snap_fast.train.parallel`.

Device and process concerns live in :mod:`snap_fast.train.runtime`; checkpoint files in
:mod:`snap_fast.train.checkpoint`; the loss terms in :mod:`snap_fast.train.losses`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.io import atomic_write_text, read_jsonl
from . import losses
from .checkpoint import (
    OPTIMIZER_FILE,
    last_checkpoint,
    load_checkpoint,
    read_full_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import UnlearnConfig, lora_layer_indices
from .parallel import DataParallel
from .runtime import EXIT_CODES, Runtime, StopSignals, seed_everything

__all__ = ["NonFiniteLossError", "RunResult", "StepCallback", "UnlearnData", "unlearn"]

#: ``on_step(step, metrics, model)``, called after every optimizer step (step counts from 1).
StepCallback = Callable[[int, dict, torch.nn.Module], None]


class NonFiniteLossError(RuntimeError):
    """A loss term, the regularizer or the gradient norm became NaN/inf; the run stopped and
    the last good checkpoint was kept."""


@dataclass
class RunResult:
    """What :func:`unlearn` returns.

    Attributes:
        status: ``"completed"`` or ``"interrupted"`` (a signal; see :attr:`signal`).
        run_dir: the run folder.
        steps: optimizer steps done (counting resumed ones).
        total_steps: steps the run was planned for.
        signal: ``"SIGINT"``/``"SIGTERM"`` when interrupted.
        checkpoint: the newest checkpoint folder (``None`` if none was written).
        final_dir: ``<run>/final`` once completed.
        last_metrics: the last metrics record.
    """

    status: str
    run_dir: Path
    steps: int
    total_steps: int
    signal: str | None = None
    checkpoint: Path | None = None
    final_dir: Path | None = None
    last_metrics: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """Process exit code: 0 completed, 130 SIGINT, 143 SIGTERM."""
        return EXIT_CODES[self.signal] if self.status == "interrupted" else EXIT_CODES[self.status]


# ---------------------------------------------------------------------------------------- data
class UnlearnData:
    """The training sets and their order: a pure function of ``(seed, step)``.

    Each epoch is one pass over the forget set in a seeded random order; the retain and general
    sets are subsampled (without replacement, cycling when smaller) to the forget-set size for
    that epoch (SNAP.md §3), times ``R/B`` when their micro-batches hold ``R`` examples
    (``retain_batch_size``, ``general_batch_size``) against the forget set's ``B``. Micro-batch
    ``j`` of an epoch pairs forget examples ``order[j·B:(j+1)·B]`` with positions
    ``j·R:(j+1)·R`` of each of the retain and general subsamples (each with its own ``R``).
    Because the order depends only on the seed and the epoch, resuming needs just the step number.
    """

    def __init__(self, forget: list[dict], retain: list[dict], general: list[dict], *,
                 forget_key: str, batch_size: int, grad_accum: int, seed: int,
                 retain_batch_size: int | None = None, general_batch_size: int | None = None):
        self.forget, self.retain, self.general = forget, retain, general
        self.forget_key = forget_key
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.retain_batch_size = retain_batch_size or batch_size
        self.general_batch_size = general_batch_size or self.retain_batch_size
        self._set_batch = {"retain": self.retain_batch_size, "general": self.general_batch_size}
        self.micro_per_epoch = math.ceil(len(forget) / batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / grad_accum)
        self._orders: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, cfg: UnlearnConfig) -> UnlearnData:
        folder = Path(folder)
        forget = read_jsonl(folder / "forget.jsonl")

        def optional(name: str, wanted: bool) -> list[dict]:
            path = folder / name
            return read_jsonl(path) if wanted and path.is_file() else []

        retain = optional("retain.jsonl", cfg.uses_retain and cfg.alpha > 0)
        general = optional("general.jsonl", cfg.uses_retain and cfg.alpha > 0 and cfg.use_general)
        return cls(forget, retain, general, forget_key=cfg.forget_target, batch_size=cfg.batch_size,
                   grad_accum=cfg.grad_accum, seed=cfg.seed, retain_batch_size=cfg.retain_batch_size,
                   general_batch_size=cfg.general_batch_size)

    def _subsample(self, rng: np.random.Generator, size: int, per_batch: int) -> np.ndarray:
        n = math.ceil(len(self.forget) * per_batch / self.batch_size)
        reps = math.ceil(n / size)
        return np.concatenate([rng.permutation(size) for _ in range(reps)])[:n]

    def epoch_order(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            order = {"forget": rng.permutation(len(self.forget))}
            for name in ("retain", "general"):
                rows = getattr(self, name)
                order[name] = (self._subsample(rng, len(rows), self._set_batch[name]) if rows
                               else np.zeros(0, dtype=np.int64))
            self._orders = {epoch: order}  # only the current epoch is ever needed again
        return self._orders[epoch]

    def position(self, step: int) -> dict[str, int]:
        """The data-order state before optimizer step ``step`` (0-based)."""
        return {"epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch}

    def micro_batches(self, step: int) -> list[dict[str, Any]]:
        """Micro-batches of optimizer step ``step``: dicts with ``forget``/``retain``/``general``
        lists of {"prompt","response"} and ``forget_idx`` (long tensor), ``retain_idx``,
        ``general_idx`` (int arrays): their indices into the sets."""
        pos = self.position(step)
        order = self.epoch_order(pos["epoch"])
        first = pos["step_in_epoch"] * self.grad_accum
        last = min(first + self.grad_accum, self.micro_per_epoch)
        out = []
        for j in range(first, last):
            sl = slice(j * self.batch_size, (j + 1) * self.batch_size)
            idx = order["forget"][sl]
            mb: dict[str, Any] = {
                "forget_idx": torch.as_tensor(idx, dtype=torch.long),
                "forget": [_pair(self.forget[i], self.forget_key) for i in idx],
            }
            for name in ("retain", "general"):
                rows = getattr(self, name)
                per_batch = self._set_batch[name]
                drawn = order[name][j * per_batch : (j + 1) * per_batch]
                mb[name + "_idx"] = drawn
                mb[name] = [_pair(rows[i], "response") for i in drawn]
            out.append(mb)
        return out


def _pair(record: dict, key: str) -> dict[str, Any]:
    # An original answer cut at the generation cap is trained on without an EOS (collator).
    truncated = bool(record.get("original_truncated")) and record[key] == record.get("original_response")
    return {"prompt": record["prompt"], "response": record[key], "truncated": truncated}


# ---------------------------------------------------------------------------------------- model
def _load_and_wrap(cfg: UnlearnConfig, runtime: Runtime):
    """Load the model and tokenizer; wrap with LoRA or unfreeze everything."""
    from ..models import load_model

    model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=runtime.device,
                                  trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {cfg.model!r}: its tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False  # no KV cache in training; it also conflicts with checkpointing
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets
        layers = lora_layer_indices(cfg.lora_layers, model.config.num_hidden_layers)
        if layers is not None and targets == "all-linear":  # PEFT takes layers_to_transform with names only
            targets = _linear_module_names(model)
        # LoRA's A factors are drawn here: seeding makes them (and so the regularizer's initial
        # state) the same on a resume as in the original run.
        torch.manual_seed(cfg.seed)
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM",
        ))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model, tokenizer


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    """What PEFT's ``"all-linear"`` adapts, as module names: the linear layers (GPT-2's
    ``Conv1D`` included) other than the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head})


def _build_regularizer(model: torch.nn.Module, cfg: UnlearnConfig, sharded: bool):
    """λ·SWD's regularizer over the trainable weights (LoRA-aware for PEFT models), or None.

    ``sharded`` (FSDP2): the sharded regularizer, which never gathers a weight; same value.
    """
    if not cfg.lam > 0:
        return None
    if sharded:
        from ..dist import ShardedSlicedWassersteinRegularizer as Regularizer
    else:
        from ..regularizer import SlicedWassersteinRegularizer as Regularizer

    return Regularizer(
        model, n_projections=cfg.n_projections, p=cfg.reg_p, mode=cfg.reg_mode,
        refresh_every=cfg.reg_refresh_every, seed=cfg.seed, backend=cfg.reg_backend,
    )


@torch.no_grad()
def reference_logprobs(model, collator, data: UnlearnData, runtime: Runtime, batch_size: int) -> torch.Tensor:
    """log π_ref(y|x) of every forget example under the original model, (N,) float32 on CPU.

    Computed once, before training changes any weight (see :func:`original_logits`).
    """
    out = torch.empty(len(data.forget))
    for start in range(0, len(data.forget), batch_size):
        rows = data.forget[start:start + batch_size]
        batch = runtime.to_device(collator([_pair(r, data.forget_key) for r in rows]))
        with runtime.autocast():
            logits = original_logits(model, None, batch)
        out[start:start + len(rows)] = losses.sequence_logprob(logits, batch["labels"]).cpu()
    return out


def accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes ``logits_to_keep`` (transformers ≥ 4.50)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_window(labels: torch.Tensor) -> int:
    """How many trailing positions of a batch the losses read: from the one that predicts the
    batch's earliest answer token to the end (HF's ``logits_to_keep``).

    Every loss here reads logits only where they predict an answer token, so the LM head (a
    V × d matmul per position, V = 49 152 for SmolLM2) and the softmax can skip the prompt. With
    ``labels[:, -keep:]`` beside logits of the last ``keep`` positions, the losses' causal shift
    pairs the same logits and labels as on the whole sequence.
    """
    answer = (labels[:, 1:] != losses.IGNORE_INDEX).any(dim=0)
    if not bool(answer.any()):
        return labels.shape[1]
    return labels.shape[1] - int(answer.nonzero()[0])


@torch.no_grad()
def original_logits(model, frozen: torch.nn.Module | None, batch: dict[str, torch.Tensor],
                    keep: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) of the original model on ``batch``, in eval mode (no dropout):
    ``frozen`` when given (a copy kept for full fine-tuning), else ``model`` with its LoRA
    adapter disabled (the original model whatever the adapter holds) or, without an adapter,
    ``model`` itself (only the original before training changes a weight). ``keep``: only the
    last ``keep`` positions (B, keep, V), see :func:`answer_window`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if keep is not None:
        inputs["logits_to_keep"] = keep
    if frozen is not None:
        return frozen(**inputs).logits
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with adapter_off:
            return model(**inputs).logits
    finally:
        model.train(was_training)


def _answer_positions(collator, record: dict) -> int:
    """Answer positions of one retain/general example as the collator labels it (after the shift)."""
    _, labels = collator.encode(record["prompt"], record["response"], truncated=record.get("truncated", False))
    return sum(1 for label in labels[1:] if label != losses.IGNORE_INDEX)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


@torch.no_grad()
def reference_answer_logprobs(model, collator, data: UnlearnData,
                              runtime: Runtime, batch_size: int, limit_gib: float,
                              progress: bool = True) -> dict[str, list[torch.Tensor]] | None:
    """The original model's next-token log-probabilities at every answer position of the retain
    and general sets, computed once, before training changes ``model``: ``{"retain": [...],
    "general": [...]}``, one (n_i, V) float32 CPU tensor per example (n_i its answer tokens, in
    :func:`losses.answer_logprobs` order), or None when they would take more than ``limit_gib``
    GiB (then every step runs the original model on its batch instead).

    Why: ``retain_loss="kl"`` otherwise spends one extra forward per retain/general batch on
    the original model, about a quarter of a LoRA step; the answers are fixed, so are these.
    With right padding an example's rows do not depend on its batch, so per-example rows
    concatenated in batch order equal what the per-step forward gives.
    """
    sets = {name: [_pair(r, "response") for r in getattr(data, name)] for name in ("retain", "general")}
    positions = sum(_answer_positions(collator, r) for rows in sets.values() for r in rows)
    if positions * _vocab_size(model) * 4 > limit_gib * 2**30:
        return None
    from tqdm.auto import tqdm

    total = sum(len(rows) for rows in sets.values())
    trim = accepts_logits_to_keep(model)  # LM head on the answer window only, as in the steps
    out: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=total, desc="original model (KL reference)", unit="example",
              disable=not progress or not runtime.is_main_process, dynamic_ncols=True) as bar:
        for name, rows in sets.items():
            out[name] = []
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = runtime.to_device(collator(chunk))
                labels = batch["labels"]
                keep = answer_window(labels) if trim else None
                with runtime.autocast():
                    logits = original_logits(model, None, batch, keep)
                if keep is not None:
                    labels = labels[:, -keep:]
                # One log-softmax for the chunk, split per example (rows are in row-major order).
                counts = (labels[:, 1:] != losses.IGNORE_INDEX).sum(dim=1).tolist()
                out[name] += list(losses.answer_logprobs(logits, labels).cpu().split(counts))
                bar.update(len(chunk))
    return out


def _optimizer_and_schedule(model, cfg: UnlearnConfig, total_steps: int):
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    # As Hugging Face's Trainer: no weight decay on biases and norm weights (1-D tensors).
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup, total_steps)
    return optimizer, scheduler


def _lora_stats(model) -> dict[str, float]:
    """LoRA-delta statistics as flat metrics (empty without LoRA).

    ``lora/<stat>`` holds the whole-model total and ``lora/<module>/<stat>`` each adapted layer,
    from :func:`snap_fast.lora_delta_stats`; the report draws the per-layer figures from them.
    """
    from snap_fast.ops.lora_stats import lora_delta_stats

    if not hasattr(model, "peft_config"):
        return {}
    try:
        stats = lora_delta_stats(model)
    except ValueError as exc:  # an adapter kind the statistics do not support: monitoring only
        warnings.warn(f"LoRA-delta statistics unavailable: {exc}", stacklevel=2)
        return {}
    flat: dict[str, float] = {}
    for module, values in stats.items():
        prefix = "lora/" if module == "total" else f"lora/{module}/"
        flat.update({prefix + k: float(v) for k, v in values.items() if isinstance(v, (int, float))})
    return flat


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


# ---------------------------------------------------------------------------------------- run folder
def _prepare_run_folder(cfg: UnlearnConfig) -> Path:
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


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Drop metrics lines after ``upto_step`` (steps re-run after a resume are logged again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= upto_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _write_summary(run_dir: Path, cfg: UnlearnConfig, **fields) -> None:
    from .. import __version__

    summary = {"snap_fast_version": __version__, "method": cfg.method, "lora": cfg.lora, "lam": cfg.lam,
               "model": cfg.model, "data": cfg.data, **fields}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def _save_final(run_dir: Path, model, tokenizer, cfg: UnlearnConfig,
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


# ---------------------------------------------------------------------------------------- the recipe
def unlearn(config: UnlearnConfig | dict, *, on_step: StepCallback | None = None) -> RunResult:
    """Unlearn a target: train ``config.model`` on ``config.data`` and write ``config.out``.

    Args:
        config: an :class:`UnlearnConfig` (or a dict of its fields).
        on_step: optional ``on_step(step, metrics, model)`` called after every optimizer step.

    Returns:
        A :class:`RunResult` (``status`` "completed", or "interrupted" after SIGINT/SIGTERM,
        with a checkpoint saved).

    Raises:
        ValueError / TypeError: bad configuration, model spec or data, before any heavy work.
        NonFiniteLossError: a NaN/inf loss, regularizer or gradient norm (the last good
            checkpoint is kept, ``summary.json`` says "diverged").
    """
    # 1. Validate everything cheap before loading anything heavy.
    if isinstance(config, dict):
        config = UnlearnConfig.from_dict(config)
    if not isinstance(config, UnlearnConfig):
        raise TypeError(f"config must be an UnlearnConfig or dict, got {type(config).__name__}")
    cfg = config.resolved()
    # Under several processes rank 0 alone checks and writes the run folder: a slower rank may
    # get here after rank 0 has created it.
    cfg.validate(run_folder=os.environ.get("RANK", "0") == "0")
    # Several processes (torchrun / accelerate launch): data parallel (DDP, or FSDP2 sharding),
    # rank 0 writes the run folder.
    par = DataParallel.from_env(cfg.device, fsdp=cfg.parallel == "fsdp")
    if cfg.retain_loss == "kl" and not cfg.lora and par.sharded:
        raise ValueError("retain_loss='kl' with full fine-tuning keeps a frozen copy of the model, which "
                         "FSDP does not shard: use LoRA, parallel='ddp' or retain_loss='nll'")
    runtime = par.runtime(cfg.device, cfg.precision)

    # 2. Run folder: config.yaml is the first file written.
    run_dir = par.main_first(lambda: _prepare_run_folder(cfg)) or Path(cfg.out)
    metrics_path = run_dir / "metrics.jsonl"
    seed_everything(cfg.seed)

    # 3. Model (LoRA-wrapped or fully trainable), data, collator.
    model, tokenizer = _load_and_wrap(cfg, runtime)
    model = par.shard(model)  # FSDP2: from here on, parameters are row shards (DTensors)
    data = UnlearnData.from_folder(cfg.data, cfg)
    from ..data.collator import ChatCollator

    collator = ChatCollator(tokenizer, max_length=cfg.max_length)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * data.steps_per_epoch)

    # 4. Everything that must see the ORIGINAL weights, before a checkpoint is loaded.
    regularizer = _build_regularizer(model, cfg, par.sharded)
    ref_logprob = None
    # retain_loss="kl" compares with the original model: its answer log-probabilities cached
    # here when they fit (before any checkpoint is loaded, so ``model`` itself is the original
    # even without an adapter to disable), else per batch the base with the adapter disabled
    # under LoRA, or a frozen copy made here.
    frozen = ref_answers = None
    if cfg.retain_loss == "kl" and (data.retain or data.general):
        ref_answers = reference_answer_logprobs(model, collator, data, runtime, data.retain_batch_size,
                                                cfg.reference_cache_gib, cfg.progress)
        if ref_answers is None and not cfg.lora:
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.method in ("npo", "snap-npo"):
        ref_logprob = reference_logprobs(model, collator, data, runtime, cfg.batch_size)
    optimizer, scheduler = _optimizer_and_schedule(model, cfg, total_steps)

    # 5. Resume: weights, optimizer, schedule, regularizer directions, RNG.
    start_step = 0
    checkpoint = last_checkpoint(run_dir) if cfg.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, None if par.sharded else model)
        reg_state = _regularizer_state(state, par, checkpoint) if regularizer is not None else None
        if par.sharded:  # rank 0 reads the full weights and optimizer state, every rank keeps its rows
            weights = read_full_weights(checkpoint, model) if par.is_main else {}
            optim = torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu") if par.is_main else {}
            par.load_full_state(model, weights, optimizer, optim)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if regularizer is not None:
            regularizer.load_state_dict(reg_state)
        set_rng_state(state["rng"])
        start_step = int(state["step"])
    if runtime.is_main_process:
        _truncate_metrics(metrics_path, start_step)

    def save(step: int) -> Path:
        path = run_dir / "checkpoints" / f"step-{step}"
        state: dict[str, Any] = {"scheduler": scheduler.state_dict(), "rng": rng_state(), "data": data.position(step)}
        model_state = optim_state = None
        if par.sharded:
            # Collective: full trainable weights and optimizer state gathered on rank 0; the
            # sharded regularizer's state is per rank (its cache is sharded), gathered as a list.
            # Its initial copies are left out: a resume rebuilds them from the original model.
            model_state, optim_state = par.full_state(model, optimizer)
            state["optimizer"] = None
            state["regularizer"] = None
            state["regularizer_ranks"] = (par.gather_objects(regularizer.state_dict(include_initial=False))
                                          if regularizer is not None else None)
        else:
            state["optimizer"] = optimizer.state_dict()
            state["regularizer"] = regularizer.state_dict() if regularizer is not None else None
        if runtime.is_main_process:
            path = save_checkpoint(run_dir, step, model, state, keep=cfg.keep_checkpoints,
                                   model_state=model_state, optimizer_state=optim_state)
        par.barrier()
        return path

    # 6. The loop.
    trainable = [p for p in model.parameters() if p.requires_grad]
    forward_model = par.wrap(model)  # DistributedDataParallel under several processes (not FSDP2)
    trim_logits = accepts_logits_to_keep(model)  # LM head on the answer window only
    writer = _tensorboard(run_dir) if runtime.is_main_process else None
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, desc=f"unlearn ({cfg.method})", unit="step",
               disable=not cfg.progress or not runtime.is_main_process, dynamic_ncols=True)
    metrics: dict[str, Any] = {}
    saved_step = start_step if checkpoint is not None else None
    started = time.perf_counter()
    try:
        with StopSignals() as stop:
            for step in range(start_step, total_steps):
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                train_forget, train_retain = losses.step_terms(cfg.method, step, bool(data.retain or data.general))
                micro = data.micro_batches(step)
                sums: dict[str, float] = {}
                tokens = 0
                for mb, weight in par.split(micro):  # weight: this rank's share, see DataParallel
                    terms: dict[str, torch.Tensor] = {}
                    with runtime.autocast():
                        sets = (["forget"] if train_forget else []) + (
                            [s for s in ("retain", "general") if mb[s]] if train_retain else [])
                        for name in sets:
                            batch = runtime.to_device(collator(mb[name]))
                            tokens += int(batch["attention_mask"].sum()) if weight else 0
                            keep = answer_window(batch["labels"]) if trim_logits else None
                            logits = forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                   **({"logits_to_keep": keep} if keep else {})).logits
                            if keep:
                                batch["labels"] = batch["labels"][:, -keep:]
                            if name == "forget":
                                ref = ref_logprob[mb["forget_idx"]] if ref_logprob is not None else None
                                terms[name] = losses.forget_loss(cfg.method, logits, batch["labels"],
                                                                 ref_logprob=ref, beta=cfg.npo_beta)
                            elif ref_answers is not None:  # retain_loss="kl", cached reference
                                ref = torch.cat([ref_answers[name][i] for i in mb[name + "_idx"]])
                                terms[name] = losses.kl_to_reference_logprobs(logits, ref.to(logits.device),
                                                                              batch["labels"])
                            elif cfg.retain_loss == "kl":
                                ref_logits = original_logits(model, frozen, batch, keep)
                                terms[name] = losses.kl_to_reference(logits, ref_logits, batch["labels"])
                            else:
                                terms[name] = losses.nll(logits, batch["labels"])
                    loss = losses.combine(terms.get("forget"), terms.get("retain"), terms.get("general"),
                                          alpha=cfg.alpha) * weight
                    _check_finite(loss, step + 1, "loss", run_dir, cfg, saved_step, terms)
                    loss.backward()
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + float(value.detach()) * weight / par.world_size
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / par.world_size
                sums, tokens = par.reduce_step(sums, tokens)  # the single-process sums

                # λ·SWD once per optimizer step, in float32 outside autocast.
                reg_value = None
                if regularizer is not None:
                    reg = regularizer()
                    _check_finite(reg, step + 1, "regularizer", run_dir, cfg, saved_step, {})
                    (cfg.lam * reg).backward()
                    reg_value = float(reg.detach())
                    sums["loss"] += cfg.lam * reg_value

                # An infinite max norm measures without clipping: the check runs either way.
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of per-rank partial norms
                    grad_norm = grad_norm.full_tensor()
                _check_finite(grad_norm, step + 1, "gradient norm", run_dir, cfg, saved_step, {})
                grad_norm = float(grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                done = step + 1
                elapsed = time.perf_counter() - t0
                metrics = {
                    "step": done,
                    "epoch": done / data.steps_per_epoch,
                    "lr": lr,
                    "loss": sums["loss"],
                    "loss_forget": sums.get("forget"),
                    "loss_retain": sums.get("retain"),
                    **({"loss_general": sums.get("general")} if data.general else {}),
                    "reg": reg_value,
                    "reg_weighted": cfg.lam * reg_value if reg_value is not None else None,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                    "step_time_s": elapsed,
                }
                # LoRA-delta statistics need whole base weights, which FSDP2 never gathers.
                if (done % cfg.lora_stats_every == 0 or done == total_steps) and not par.sharded:
                    metrics.update(_lora_stats(model))
                if (done % cfg.log_every == 0 or done == total_steps) and runtime.is_main_process:
                    _append_metrics(metrics_path, metrics, writer)
                bar.update(1)
                bar.set_postfix(_postfix(metrics), refresh=False)

                if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                    save(done)
                    saved_step = done
                if on_step is not None:
                    on_step(done, metrics, model)
                if par.any(stop.received is not None):  # every rank stops at the same step
                    stop.received = stop.received or "SIGTERM"
                    checkpoint = save(done) if saved_step != done else last_checkpoint(run_dir)
                    if runtime.is_main_process:
                        _write_summary(run_dir, cfg, status="interrupted", signal=stop.received, steps=done,
                                       total_steps=total_steps, checkpoint=checkpoint, last_metrics=metrics)
                    tqdm.write(f"{stop.received}: checkpoint saved to {checkpoint}; continue with --resume",
                               file=sys.stderr)
                    return RunResult("interrupted", run_dir, done, total_steps, stop.received, checkpoint,
                                     None, metrics)
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    # 7. Final artefacts: a last checkpoint (resumable), adapter / merged model, summary.
    checkpoint = save(total_steps) if saved_step != total_steps else last_checkpoint(run_dir)
    final_dir = run_dir / "final"
    final_state = par.full_state(model)[0] if par.sharded else None  # collective, before rank 0 saves
    if runtime.is_main_process:
        final_dir = _save_final(run_dir, model, tokenizer, cfg, final_state)
        _write_summary(run_dir, cfg, status="completed", steps=total_steps, total_steps=total_steps,
                       checkpoint=checkpoint, final=final_dir, elapsed_s=time.perf_counter() - started,
                       last_metrics=metrics, peak_memory_bytes=runtime.peak_memory_bytes())
    par.barrier()  # the run folder is complete when any rank returns
    return RunResult("completed", run_dir, total_steps, total_steps, None, checkpoint, final_dir, metrics)


def _regularizer_state(state: dict[str, Any], par: DataParallel, checkpoint: Path) -> dict[str, Any]:
    """This rank's regularizer state from a checkpoint; FSDP2 keeps one per rank."""
    per_rank = state.get("regularizer_ranks")
    if par.sharded and (per_rank is None or len(per_rank) != par.world_size):
        written = f"{len(per_rank)} FSDP2 processes" if per_rank else "a run without FSDP2 sharding"
        raise ValueError(f"resume: checkpoint {checkpoint} was written by {written}; this run has "
                         f"{par.world_size}: resume with the same number of processes")
    if not par.sharded and per_rank is not None:
        raise ValueError(f"resume: checkpoint {checkpoint} was written by {len(per_rank)} FSDP2 processes; "
                         f"resume with the same number of processes (torchrun --nproc_per_node {len(per_rank)})")
    return per_rank[par.rank] if par.sharded else state["regularizer"]


def _check_finite(value: torch.Tensor, step: int, what: str, run_dir: Path, cfg: UnlearnConfig,
                  saved_step: int | None, terms: dict[str, torch.Tensor]) -> None:
    if bool(torch.isfinite(value.detach()).all()):
        return
    detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
    kept = f"the last good checkpoint is step {saved_step}" if saved_step else "no checkpoint was written"
    message = (f"non-finite {what} at step {step} ({detail or float(value.detach())}); training stopped, "
               f"{kept}. Lower the learning rate (lr={cfg.lr}) or λ (lam={cfg.lam}).")
    _write_summary(run_dir, cfg, status="diverged", steps=step - 1, error=message)
    raise NonFiniteLossError(message)


def _append_metrics(path: Path, metrics: dict, writer) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(metrics) + "\n")
    if writer is not None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                writer.add_scalar(key, value, metrics["step"])


def _postfix(metrics: dict) -> dict[str, str]:
    shown = {"loss": "loss", "loss_forget": "forget", "loss_retain": "retain", "reg": "reg",
             "tokens_per_s": "tok/s"}
    return {label: f"{metrics[k]:.4g}" for k, label in shown.items() if metrics.get(k) is not None}
