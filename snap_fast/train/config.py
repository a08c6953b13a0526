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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_choice, check_int, check_number
from ..io import read_jsonl
from ..ops.backends import BACKENDS
from ..regularizer.core import MODES as REG_MODES

from .methods import METHODS as METHOD_REGISTRY

__all__ = ["METHODS", "PARALLEL", "PRECISIONS", "REG_KINDS", "REG_MODES", "RETAIN_LOSSES", "UnlearnConfig"]

#: Training methods, see :mod:`snap_fast.train.methods`.
METHODS = tuple(METHOD_REGISTRY)
PRECISIONS = ("fp32", "bf16")
#: Retain terms: NLL of the original answers (SNAP's), or KL to the original model on them.
RETAIN_LOSSES = ("nll", "kl")
#: Multi-process strategies (``torchrun``): replicate the model (DDP) or shard it (FSDP2).
PARALLEL = ("ddp", "fsdp")
#: Regularizer kinds: SNAP's sliced-Wasserstein distance, or the plain L2-SP baseline.
REG_KINDS = ("swd", "l2sp")

# Defaults chosen by rule (docs/training.md, "Defaults"). The LoRA values are the recipe
# validated across targets and seeds in benchmarks/results/forget_targets_smollm2_cpu.md
# (SmolLM2-135M-Instruct); full fine-tuning takes the SNAP paper's learning rate, not validated
# here. Adapters on the upper half of the layers: the lower half carries general language
# skills, and no backward pass runs below the lowest adapter (steps ~20-40 % cheaper).
LORA_LR = 1.5e-3
FULL_LR = 1e-5
LORA_LAYERS = 0.5
# λ for every method, with LoRA and in full fine-tuning: the regularizer changed no outcome of the
# LoRA recipe at any λ up to 100 (three targets, two seeds, single and sequential runs), nor of full
# fine-tuning at its learning rate at λ = 10, 100× the paper's (docs/regularizer.md), so it is off
# unless asked for.
DEFAULT_LAM = 0.0


#: The regularizer's concrete sort backends.
REG_BACKENDS = tuple(b for b in BACKENDS if b != "auto")


def _arg(default: Any, help: str, *, type: type | None = None, choices: Sequence[str] | None = None,
         flag: str | None = None, action: str | None = None, const: Any = None, group: str | None = None):
    """A config field and its command-line flag, described once (see :func:`snap_fast.train.cli.cli_options`).

    ``flag`` defaults to ``--<field-name-with-dashes>``; ``type`` to the default's type;
    ``action``/``const`` are argparse's (``store_true``, ``store_false``, ``store_const``); fields
    sharing a ``group`` are mutually exclusive on the command line.
    """
    return field(default=default, metadata={"help": help, "type": type, "choices": choices, "flag": flag,
                                             "action": action, "const": const, "group": group})


# Fields that may change between a run and its resume: they do not change what is computed.
RESUMABLE_CHANGES = frozenset(
    {"resume", "overwrite", "device", "log_every", "save_every", "keep_checkpoints", "lora_stats_every",
     "merge", "progress"}
)


