"""``snap-fast unlearn``: the command-line face of :func:`snap_fast.train.unlearn`.

Settings come from, in increasing priority: the defaults of :class:`UnlearnConfig`, a YAML file
(``--config``; with ``--resume`` and no ``--config``, the run folder's own ``config.yaml``), and
the flags given on the command line.

Exit codes: 0 done; 2 bad input (message on stderr); 3 NaN/inf loss (last good checkpoint kept);
130 stopped by SIGINT (Ctrl-C) and 143 by SIGTERM, after saving a checkpoint — rerun the same
command with ``--resume`` to continue.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import METHODS, PRECISIONS, REG_MODES, RETAIN_LOSSES, UnlearnConfig
from .runtime import EXIT_CODES

# (flag, config field, type, help); defaults are argparse.SUPPRESS so only flags the user gave
# override the YAML / dataclass defaults.
_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--model", "model", str, "hub id, local folder, .gguf file, or smollm2-135m-instruct (default)"),
    ("--data", "data", str, "data folder written by `snap-fast data`"),
    ("--out", "out", str, "run folder to create"),
    ("--lr", "lr", float, "peak learning rate (default 1e-4 LoRA, 1e-5 full)"),
    ("--epochs", "epochs", float, "passes over the forget set (default 1)"),
    ("--max-steps", "max_steps", int, "optimizer steps (overrides --epochs)"),
    ("--batch-size", "batch_size", int, "examples per micro-batch and set (default 8)"),
    ("--retain-batch-size", "retain_batch_size", int,
     "examples per micro-batch of the retain set (default: --batch-size)"),
    ("--general-batch-size", "general_batch_size", int,
     "examples per micro-batch of the general set (default: --retain-batch-size)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 4)"),
    ("--max-length", "max_length", int, "max tokens per example (default 512)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0.01)"),
    ("--warmup", "warmup", int, "linear warm-up steps (default 0)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm, 0 = off (default 1.0)"),
    ("--alpha", "alpha", float, "weight of the retain / general terms (default 1.0)"),
    ("--reference-cache-gib", "reference_cache_gib", float,
     "--retain-loss kl: cache the original's answer log-probabilities up to this size (default 2)"),
    ("--lam", "lam", float, "λ, regularizer weight (default 0.1 for snap/snap-npo, else 0)"),
    ("--n-projections", "n_projections", int, "regularizer directions L (default 100)"),
    ("--reg-refresh-every", "reg_refresh_every", int, "K for --reg-mode refresh (default 10)"),
    ("--reg-backend", "reg_backend", str, "force the sort backend: torch, triton or cpp"),
    ("--npo-beta", "npo_beta", float, "β of NPO (default 0.1)"),
    ("--lora-r", "lora_r", int, "LoRA rank (default 8)"),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha (default 16)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default 0)"),
    ("--lora-targets", "lora_targets", str, "all-linear (default) or comma-separated module names"),
    ("--lora-layers", "lora_layers", str, "decoder layers with adapters: all (default), 15-29, 0,2,4"),
    ("--seed", "seed", int, "seed (default 0)"),
    ("--log-every", "log_every", int, "steps between metrics lines (default 1)"),
    ("--save-every", "save_every", int, "steps between checkpoints, 0 = end only (default 0)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "newest checkpoints kept, 0 = all (default 2)"),
    ("--lora-stats-every", "lora_stats_every", int, "steps between LoRA-delta stats (default 10)"),
    ("--device", "device", str, "auto (default), cpu, cuda, cuda:N"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``unlearn`` flags on ``parser``."""
    S = argparse.SUPPRESS
    parser.add_argument("--config", default=None, help="YAML config file (flags override it)")
    for flag, dest, typ, help_text in _OPTIONS:
        parser.add_argument(flag, dest=dest, type=typ, default=S, help=help_text)
    parser.add_argument("--method", choices=METHODS, default=S, help="training method (default snap)")
    parser.add_argument("--reg-mode", dest="reg_mode", choices=REG_MODES, default=S,
                        help="regularizer directions (default resample)")
    parser.add_argument("--retain-loss", dest="retain_loss", choices=RETAIN_LOSSES, default=S,
                        help="retain term: nll of the original answers (default) or kl to the original model")
    parser.add_argument("--precision", choices=PRECISIONS, default=S, help="fp32 (default) or bf16 autocast")
    parser.add_argument("--full", dest="lora", action="store_false", default=S,
                        help="full fine-tuning instead of LoRA")
    parser.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=S)
    parser.add_argument("--no-general", dest="use_general", action="store_false", default=S,
                        help="do not train on general.jsonl")
    parser.add_argument("--merge", action="store_true", default=S, help="also save the merged model")
    parser.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true", default=S)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=S)
    parser.add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp", default=S,
                        help="under torchrun: shard the model with FSDP2 instead of DDP")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", default=S, help="continue from the last checkpoint")
    group.add_argument("--overwrite", action="store_true", default=S, help="replace an existing run folder")


def config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    """The :class:`UnlearnConfig` the flags describe (YAML base, flags on top)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    base: dict = {}
    if args.config:
        base = UnlearnConfig.from_yaml(args.config).to_dict()
    elif given.get("resume") and given.get("out") and (Path(given["out"]) / "config.yaml").is_file():
        base = UnlearnConfig.from_yaml(Path(given["out"]) / "config.yaml").to_dict()
    base.update(given)
    base["notes"] = {**base.get("notes", {}), "argv": sys.argv[1:]}
    return UnlearnConfig.from_dict(base)


def run(args: argparse.Namespace) -> int:
    """Run ``snap-fast unlearn``; returns the process exit code (see the module docstring)."""
    from .recipe import NonFiniteLossError, unlearn

    try:
        config = config_from_args(args)
        result = unlearn(config)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"snap-fast unlearn: error: {exc}", file=sys.stderr)
        return EXIT_CODES["invalid"]
    except NonFiniteLossError as exc:
        print(f"snap-fast unlearn: {exc}", file=sys.stderr)
        return EXIT_CODES["diverged"]
    if result.status == "completed" and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.steps} steps; adapter/model in {result.final_dir}")
    return result.exit_code
