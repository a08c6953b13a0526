"""``snap-fast eval``: evaluate a model (optionally with a LoRA adapter) on a data folder.

    snap-fast eval --model smollm2-135m-instruct --adapter runs/hp/final/adapter \\
        --data data/hp --out eval/hp-unlearned

Writes per-sample JSONL and ``summary.json`` into ``--out`` (see ``snap_fast.eval.evaluate``);
results already computed for the same model and data are reused unless ``--force``. With
``--tofu DIR`` it also runs the TOFU metrics on that folder's files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from snap_fast.generation import DEFAULT_GEN_BATCH_SIZE

from .evaluate import (
    ALL_SETS,
    DEFAULT_SETS,
    evaluate_model,
    read_jsonl,
    write_json,
    write_jsonl,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_identity(adapter_dir: str | Path) -> str:
    """A short hash of an adapter folder's config and weight files (name, size, content)."""
    adapter_dir = Path(adapter_dir)
    h = hashlib.sha256()
    for f in sorted(adapter_dir.iterdir()):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin"}:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load_for_eval(spec: str, adapter: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                  device: str = "cpu"):
    """``(model, tokenizer, identity)``: the model from :func:`snap_fast.models.load_model`, with
    the PEFT adapter in ``adapter`` merged in when given (merged weights generate faster); the
    identity combines the base model's and the adapter's."""
    from snap_fast.models import load_model, model_identity

    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter: {adapter}/adapter_config.json not found (not a PEFT adapter folder)")
    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    identity = model_identity(spec, model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.eval()
        identity = f"{identity}+adapter-{adapter_identity(adapter)}"
    return model, tokenizer, identity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``snap-fast eval`` options on ``parser``."""
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model spec: hub id, local folder (e.g. a run's final/merged), .gguf file, "
                        "or the packaged default 'smollm2-135m-instruct'")
    parser.add_argument("--adapter", default=None, help="PEFT adapter folder (e.g. RUN/final/adapter)")
    parser.add_argument("--data", required=True, help="data folder written by `snap-fast data`")
    parser.add_argument("--out", required=True, help="output folder for per-sample JSONL and summary.json")
    parser.add_argument("--force", action="store_true", help="recompute metrics even when cached")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), choices=list(ALL_SETS),
                        help="QA sets to evaluate")
    parser.add_argument("--limit", type=int, default=None, help="first N records of each set only")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_GEN_BATCH_SIZE,
                        help="prompts per generation and per probability batch (as snap-fast forget; lower it "
                             "if memory is short)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-perplexity", action="store_true", help="skip perplexity on heldout_text")
    parser.add_argument("--answers-from-data", action="store_true",
                        help="use the data's original_response as answers (only for the model that wrote the data)")
    parser.add_argument("--tofu", default=None, help="also run TOFU metrics on this TOFU folder")
    parser.add_argument("--tofu-forget-split", default="forget01", choices=["forget01", "forget05", "forget10"])
    parser.add_argument("--tofu-retain", default=None,
                        help="tofu_samples.<split>.jsonl of a retain model (from an earlier --tofu run) "
                        "for forget quality")
    parser.add_argument("--tofu-limit", type=int, default=None, help="first N records of each TOFU split")
    parser.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                        help="no progress bars (--quiet: the older name)")
    parser.add_argument("--attacks", default=None,
                        help="attacks on the model after the evaluation: a comma-separated list of quant, relearn, "
                             "prompts, mia, or 'all' (snap_fast.eval.attacks)")
    parser.add_argument("--quant-bits", type=int, nargs="+", default=[8, 4], help="--attacks quant: bit widths")
    parser.add_argument("--quant-group-size", type=int, default=64, help="--attacks quant: weights per scale")
    parser.add_argument("--quant-library", nargs="+", default=[], metavar="NAME",
                        help="--attacks quant: library quantizers to add (torchao-int8: torchao's int8 "
                             "weight-only, needs torchao)")
    parser.add_argument("--relearn-steps", type=int, nargs="+", default=[0, 10, 25, 50],
                        help="--attacks relearn: fine-tuning steps after which the held-out forget set is evaluated")
    parser.add_argument("--relearn-examples", type=int, default=8, help="--attacks relearn: forget examples used")
    parser.add_argument("--relearn-lr", type=float, default=1e-3, help="--attacks relearn: AdamW lr (fresh LoRA r=8)")
    parser.add_argument("--prompt-attack-n", type=int, default=20,
                        help="--attacks prompts: held-out questions per kind (and per language)")
    parser.add_argument("--mia-k", type=float, default=0.2, help="--attacks mia: share of lowest tokens of Min-K %%")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation; prints the headline numbers. Returns the exit code."""
    for name in ("limit", "tofu_limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data: folder not found: {args.data}")
    if args.tofu and not Path(args.tofu).is_dir():
        raise FileNotFoundError(f"--tofu: folder not found: {args.tofu}")
    if args.tofu_retain and not Path(args.tofu_retain).is_file():
        raise FileNotFoundError(f"--tofu-retain: file not found: {args.tofu_retain}")
    from .attacks import parse_attacks

    attacks = parse_attacks(args.attacks)
    for b in args.quant_bits:
        if not 2 <= b <= 8:
            raise ValueError(f"--quant-bits must be between 2 and 8, got {b}")
    if args.quant_group_size < 1:
        raise ValueError(f"--quant-group-size must be >= 1, got {args.quant_group_size}")
    if "quant" in attacks:
        from .attacks import check_library_quantizer

        for name in args.quant_library:
            try:
                check_library_quantizer(name)
            except ImportError as exc:  # a missing optional package is a setup error: one line, exit 2
                raise ValueError(str(exc)) from exc
    if any(k < 0 for k in args.relearn_steps):
        raise ValueError(f"--relearn-steps must be >= 0, got {args.relearn_steps}")
    if args.relearn_examples < 1 or not args.relearn_lr > 0:
        raise ValueError("--relearn-examples must be >= 1 and --relearn-lr > 0")
    if args.prompt_attack_n < 1:
        raise ValueError(f"--prompt-attack-n must be >= 1, got {args.prompt_attack_n}")
    if not 0 < args.mia_k <= 1:
        raise ValueError(f"--mia-k must be in (0, 1], got {args.mia_k}")
    print(f"[eval] loading {args.model}" + (f" + adapter {args.adapter}" if args.adapter else ""))
    model, tokenizer, identity = load_for_eval(args.model, args.adapter, dtype=_DTYPES[args.dtype],
                                               device=args.device)
    summary = evaluate_model(
        model, tokenizer, args.data, args.out, identity=identity, sets=args.sets, limit=args.limit,
        force=args.force, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
        perplexity=not args.no_perplexity, answers_from_data=args.answers_from_data, progress=not args.quiet,
    )
    if args.tofu:
        from .tofu_metrics import evaluate_tofu

        retain = None
        if args.tofu_retain:
            retain = [r["truth_ratio"] for r in read_jsonl(args.tofu_retain)]
        samples, tofu = evaluate_tofu(model, tokenizer, args.tofu, forget_split=args.tofu_forget_split,
                                      retain_ratios=retain, limit=args.tofu_limit, batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens, progress=not args.quiet)
        for split, recs in samples.items():
            write_jsonl(Path(args.out) / f"tofu_samples.{split}.jsonl", recs)
        write_json(Path(args.out) / "tofu_summary.json", tofu)
        summary["tofu"] = tofu
        write_json(Path(args.out) / "summary.json", summary)
    if attacks:
        _run_attacks(args, attacks, model, tokenizer, identity, summary)
    print(json.dumps({"model": identity, **summary["headline"]}, indent=2))
    if "tofu" in summary:
        print(json.dumps({k: v for k, v in summary["tofu"].items() if k != "splits"}, indent=2))
    print(f"[eval] wrote {args.out}/summary.json and samples.jsonl")
    return 0


def _run_attacks(args: argparse.Namespace, attacks: list[str], model, tokenizer, identity: str, summary: dict) -> None:
    """Run the chosen attacks on copies of ``model``; their results go to ``summary["attacks"]``
    and ``summary.json`` is rewritten after each."""
    from .attacks import quantization_attack, relearning_attack
    from .mia import membership_inference
    from .prompt_attacks import prompt_attack

    common = {"limit": args.limit, "force": args.force, "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "progress": not args.quiet}
    runs = {
        "quant": lambda: quantization_attack(model, tokenizer, args.data, args.out, identity=identity,
                                             bits=args.quant_bits, group_size=args.quant_group_size,
                                             library=args.quant_library,
                                             evaluate_kwargs=common),
        "relearn": lambda: relearning_attack(model, tokenizer, args.data, args.out, identity=identity,
                                             steps=args.relearn_steps, n_examples=args.relearn_examples,
                                             lr=args.relearn_lr, seed=args.seed, evaluate_kwargs=common),
        "prompts": lambda: prompt_attack(model, tokenizer, args.data, args.out, n_per_kind=args.prompt_attack_n,
                                         seed=args.seed, max_new_tokens=args.max_new_tokens,
                                         batch_size=args.batch_size, progress=not args.quiet),
        "mia": lambda: membership_inference(model, tokenizer, args.data, k=args.mia_k, batch_size=args.batch_size,
                                            progress=not args.quiet),
    }
    for name in attacks:
        start = time.perf_counter()
        result = runs[name]()
        summary.setdefault("attacks", {})[name] = {**result, "seconds": time.perf_counter() - start}
        write_json(Path(args.out) / "summary.json", summary)
        print(json.dumps({f"attack {name}": summary["attacks"][name]}, indent=2))