@dataclass
class UnlearnConfig:
    """Everything one run needs. The defaults are a recipe that forgets: LoRA on the upper half
    of the layers, the KL retain term at α = 30, 2.5 passes over the forget set (the number of
    optimizer steps follows the data size), validated across targets and seeds (see the
    constants above and docs/training.md).

    Each field's meaning and default are written once, in its ``_arg(...)`` below: they are the
    help of its ``snap-fast unlearn`` flag and the table of docs/training.md. What a line cannot
    say:

    * ``lora_layers`` (PEFT ``layers_to_transform``): ``None`` (the upper half with LoRA),
      ``"all"`` (or 1.0), an inclusive range
      ``"15-29"``, indices ``"0,2,4"`` / a list, or a fraction in (0, 1] counted from the top
      (rounded, at least one). No backward pass runs below the lowest adapted layer, so steps get
      cheaper (the upper 15 of SmolLM2-135M's 30 layers: about 20 % on the CPU).
    * ``retain_batch_size`` larger than ``batch_size`` shows the model more hard positives per
      forget example (each epoch then draws that many more); ``general_batch_size`` smaller
      frees compute for them (general instructions are far from the target).
    * ``retain_loss="kl"`` (the default, except full fine-tuning with ``parallel="fsdp"``,
      which gets ``"nll"``): mean KL from the original model's next-token distributions to the
      model's over the same answer tokens, 0 with 0 gradient until the model moves. Its
      log-probabilities (answer tokens × vocabulary × 4 bytes) are computed once and kept when
      they fit in ``reference_cache_gib``; otherwise every batch runs the original model: the
      base with the adapter disabled under LoRA, a frozen copy (twice the memory, not under
      FSDP) for full fine-tuning.
    * ``lam``: 0 (:data:`DEFAULT_LAM`, the regularizer measured to change nothing with the
      defaults, LoRA or full fine-tuning); any method takes λ > 0. ``lr=None``: 1.5e-3 with LoRA,
      1e-5 for full fine-tuning.
    * ``parallel`` only matters under several processes (``torchrun``): ``"ddp"`` replicates the
      model, ``"fsdp"`` shards it with FSDP2 and uses the sharded regularizer.
    * ``notes``: free-form, carried into config.yaml, never read by training.
    """

    model: str = _arg("smollm2-135m-instruct", "hub id, local folder, .gguf file, or smollm2-135m-instruct")
    data: str = _arg("", "data folder written by `snap-fast data`")
    out: str = _arg("", "run folder to create")
    method: str = _arg("snap", "training method", choices=METHODS)
    lora: bool = _arg(True, "full fine-tuning instead of LoRA", flag="--full", action="store_false")
    lora_r: int = _arg(8, "LoRA rank")
    lora_alpha: int = _arg(16, "LoRA alpha")
    lora_dropout: float = _arg(0.0, "LoRA dropout")
    lora_targets: str | list[str] = _arg("all-linear", "all-linear or comma-separated module names")
    lora_layers: str | list[int] | float | None = _arg(
        None, "decoder layers with adapters: 15-29, 0,2,4, a top fraction such as 0.25, or all "
        "(default: the upper half with LoRA)", type=str)
    lr: float | None = _arg(None, "peak learning rate (default 1.5e-3 with LoRA, 1e-5 full)", type=float)
    epochs: float = _arg(2.5, "passes over the forget set (steps = epochs x forget examples / batch)")
    max_steps: int | None = _arg(None, "optimizer steps (overrides --epochs and --min-steps)", type=int)
    min_steps: int = _arg(60, "fewest optimizer steps when they follow --epochs (small forget sets); 0: none")
    batch_size: int = _arg(4, "forget examples per micro-batch")
    retain_batch_size: int | None = _arg(
        8, "examples per micro-batch of the retain set (None in Python: --batch-size)", type=int)
    general_batch_size: int | None = _arg(
        4, "examples per micro-batch of the general set (None in Python: --retain-batch-size)", type=int)
    grad_accum: int = _arg(1, "micro-batches per optimizer step")
    max_length: int = _arg(128, "max tokens per example (questions and short answers; raise for documents)")
    weight_decay: float = _arg(0.01, "AdamW weight decay")
    warmup: int = _arg(0, "linear warm-up steps")
    max_grad_norm: float = _arg(1.0, "gradient clipping norm, 0 = off")
    alpha: float = _arg(30.0, "weight of the retain / general terms")
    retain_loss: str | None = _arg(None, "retain term: nll of the original answers or kl to the original model "
                            "(default: kl; nll for full fine-tuning under --fsdp)",
                            choices=RETAIN_LOSSES)
    reference_cache_gib: float = _arg(
        2.0, "--retain-loss kl: cache the original's answer log-probabilities up to this many GiB")
    lam: float = _arg(DEFAULT_LAM, "λ, regularizer weight (default 0: off; docs/regularizer.md says where it acts)",
                      type=float)
    reg_kind: str = _arg("swd", "regularizer: swd (SNAP's) or l2sp (λ‖W − W0‖², the plain baseline)", choices=REG_KINDS)
    reg_mode: str = _arg("fixed", "regularizer directions", choices=REG_MODES)
    reg_refresh_every: int = _arg(10, "K for --reg-mode refresh")
    reg_normalize: bool = _arg(False, "scale-free regularizer: SWD over Σ|W0 Θ|^p per tensor", action="store_true")
    n_projections: int = _arg(100, "regularizer directions L")
    reg_p: float = _arg(2.0, "regularizer exponent p")
    reg_backend: str | None = _arg(None, "force the sort backend (default: automatic)", choices=REG_BACKENDS)
    npo_beta: float = _arg(0.1, "β of NPO")
    use_general: bool = _arg(True, "do not train on general.jsonl", flag="--no-general", action="store_false")
    precision: str = _arg("fp32", "fp32 or bf16 autocast", choices=PRECISIONS)
    gradient_checkpointing: bool = _arg(False, "recompute activations in backward (less memory)",
                                        action="store_true")
    seed: int = _arg(0, "seed of adapters, data order and regularizer directions")
    log_every: int = _arg(1, "steps between metrics lines")
    save_every: int = _arg(0, "steps between checkpoints, 0 = end only")
    keep_checkpoints: int = _arg(2, "newest checkpoints kept, 0 = all")
    lora_stats_every: int = _arg(10, "steps between LoRA-delta statistics")
    merge: bool = _arg(False, "also save the merged model", action="store_true")
    overwrite: bool = _arg(False, "replace an existing run folder", action="store_true", group="start")
    resume: bool = _arg(False, "continue from the last checkpoint", action="store_true", group="start")
    device: str = _arg("auto", "auto, cpu, cuda, cuda:N")
    parallel: str = _arg("ddp", "under torchrun: shard the model with FSDP2 instead of DDP", flag="--fsdp",
                         action="store_const", const="fsdp")
    trust_remote_code: bool = _arg(False, "passed to the model loader", action="store_true")
    progress: bool = _arg(True, "no progress bar", flag="--no-progress", action="store_false")
    # Free-form notes carried into config.yaml (e.g. the command line); never read by training.
    notes: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived values
    def resolved(self) -> UnlearnConfig:
        """A copy with the defaults that depend on other fields filled in (lr, device, ...)."""
        out = dataclasses.replace(self, notes=dict(self.notes))
        if out.lr is None:
            out.lr = LORA_LR if out.lora else FULL_LR
        if out.device == "auto":
            import torch

            out.device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(out.lora_targets, str) and out.lora_targets != "all-linear":
            out.lora_targets = [t.strip() for t in out.lora_targets.split(",") if t.strip()]
        if isinstance(out.lora_layers, str):
            out.lora_layers = _parse_layers(out.lora_layers)
        if out.lora_layers is None and out.lora:
            out.lora_layers = LORA_LAYERS
        if out.retain_loss is None:
            # KL needs the original model's distributions: under FSDP full fine-tuning that is a
            # frozen unsharded copy, which the sharding is there to avoid
            out.retain_loss = "nll" if not out.lora and out.parallel == "fsdp" else "kl"
        return out

    @property
    def forget_target(self) -> str:
        """Which response of a forget record the forget term uses: "response" (obliterated) or
        "original_response" (the knowledge that gradient ascent / NPO push away from)."""
        return METHOD_REGISTRY[self.method].forget_target

    @property
    def uses_retain(self) -> bool:
        """Whether the method has a retain (hard-positive and general) term."""
        return METHOD_REGISTRY[self.method].trains_retain

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
        self._validate_fields()
        self._validate_lora()
        self._validate_model()
        if not isinstance(self.out, str) or not self.out.strip():
            raise ValueError("out (the run folder) must be given")
        if run_folder:
            self._validate_run_folder()
        self._validate_data()

    def _validate_fields(self) -> None:
        """Types and ranges of the scalar fields."""
        check_choice("method", self.method, METHODS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("reg_mode", self.reg_mode, REG_MODES)
        check_choice("reg_kind", self.reg_kind, REG_KINDS)
        if self.reg_kind == "l2sp" and self.parallel == "fsdp":
            raise ValueError("reg_kind 'l2sp' keeps whole initial weights: not supported with FSDP2 (--fsdp)")
        check_choice("parallel", self.parallel, PARALLEL)
        if self.retain_loss is not None:  # None: chosen by resolved()
            check_choice("retain_loss", self.retain_loss, RETAIN_LOSSES)
        for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "max_length", "n_projections",
                     "reg_refresh_every", "log_every", "lora_stats_every"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup", "save_every", "keep_checkpoints", "seed"):
            check_int(name, getattr(self, name), minimum=0)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("retain_batch_size", "general_batch_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, minimum=1)
        check_number("epochs", self.epochs, positive=True)
        check_int("min_steps", self.min_steps, minimum=0)
        for name in ("weight_decay", "max_grad_norm", "alpha", "lora_dropout", "reference_cache_gib"):
            check_number(name, getattr(self, name), nonnegative=True)
        check_number("npo_beta", self.npo_beta, positive=True)
        check_number("reg_p", self.reg_p, positive=True)
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr is not None:
            check_number("lr", self.lr, positive=True)
        check_number("lam", self.lam, nonnegative=True)
        for name in ("lora", "use_general", "gradient_checkpointing", "merge", "overwrite", "resume",
                     "trust_remote_code", "progress", "reg_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite and resume exclude each other: pick one")
        if self.merge and not self.lora:
            raise ValueError("merge only applies to LoRA runs (full fine-tuning already saves the whole model)")
        if self.reg_backend is not None:
            check_choice("reg_backend", self.reg_backend, REG_BACKENDS)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def _validate_lora(self) -> None:
        """``lora_targets`` and ``lora_layers`` (the latter only with LoRA)."""
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
                    check_int("lora_layers", i, minimum=0)
            if not self.lora:
                raise ValueError("lora_layers only applies to LoRA runs (lora=True)")

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
    ``"0.5"`` -> the fraction 0.5 (resolved against the model's layer count when it is loaded);
    ``"all"`` -> 1.0."""
    if text.strip() == "all":
        return 1.0
    if re.fullmatch(r"\s*\d*\.\d+\s*", text):
        return float(text)
    layers: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"lora_layers must look like '15-29', '0,2,4' or '0.5', got {text!r}")
        layers.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return sorted(layers)
