"""The unlearning recipe: config in, run folder out, a class read top to bottom.

    result = unlearn(UnlearnConfig(model="smollm2-135m-instruct", data="hp_data", out="runs/hp"))

:class:`UnlearnRecipe` checks the config when it is built; ``setup()`` then creates the run
folder (``config.yaml`` first), loads the model, wraps it with LoRA (or trains all weights),
builds the regularizer and prepares the method's loss terms from the *original* weights (NPO and
KL read the original model there), restores the last checkpoint when resuming. ``train()`` runs
the loop: per optimizer step, ``grad_accum`` micro-batches of forget / retain / general examples
through the method's terms (:mod:`snap_fast.train.methods`), ``λ · SWD`` once per step,
clipping, AdamW, the linear schedule; logs to ``metrics.jsonl`` (and TensorBoard when
installed); checkpoints atomically; stops cleanly on SIGINT/SIGTERM; and finally writes the
adapter (and merged model) under ``final/`` and ``summary.json``.

Under ``torchrun`` the loop is data parallel: DDP, or with ``parallel="fsdp"`` FSDP2 (the model
sharded right after it is built, the sharded regularizer, full state dicts gathered on rank 0
for checkpoints and the final model); see :mod:`snap_fast.train.parallel`.

Device and process concerns live in :mod:`snap_fast.train.runtime`, checkpoint files in
:mod:`snap_fast.train.checkpoint`, the other run-folder files in :mod:`snap_fast.train.run_folder`,
batches in :mod:`snap_fast.train.batches`, the original model's outputs in
:mod:`snap_fast.train.original`. The data-parallel strategy (:class:`DataParallel`) decides
everything that differs between one process, DDP and FSDP2; the recipe never branches on it.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import original
from .batches import UnlearnData
from .checkpoint import last_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import UnlearnConfig
from .losses import combine
from .methods import get_method, retain_term
from .parallel import DataParallel
from .run_folder import MetricsLog, prepare_run_folder, save_final, write_summary
from .runtime import EXIT_CODES, StopSignals, seed_everything
from .terms import SetBatch, TermSetup
from .trainable import load_trainable, optimizer_and_schedule

__all__ = ["NonFiniteLossError", "RunResult", "StepCallback", "UnlearnData", "UnlearnRecipe", "unlearn"]

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


# ---------------------------------------------------------------------------------------- the recipe
class UnlearnRecipe:
    """One unlearning run: ``setup()`` → ``train()`` (which ends with the final artefacts).

    Args:
        config: an :class:`UnlearnConfig` (or a dict of its fields); validated here, before
            anything heavy is loaded or any file is written.
        on_step: optional ``on_step(step, metrics, model)`` called after every optimizer step.

    Raises:
        ValueError / TypeError: bad configuration, model spec or data.
    """

    def __init__(self, config: UnlearnConfig | dict, *, on_step: StepCallback | None = None):
        if isinstance(config, dict):
            config = UnlearnConfig.from_dict(config)
        if not isinstance(config, UnlearnConfig):
            raise TypeError(f"config must be an UnlearnConfig or dict, got {type(config).__name__}")
        cfg = self.cfg = config.resolved()
        # Under several processes rank 0 alone checks and writes the run folder: a slower rank may
        # get here after rank 0 has created it.
        cfg.validate(run_folder=os.environ.get("RANK", "0") == "0")
        self.on_step = on_step
        self.method = get_method(cfg.method)
        self.par = DataParallel.from_env(cfg.device, fsdp=cfg.parallel == "fsdp")
        if cfg.retain_loss == "kl" and not cfg.lora and self.par.sharded:
            raise ValueError("retain_loss='kl' with full fine-tuning keeps a frozen copy of the model, which "
                             "FSDP does not shard: use LoRA, parallel='ddp' or retain_loss='nll'")
        self.runtime = self.par.runtime(cfg.device, cfg.precision)

    # ------------------------------------------------------------------ setup
    def setup(self) -> UnlearnRecipe:
        """Run folder, model, data, loss terms and regularizer, optimizer, resume state."""
        cfg, par = self.cfg, self.par
        self.run_dir = par.main_first(lambda: prepare_run_folder(cfg)) or Path(cfg.out)
        seed_everything(cfg.seed)
        model, self.tokenizer = load_trainable(cfg, self.runtime)
        self.model = par.shard(model)  # FSDP2: from here on, parameters are row shards (DTensors)
        self.data = UnlearnData.from_folder(cfg.data, cfg)
        from ..data.collator import ChatCollator

        self.collator = ChatCollator(self.tokenizer, max_length=cfg.max_length)
        self.total_steps = cfg.max_steps or max(math.ceil(cfg.epochs * self.data.steps_per_epoch), cfg.min_steps)
        self._prepare_terms()
        self.optimizer, self.scheduler = optimizer_and_schedule(self.model, cfg, self.total_steps)
        self.start_step, self.saved_step = self._resume()
        self.log = MetricsLog(self.run_dir, self.start_step, self.runtime.is_main_process)
        return self

    def _prepare_terms(self) -> None:
        """Everything that must see the ORIGINAL weights, before a checkpoint is loaded."""
        cfg = self.cfg
        self.regularizer = None
        if cfg.lam > 0 and cfg.reg_kind == "l2sp":
            from ..regularizer.l2sp import L2SPRegularizer

            self.regularizer = L2SPRegularizer(self.model, normalize=cfg.reg_normalize)
        elif cfg.lam > 0:
            self.regularizer = self.par.build_regularizer(
                self.model, n_projections=cfg.n_projections, p=cfg.reg_p, mode=cfg.reg_mode,
                refresh_every=cfg.reg_refresh_every, seed=cfg.seed, backend=cfg.reg_backend,
                normalize=cfg.reg_normalize,
            )
        self.terms = {}
        if self.data.retain or self.data.general:
            self.terms["retain"] = self.terms["general"] = retain_term(cfg.retain_loss)
        self.terms["forget"] = self.method.forget_term(cfg.npo_beta)
        setup = TermSetup(self.model, self.collator, self.data, self.runtime, cfg)
        for term in {id(t): t for t in self.terms.values()}.values():  # the shared retain term once
            term.prepare(setup)

    def _resume(self) -> tuple[int, int | None]:
        """Weights, optimizer, schedule, regularizer directions and RNG of the last checkpoint.

        Returns the step to start from and the step of the checkpoint on disk (None if none).
        """
        checkpoint = last_checkpoint(self.run_dir) if self.cfg.resume else None
        if checkpoint is None:
            return 0, None
        state = self.par.restore(checkpoint, self.model, self.optimizer, self.regularizer)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        return step, step

    # ------------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        """The optimizer steps, then the final artefacts; a signal stops after a checkpoint."""
        from tqdm.auto import tqdm

        self.forward_model = self.par.wrap(self.model)  # DistributedDataParallel under DDP
        self.trim_logits = original.accepts_logits_to_keep(self.model)  # LM head on the answer window
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.started = time.perf_counter()
        self.metrics: dict[str, Any] = {}
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"unlearn ({self.cfg.method})",
                   unit="step", disable=not self.cfg.progress or not self.runtime.is_main_process,
                   dynamic_ncols=True)
        try:
            with StopSignals() as stop:
                for step in range(self.start_step, self.total_steps):
                    self.metrics = self._step(step)
                    bar.update(1)
                    bar.set_postfix(_postfix(self.metrics), refresh=False)
                    done = step + 1
                    if self.cfg.save_every and done % self.cfg.save_every == 0 and done < self.total_steps:
                        self._save(done)
                    if self.on_step is not None:
                        self.on_step(done, self.metrics, self.model)
                    if self.par.any(stop.received is not None):  # every rank stops at the same step
                        return self._interrupted(stop.received or "SIGTERM", done)
        finally:
            bar.close()
            self.log.close()
        return self._finish()

    def _step(self, step: int) -> dict[str, Any]:
        """One optimizer step: the micro-batches' terms, λ·SWD, clipping, AdamW; its metrics."""
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        sums, tokens = self._accumulate(step)
        reg_value = self._regularize(step, sums)
        # An infinite max norm measures without clipping: the check runs either way.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of per-rank partial norms
            grad_norm = grad_norm.full_tensor()
        self._check_finite(grad_norm, step + 1, "gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._record(step + 1, lr, sums, tokens, reg_value, float(grad_norm), time.perf_counter() - t0)

    def _accumulate(self, step: int) -> tuple[dict[str, float], int]:
        """Forward and backward of this rank's micro-batches; the single-process loss sums."""
        train_forget, train_retain = self.method.sets(step, bool(self.data.retain or self.data.general))
        sums: dict[str, float] = {}
        tokens = 0
        for mb, weight in self.par.split(self.data.micro_batches(step)):  # weight: see DataParallel
            names = (["forget"] if train_forget else []) + (
                [s for s in ("retain", "general") if mb[s]] if train_retain else [])
            values: dict[str, torch.Tensor] = {}
            with self.runtime.autocast():
                for name in names:
                    out = self._forward(name, mb)
                    tokens += int(out.batch["attention_mask"].sum()) if weight else 0
                    values[name] = self.terms[name](out)
            loss = combine(values.get("forget"), values.get("retain"), values.get("general"),
                           alpha=self.cfg.alpha) * weight
            self._check_finite(loss, step + 1, "loss", values)
            loss.backward()
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * weight / self.par.world_size
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / self.par.world_size
        return self.par.reduce_step(sums, tokens)

    def _forward(self, name: str, mb: dict[str, Any]) -> SetBatch:
        """The model's logits on one set's micro-batch, on its answer window when it can."""
        batch = self.runtime.to_device(self.collator(mb[name]))
        keep = original.answer_window(batch["labels"]) if self.trim_logits else None
        logits = self.forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    **({"logits_to_keep": keep} if keep else {})).logits
        labels = batch["labels"][:, -keep:] if keep else batch["labels"]
        return SetBatch(name, batch, logits, labels, mb[name + "_idx"], keep)

    def _regularize(self, step: int, sums: dict[str, float]) -> float | None:
        """λ·SWD once per optimizer step, in float32 outside autocast; its value (or None).

        Where this process holds whole weights, the term's gradient is formed on its own and then
        accumulated (one backward either way), so its norm ``‖λ ∇SWD‖`` is logged: next to the
        step's gradient norm it shows whether the term is active. Under FSDP2 (sharded
        gradients) it is a plain backward and the norm is not logged.
        """
        self._reg_grad_norm = None
        if self.regularizer is None:
            return None
        reg = self.regularizer()
        self._check_finite(reg, step + 1, "regularizer")
        weighted = self.cfg.lam * reg
        if self.par.holds_whole_weights and weighted.requires_grad:
            params = [p for p in self.trainable if p.requires_grad]
            grads = torch.autograd.grad(weighted, params, allow_unused=True)
            norm_sq = torch.zeros((), dtype=torch.float64, device=reg.device)
            for param, grad in zip(params, grads):
                if grad is None:
                    continue
                norm_sq += grad.double().square().sum()
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)
            self._reg_grad_norm = float(norm_sq.sqrt())
        else:
            weighted.backward()
        value = float(reg.detach())
        sums["loss"] += self.cfg.lam * value
        return value

    def _record(self, done: int, lr: float, sums: dict[str, float], tokens: int, reg_value: float | None,
                grad_norm: float, elapsed: float) -> dict[str, Any]:
        """The step's metrics record, logged every ``log_every`` steps and at the end."""
        metrics = {
            "step": done, "epoch": done / self.data.steps_per_epoch, "lr": lr, "loss": sums["loss"],
            "loss_forget": sums.get("forget"), "loss_retain": sums.get("retain"),
            **({"loss_general": sums.get("general")} if self.data.general else {}),
            "reg": reg_value, "reg_weighted": self.cfg.lam * reg_value if reg_value is not None else None,
            "reg_grad_norm": self._reg_grad_norm,
            # ‖λ ∇SWD‖ over the step's whole (unclipped) gradient norm: the term's share of the update
            "reg_grad_share": self._reg_grad_norm / grad_norm if self._reg_grad_norm is not None and grad_norm > 0
            else None,
            "grad_norm": grad_norm, "tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "step_time_s": elapsed,
        }
        last = done == self.total_steps
        # LoRA-delta statistics need whole base weights, which FSDP2 never gathers.
        if (done % self.cfg.lora_stats_every == 0 or last) and self.par.holds_whole_weights:
            metrics.update(_lora_stats(self.model))
        if done % self.cfg.log_every == 0 or last:
            self.log.append(metrics)
        return metrics

    # ------------------------------------------------------------------ saving
    def _save(self, step: int) -> Path:
        """A resumable checkpoint of step ``step`` (collective under FSDP2)."""
        path = self.run_dir / "checkpoints" / f"step-{step}"
        payload, model_state, optim_state = self.par.checkpoint_payload(self.model, self.optimizer, self.regularizer)
        state = {"scheduler": self.scheduler.state_dict(), "rng": rng_state(), "data": self.data.position(step),
                 **payload}
        if self.runtime.is_main_process:
            path = save_checkpoint(self.run_dir, step, self.model, state, keep=self.cfg.keep_checkpoints,
                                   model_state=model_state, optimizer_state=optim_state)
        self.par.barrier()
        self.saved_step = step
        return path

    def _interrupted(self, signal: str, done: int) -> RunResult:
        checkpoint = self._save(done) if self.saved_step != done else last_checkpoint(self.run_dir)
        if self.runtime.is_main_process:
            write_summary(self.run_dir, self.cfg, status="interrupted", signal=signal, steps=done,
                          total_steps=self.total_steps, checkpoint=checkpoint, last_metrics=self.metrics)
        from tqdm.auto import tqdm

        tqdm.write(f"{signal}: checkpoint saved to {checkpoint}; continue with --resume", file=sys.stderr)
        return RunResult("interrupted", self.run_dir, done, self.total_steps, signal, checkpoint, None, self.metrics)

    def _finish(self) -> RunResult:
        """A last checkpoint (resumable), the adapter / merged model, summary.json."""
        total = self.total_steps
        checkpoint = self._save(total) if self.saved_step != total else last_checkpoint(self.run_dir)
        final_dir = self.run_dir / "final"
        final_weights = self.par.final_weights(self.model)  # collective, before rank 0 saves
        if self.runtime.is_main_process:
            final_dir = save_final(self.run_dir, self.model, self.tokenizer, self.cfg, final_weights)
            write_summary(self.run_dir, self.cfg, status="completed", steps=total, total_steps=total,
                          checkpoint=checkpoint, final=final_dir, elapsed_s=time.perf_counter() - self.started,
                          last_metrics=self.metrics, peak_memory_bytes=self.runtime.peak_memory_bytes())
        self.par.barrier()  # the run folder is complete when any rank returns
        return RunResult("completed", self.run_dir, total, total, None, checkpoint, final_dir, self.metrics)

    def _check_finite(self, value: torch.Tensor, step: int, what: str,
                      terms: dict[str, torch.Tensor] | None = None) -> None:
        """Stop the run on a NaN/inf, keeping the last good checkpoint; summary.json says why."""
        if bool(torch.isfinite(value.detach()).all()):
            return
        detail = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in (terms or {}).items())
        kept = f"the last good checkpoint is step {self.saved_step}" if self.saved_step else "no checkpoint was written"
        message = (f"non-finite {what} at step {step} ({detail or float(value.detach())}); training stopped, "
                   f"{kept}. Lower the learning rate (lr={self.cfg.lr}) or λ (lam={self.cfg.lam}).")
        write_summary(self.run_dir, self.cfg, status="diverged", steps=step - 1, error=message)
        raise NonFiniteLossError(message)


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
    return UnlearnRecipe(config, on_step=on_step).setup().train()


def _lora_stats(model) -> dict[str, float]:
    """LoRA-delta statistics as flat metrics (empty without LoRA).

    ``lora/<stat>`` holds the whole-model total and ``lora/<module>/<stat>`` each adapted layer,
    from :func:`snap_fast.lora_delta_stats`; the report draws the per-layer figures from them.
    """
    from ..ops.lora_stats import lora_delta_stats

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



def _postfix(metrics: dict) -> dict[str, str]:
    shown = {"loss": "loss", "loss_forget": "forget", "loss_retain": "retain", "reg": "reg",
             "tokens_per_s": "tok/s"}
    return {label: f"{metrics[k]:.4g}" for k, label in shown.items() if metrics.get(k) is not None}
