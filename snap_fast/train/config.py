"""The resolved configuration of one unlearning run, validated before any heavy work.

``UnlearnConfig`` is what ``snap-fast unlearn`` builds from its flags and what
:func:`snap_fast.train.unlearn` takes. :meth:`UnlearnConfig.resolved` fills the defaults that
depend on other fields (learning rate, λ, device) and :meth:`UnlearnConfig.validate` checks every
field, the model spec and the data folder, cheaply (it reads JSONL line counts, never a model).
The run folder's ``config.yaml`` is :meth:`UnlearnConfig.to_yaml` of the resolved config and
loads back with :meth:`UnlearnConfig.from_yaml`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.io import read_jsonl

__all__ = ["METHODS", "PARALLEL", "PRECISIONS", "REG_MODES", "RETAIN_LOSSES", "UnlearnConfig", "read_jsonl"]

#: Training methods, see :mod:`snap_fast.train.losses`.
METHODS = ("snap", "snap-npo", "ga", "grad-diff", "npo", "idk")
PRECISIONS = ("fp32", "bf16")
REG_MODES = ("resample", "refresh", "fixed")
#: Retain terms: NLL of the original answers (SNAP's), or KL to the original model on them.
RETAIN_LOSSES = ("nll", "kl")
#: Multi-process strategies (``torchrun``): replicate the model (DDP) or shard it (FSDP2).
PARALLEL = ("ddp", "fsdp")

# Methods whose forget term trains on the obliterated "I don't know" responses; the others push
# the model away from the original answers (``original_response``) of the forget set.
OBLITERATED_METHODS = ("snap", "idk")
# Methods with a retain (hard-positive) term.
RETAIN_METHODS = ("snap", "snap-npo", "grad-diff", "idk")
# Methods whose default λ is SNAP's 0.1; the others default to no regularizer.
REGULARIZED_METHODS = ("snap", "snap-npo")

# Fields that may change between a run and its resume: they do not change what is computed.
RESUMABLE_CHANGES = frozenset(
    {"resume", "overwrite", "device", "log_every", "save_every", "keep_checkpoints", "lora_stats_every",
     "merge", "progress"}
)


@dataclass
class UnlearnConfig:
    """Everything one run needs. Defaults follow SNAP.md §3 (LoRA by default).

    Attributes:
        model: model spec for :func:`snap_fast.models.load_model` (hub id, folder, ``.gguf``,
            or ``"smollm2-135m-instruct"``).
        data: data folder written by ``snap-fast data`` (``forget.jsonl``, ``retain.jsonl``,
            optional ``general.jsonl``).
        out: run folder to create.
        method: one of :data:`METHODS`.
        lora: train LoRA adapters (PEFT) instead of all weights.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator, dropout.
        lora_targets: PEFT ``target_modules``: ``"all-linear"`` or a comma-separated / list of
            module names (e.g. ``"q_proj,v_proj"``).
        lora_layers: the decoder layers that get adapters (PEFT ``layers_to_transform``):
            ``None`` (all), an inclusive range ``"15-29"``, a comma-separated / list of
            indices, or a fraction in (0, 1] such as ``0.5`` (``"0.5"``): that share of the
            layers, counted from the top (rounded, at least one). The layers below the lowest
            adapted one need no backward pass, so a step gets cheaper (upper 15 of
            SmolLM2-135M's 30 layers: about 20 % on the CPU).
        lr: peak learning rate; ``None`` → 1e-4 with LoRA, 1e-5 for full fine-tuning.
        epochs: passes over the forget set (may be fractional); ignored when ``max_steps`` is set.
        max_steps: optimizer steps to run; overrides ``epochs``.
        batch_size: examples per micro-batch, per set (forget, retain and general each).
        retain_batch_size: examples per micro-batch of the retain set; ``None`` →
            ``batch_size``. Larger than ``batch_size`` shows the model more hard positives per
            forget example (each epoch then draws that many more of them).
        general_batch_size: examples per micro-batch of the general set; ``None`` →
            ``retain_batch_size``. General instructions are far from the target and their KL
            stays small, so a smaller general batch frees compute for hard positives.
        grad_accum: micro-batches per optimizer step (effective batch = batch_size·grad_accum).
        max_length: token cap per example (prompt + response).
        weight_decay, warmup: AdamW weight decay; linear warm-up steps.
        max_grad_norm: gradient clipping norm (0 disables).
        alpha: weight of the retain and general terms.
        retain_loss: ``"nll"`` (SNAP: NLL of the original answers) or ``"kl"`` (mean KL from the
            original model's next-token distributions to the model's, over the same answer
            tokens; 0 with 0 gradient until the model moves). The original model is the base
            with the adapter disabled under LoRA, and a frozen copy of the weights (twice the
            memory) for full fine-tuning, which FSDP does not support. Both are needed only
            when the original's answer-token log-probabilities exceed ``reference_cache_gib``.
        reference_cache_gib: with ``retain_loss="kl"``, the original model's log-probabilities
            at every retain/general answer position (answer tokens × vocabulary × 4 bytes) are
            computed once before training and kept in CPU memory when they take at most this
            many GiB, which saves one forward of the original model per retain/general batch
            (and the frozen copy under full fine-tuning); 0 never caches.
        lam: λ, weight of the sliced-Wasserstein regularizer; ``None`` → 0.1 for ``snap`` and
            ``snap-npo``, 0 otherwise (``idk`` is SNAP with λ = 0). Any method takes λ > 0.
        reg_mode, reg_refresh_every, n_projections, reg_p: regularizer settings
            (:class:`snap_fast.SlicedWassersteinRegularizer`).
        reg_backend: force the regularizer's sorting backend (``None``: automatic).
        npo_beta: β of the NPO forget term (``npo``, ``snap-npo``).
        use_general: train on ``general.jsonl`` too when it exists and is non-empty.
        precision: ``"fp32"``, or ``"bf16"`` autocast (weights stay float32).
        gradient_checkpointing: recompute activations in backward (less memory).
        seed: seeds weights of new adapters, data order, regularizer directions.
        log_every: steps between metrics lines; save_every: steps between checkpoints (0: only
            at the end or on a signal); keep_checkpoints: how many of the newest checkpoints to
            keep (0: all); lora_stats_every: steps between LoRA-delta statistics.
        merge: also write ``final/merged/`` (LoRA merged into the weights, safetensors).
        overwrite: replace an existing run folder; resume: continue from its last checkpoint.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``…
        parallel: under several processes (``torchrun``), ``"ddp"`` replicates the model and
            ``"fsdp"`` shards it with FSDP2 (``fully_shard`` per decoder layer, then the root)
            and uses the sharded regularizer. A single process ignores it.
        trust_remote_code: passed to the model loader.
        progress: show a tqdm progress bar.
    """

    model: str = "smollm2-135m-instruct"
    data: str = ""
    out: str = ""
    method: str = "snap"
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"
    lora_layers: str | list[int] | float | None = None
    lr: float | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    retain_batch_size: int | None = None
    general_batch_size: int | None = None
    grad_accum: int = 4
    max_length: int = 512
    weight_decay: float = 0.01
    warmup: int = 0
    max_grad_norm: float = 1.0
    alpha: float = 1.0
    retain_loss: str = "nll"
    reference_cache_gib: float = 2.0
    lam: float | None = None
    reg_mode: str = "resample"
    reg_refresh_every: int = 10
    n_projections: int = 100
    reg_p: float = 2.0
    reg_backend: str | None = None
    npo_beta: float = 0.1
    use_general: bool = True
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    save_every: int = 0
    keep_checkpoints: int = 2
    lora_stats_every: int = 10
    merge: bool = False
    overwrite: bool = False
    resume: bool = False
    device: str = "auto"
    parallel: str = "ddp"
    trust_remote_code: bool = False
    progress: bool = True
    # Free-form notes carried into config.yaml (e.g. the command line); never read by training.
    notes: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived values
    def resolved(self) -> UnlearnConfig:
        """A copy with the defaults that depend on other fields filled in (lr, lam, device)."""
        out = dataclasses.replace(self, notes=dict(self.notes))
        if out.lr is None:
            out.lr = 1e-4 if out.lora else 1e-5
        if out.lam is None:
            out.lam = 0.1 if out.method in REGULARIZED_METHODS else 0.0
        if out.device == "auto":
            import torch

            out.device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(out.lora_targets, str) and out.lora_targets != "all-linear":
            out.lora_targets = [t.strip() for t in out.lora_targets.split(",") if t.strip()]
        if isinstance(out.lora_layers, str):
            out.lora_layers = _parse_layers(out.lora_layers)
        return out

    @property
    def forget_target(self) -> str:
        """Which response of a forget record the forget term uses: "response" (obliterated) or
        "original_response" (the knowledge that gradient ascent / NPO push away from)."""
        return "response" if self.method in OBLITERATED_METHODS else "original_response"

    @property
    def uses_retain(self) -> bool:
        return self.method in RETAIN_METHODS

    # ------------------------------------------------------------------ validation
    def validate(self, *, run_folder: bool = True) -> None:
        """Check every field, the model spec and the data folder; raise before heavy work.

        Args:
            run_folder: also check ``out`` against what is on disk (see
                :meth:`_validate_run_folder`). Several processes skip it: rank 0 checks and
                creates the folder alone, and another rank may start after it already exists.

        Raises:
            ValueError / TypeError naming the offending field (``FileNotFoundError``, a
            subclass of ``OSError``, is turned into ``ValueError`` so callers catch one type).
        """
        _check_choice("method", self.method, METHODS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("reg_mode", self.reg_mode, REG_MODES)
        _check_choice("parallel", self.parallel, PARALLEL)
        _check_choice("retain_loss", self.retain_loss, RETAIN_LOSSES)
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "n_projections",
                     "reg_refresh_every", "log_every", "lora_stats_every"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup", "save_every", "keep_checkpoints", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("retain_batch_size", "general_batch_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, minimum=1)
        _check_number("epochs", self.epochs, positive=True)
        for name in ("weight_decay", "max_grad_norm", "alpha", "lora_dropout", "reference_cache_gib"):
            _check_number(name, getattr(self, name), positive=False)
        _check_number("npo_beta", self.npo_beta, positive=True)
        _check_number("reg_p", self.reg_p, positive=True)
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr is not None:
            _check_number("lr", self.lr, positive=True)
        if self.lam is not None:
            _check_number("lam", self.lam, positive=False)
        for name in ("lora", "use_general", "gradient_checkpointing", "merge", "overwrite", "resume",
                     "trust_remote_code", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other: pick one")
        if self.merge and not self.lora:
            raise ValueError("merge only applies to LoRA runs (full fine-tuning already saves the whole model)")
        if not isinstance(self.lora_targets, (str, list)) or not self.lora_targets:
            raise ValueError(f"lora_targets must be 'all-linear' or module names, got {self.lora_targets!r}")
        if self.lora_layers is not None:
            layers = _parse_layers(self.lora_layers) if isinstance(self.lora_layers, str) else self.lora_layers
            if isinstance(layers, float):
                if not 0 < layers <= 1:
                    raise ValueError(f"lora_layers as a fraction must be in (0, 1], got {layers}")
            elif not isinstance(layers, list) or not layers:
                raise ValueError(f"lora_layers must be None, a range like '15-29', layer indices or a fraction, "
                                 f"got {layers!r}")
            else:
                for i in layers:
                    _check_int("lora_layers", i, minimum=0)
            if not self.lora:
                raise ValueError("lora_layers only applies to LoRA runs (lora=True)")
        if self.reg_backend is not None:
            _check_choice("reg_backend", self.reg_backend, ("torch", "triton", "cpp"))
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        self._validate_model()
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError("out (the run folder) must be given")
        if run_folder:
            self._validate_run_folder()
        self._validate_data()

    def _validate_model(self) -> None:
        from ..models import resolve_spec

        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a non-empty model spec (hub id, folder, .gguf file)")
        try:
            resolve_spec(self.model)
        except FileNotFoundError as exc:
            raise ValueError(f"model: {exc}") from None
        if isinstance(self.lora_layers, (list, str)):  # indices: check them against the model now,
            layers = _parse_layers(self.lora_layers) if isinstance(self.lora_layers, str) else self.lora_layers
            if isinstance(layers, list):  # before the run folder exists
                from ..models import decoder_layer_count

                count = decoder_layer_count(self.model, trust_remote_code=self.trust_remote_code)
                if count is not None:
                    lora_layer_indices(layers, count)

    def _validate_run_folder(self) -> None:
        """Check that ``out`` may be created, resumed or replaced (``resume`` / ``overwrite``)."""
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            if not (self.resume or self.overwrite):
                raise ValueError(
                    f"out: run folder {out} already exists; pass resume=True (--resume) to continue "
                    "it or overwrite=True (--overwrite) to replace it"
                )
            if not (out / "config.yaml").is_file():
                # Never delete (or resume into) a folder that is not a snap-fast run folder.
                raise ValueError(f"out: {out} is not empty and has no config.yaml: not a run folder")

    def _validate_data(self) -> None:
        if not isinstance(self.data, str) or not self.data.strip():
            raise ValueError("data (the data folder written by `snap-fast data`) must be given")
        folder = Path(self.data)
        if not folder.is_dir():
            raise ValueError(f"data: folder not found: {folder}")
        forget_path = folder / "forget.jsonl"
        if not forget_path.is_file():
            raise ValueError(f"data: {forget_path} not found (write it with `snap-fast data`)")
        forget = read_jsonl(forget_path)
        if not forget:
            raise ValueError(f"data: the forget set {forget_path} is empty: nothing to unlearn")
        if self.batch_size > len(forget):
            raise ValueError(
                f"batch_size ({self.batch_size}) is larger than the forget set ({len(forget)} examples)"
            )
        key = self.forget_target
        missing = [i for i, r in enumerate(forget) if not isinstance(r.get(key), str)]
        if missing:
            raise ValueError(
                f"data: method {self.method!r} trains on the forget set's {key!r}, missing in "
                f"{len(missing)} record(s) of {forget_path} (first at line {missing[0] + 1})"
            )
        bad = [i for i, r in enumerate(forget) if not isinstance(r.get("prompt"), str)]
        if bad:
            raise ValueError(f"data: {forget_path} record {bad[0] + 1} has no 'prompt' string")
        if self.uses_retain and self.alpha > 0:
            retain_path = folder / "retain.jsonl"
            retain = read_jsonl(retain_path) if retain_path.is_file() else []
            if not retain:
                raise ValueError(
                    f"data: method {self.method!r} needs hard positives in {retain_path} "
                    "(missing or empty); use alpha=0 to train without them"
                )
            sets = [(retain_path, retain)]
            general_path = folder / "general.jsonl"
            if self.use_general and general_path.is_file():
                sets.append((general_path, read_jsonl(general_path)))
            for path, rows in sets:
                bad = [i for i, r in enumerate(rows)
                       if not (isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str))]
                if bad:
                    raise ValueError(f"data: {path} record {bad[0] + 1} needs 'prompt' and 'response' strings")

    # ------------------------------------------------------------------ YAML
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UnlearnConfig:
        """Build from a mapping; unknown keys are an error that lists the known ones."""
        if not isinstance(values, dict):
            raise TypeError(f"config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> UnlearnConfig:
        import yaml

        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
        return cls.from_dict(values)

    def differences(self, other: UnlearnConfig, ignore: frozenset[str] = RESUMABLE_CHANGES) -> dict:
        """``{field: (self_value, other_value)}`` for fields that differ, except ``ignore``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ignore and k != "notes" and a[k] != b[k]}


def lora_layer_indices(lora_layers: list[int] | float | None, n_layers: int) -> list[int] | None:
    """The decoder layers a resolved ``lora_layers`` adapts in a model of ``n_layers`` layers
    (``None``: all). A fraction takes the top share, rounded, at least one layer.

    Raises:
        ValueError: an index past the last layer.
    """
    if lora_layers is None:
        return None
    if isinstance(lora_layers, float):
        return list(range(n_layers - max(1, round(lora_layers * n_layers)), n_layers))
    outside = [i for i in lora_layers if i >= n_layers]
    if outside:
        raise ValueError(f"lora_layers: {outside} out of range; the model has {n_layers} decoder layers "
                         f"(0-{n_layers - 1})")
    return list(lora_layers)


def _parse_layers(text: str) -> list[int] | float:
    """``"15-29"`` (inclusive) or ``"0,2,4"`` (or a mix, ``"0,10-12"``) -> sorted layer indices;
    ``"0.5"`` -> the fraction 0.5 (resolved against the model's layer count when it is loaded)."""
    if re.fullmatch(r"\s*\d*\.\d+\s*", text):
        return float(text)
    layers: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"lora_layers must look like '15-29', '0,2,4' or '0.5', got {text!r}")
        layers.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(layers)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: object, *, positive: bool) -> None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
