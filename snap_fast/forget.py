"""``snap-fast forget``: make a model forget any target, end to end, in one command.

Five stages, each announced with a progress line and timed:

1. load the model (default: the packaged SmolLM2-135M-Instruct, converted once from its GGUF);
2. build the data for the target: forget questions (name, aliases, description, reverse
   questions from its facts), hard positives about its neighbours, general instructions, the
   held-out sets, the original model's answers (cached on disk);
3. unlearn with SNAP (LoRA; obliterated-response NLL on the forget set + α · retain term on the
   hard positives and general instructions + λ · sliced-Wasserstein regularizer);
4. evaluate the original and the unlearned model (obliteration and leaks on held-out forget
   questions, ROUGE-L and false refusals on held-out hard positives and general requests,
   perplexity);
5. write ``report/report.md`` and ``report/report.html`` and print a summary.

Stages are cached in the output folder (``forget.json`` records what the folder is for; each
stage's fingerprint is kept in ``stages.json``): running the same command again skips what is
done, and an interrupted run resumes. A folder made for another target or model is refused
unless ``overwrite`` is set. ``snap-fast demo`` is this pipeline with the Harry Potter preset.
Python: :func:`run_forget`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checks import check_int
from .data.build import DEFAULT_SIZES
from .data.target import TargetSpec
from .generation import DEFAULT_GEN_BATCH_SIZE
from .train.config import DEFAULT_LAM, LORA_LAYERS, LORA_LR, UnlearnConfig

DEFAULT_MODEL = "smollm2-135m-instruct"


def _recipe(name: str):
    """The :class:`UnlearnConfig` default of one training field: ``forget`` trains with the
    package's defaults, so the validation of one is the validation of the other."""
    return UnlearnConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class ForgetSettings:
    """Sizes and hyper-parameters of one run (see :data:`PRESETS`). The defaults are those of
    ``snap-fast data`` (:data:`snap_fast.data.build.DEFAULT_SIZES`) and ``snap-fast unlearn``
    (:class:`snap_fast.train.UnlearnConfig`); ``max_steps=None`` derives the optimizer steps
    from the forget set's size (``epochs`` passes at ``batch_size`` per step)."""

    n_forget: int = DEFAULT_SIZES["n_forget"]
    n_retain: int = DEFAULT_SIZES["n_retain"]
    n_general: int = DEFAULT_SIZES["n_general"]
    n_heldout_forget: int = DEFAULT_SIZES["n_heldout_forget"]
    n_heldout_retain: int = DEFAULT_SIZES["n_heldout_retain"]
    n_heldout_general: int = DEFAULT_SIZES["n_heldout_general"]  # false refusals are measured on these
    max_new_tokens: int = DEFAULT_SIZES["max_new_tokens"]  # originals and evaluation: the same cap
    gen_batch_size: int = DEFAULT_GEN_BATCH_SIZE
    method: str = _recipe("method")
    lr: float = LORA_LR
    epochs: float = _recipe("epochs")
    max_steps: int | None = None
    min_steps: int = _recipe("min_steps")
    batch_size: int = _recipe("batch_size")
    retain_batch_size: int | None = _recipe("retain_batch_size")  # None: batch_size
    general_batch_size: int | None = _recipe("general_batch_size")  # None: retain_batch_size
    grad_accum: int = _recipe("grad_accum")
    alpha: float = _recipe("alpha")
    retain_loss: str = "kl"  # UnlearnConfig's rule with LoRA
    lam: float = DEFAULT_LAM
    reg_mode: str = _recipe("reg_mode")
    reg_refresh_every: int = _recipe("reg_refresh_every")
    n_projections: int = _recipe("n_projections")
    lora_r: int = _recipe("lora_r")
    lora_alpha: int = _recipe("lora_alpha")
    lora_targets: str = _recipe("lora_targets")
    lora_layers: float | None = LORA_LAYERS  # the upper half of the decoder layers; None: all
    max_length: int = _recipe("max_length")
    seed: int = 0

    def unlearn_config(self, model: str, data: str | Path, out: str | Path, **extra) -> dict:
        """The :func:`snap_fast.train.unlearn` config of these settings (LoRA, CPU)."""
        fields = ("method", "lora_r", "lora_alpha", "lora_targets", "lora_layers", "lr", "epochs", "max_steps",
                  "min_steps", "batch_size", "retain_batch_size", "general_batch_size", "grad_accum", "alpha",
                  "retain_loss", "lam", "reg_mode", "reg_refresh_every", "n_projections", "max_length", "seed")
        return {"model": model, "data": str(data), "out": str(out), "lora": True, "device": "cpu",
                **{k: getattr(self, k) for k in fields}, **extra}


PRESETS = {
    "full": ForgetSettings(),
    "quick": ForgetSettings(n_forget=24, n_retain=24, n_general=8, n_heldout_forget=12, n_heldout_retain=12,
                            n_heldout_general=12, max_new_tokens=24, max_steps=12),
    "tiny": ForgetSettings(n_forget=8, n_retain=8, n_general=4, n_heldout_forget=4, n_heldout_retain=4,
                           n_heldout_general=2, max_new_tokens=4, gen_batch_size=8, max_steps=3, batch_size=2,
                           retain_batch_size=2, n_projections=8, lora_targets="q_proj,v_proj", max_length=64),
}
STAGES = ("load", "data", "unlearn", "eval", "report")


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

    def start(self, name: str, title: str) -> None:
        self.log(f"\n=== [{STAGES.index(name) + 1}/{len(STAGES)}] {title} ===")
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self, name: str) -> None:
        self.wall[name] = time.perf_counter() - self._t0
        self.cpu[name] = time.process_time() - self._c0

    def total(self) -> None:
        self.wall["total"] = time.perf_counter() - self._start_wall
        self.cpu["total"] = time.process_time() - self._start_cpu


class _Stages:
    """``stages.json``: the fingerprint of every finished stage, written atomically after each."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.done: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def cached(self, name: str, fingerprint: str, *outputs: Path) -> bool:
        return self.done.get(name) == fingerprint and all(p.exists() for p in outputs)

    def finish(self, name: str, fingerprint: str) -> None:
        from .io import write_json

        self.done[name] = fingerprint
        write_json(self.path, self.done)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_tiny_model(folder: str | Path, tokenizer_source: str = DEFAULT_MODEL, seed: int = 0) -> Path:
    """Save a tiny random Llama (hidden 32, 2 layers) with the tokenizer of ``tokenizer_source``
    into ``folder`` and return it: the model the ``tiny`` preset runs the pipeline on."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .models import convert_packaged_default

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


def resolve_settings(settings: ForgetSettings | str) -> tuple[str, ForgetSettings]:
    """The preset name and its settings (a custom ForgetSettings is named "custom")."""
    if isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"settings must be one of {sorted(PRESETS)} or a ForgetSettings, got {settings!r}")
        return settings, PRESETS[settings]
    if not isinstance(settings, ForgetSettings):
        raise TypeError(f"settings must be a ForgetSettings or preset name, got {type(settings).__name__}")
    return next((name for name, value in PRESETS.items() if value == settings), "custom"), settings


def claim_folder(out: Path, target: TargetSpec, model: str, overwrite: bool) -> None:
    """Make ``out`` this run's folder: new, the same target and model's (resumed), or replaced
    with ``overwrite``; anything else is refused before any work (nothing is overwritten)."""
    from .io import write_json

    spec_path = out / "forget.json"
    spec = {"target": target.to_dict(), "model": model}
    if out.exists() and overwrite:
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        if not spec_path.is_file():
            raise FileExistsError(f"output folder {out} exists and was not made by snap-fast forget; use "
                                  "--overwrite (snap-fast demo: --clean) to replace it or choose another --out")
        kept = json.loads(spec_path.read_text())
        if kept.get("target") != spec["target"]:
            held = (kept.get("target") or {}).get("name")
            raise FileExistsError(f"output folder {out} holds a run for the target {held!r} (or another spec of "
                                  "it); use --overwrite (snap-fast demo: --clean) to replace it or choose another --out")
        if kept.get("model") != model:
            raise FileExistsError(f"output folder {out} holds a run of the model {kept.get('model')!r}; use "
                                  "--overwrite (snap-fast demo: --clean) to replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(spec_path, spec)


def run_forget(
    target: TargetSpec,
    out: str | Path,
    *,
    settings: ForgetSettings | str = "full",
    model: str | None = None,
    threads: int | None = None,
    answer_cache: str | Path | None = None,
    overwrite: bool = False,
    title: str | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Forget ``target`` end to end into ``out``; return the summary (also ``out/summary.json``).

    Args:
        target: what to forget (name, aliases, description, facts, neighbours, category).
            Without neighbours (and no built-in preset) the model proposes them.
        out: output folder: ``data/``, ``run/``, ``eval/original``, ``eval/unlearned``,
            ``report/``, ``summary.json``. The same command on the same folder resumes.
        settings: a :class:`ForgetSettings` or a preset name (``"full"``, ``"quick"``, ``"tiny"``).
        model: model spec; default the packaged SmolLM2-135M-Instruct (the ``"tiny"`` preset
            without a model builds a tiny random Llama with SmolLM2's tokenizer).
        threads: torch threads; ``None`` chooses with :func:`choose_threads`.
        answer_cache: folder of the original-answer cache (default: the data builder's).
        overwrite: replace ``out`` if it holds another run.
        title: the report's title (default: "<model> forgets <target>").
        progress, log: progress bars; one-line stage messages.

    Returns:
        ``{"target", "preset", "settings", "model", "threads", "timings_s", "cpu_s", "original",
        "unlearned", "targets", "report", "cached_stages"}`` (``original`` / ``unlearned``:
        headline metrics; ``targets``: which quality targets are met).

    Raises:
        TypeError / ValueError: bad arguments; FileExistsError: ``out`` holds another run.
    """
    from .io import write_json
    from .models import load_model, model_identity

    if not isinstance(target, TargetSpec):
        raise TypeError(f"target must be a TargetSpec, got {type(target).__name__}")
    preset, settings = resolve_settings(settings)
    check_int("threads", threads, minimum=1, allow_none=True)
    out = Path(out)
    model_spec = model or ("tiny" if preset == "tiny" else DEFAULT_MODEL)
    claim_folder(out, target, model_spec, overwrite)
    threads = threads or choose_threads()
    torch.set_num_threads(threads)
    clock = _Clock(log)

    clock.start("load", "Loading the model")
    if model is None and preset == "tiny":
        model = str(out / "tiny-model") if (out / "tiny-model").is_dir() else str(make_tiny_model(out / "tiny-model"))
    model = model or DEFAULT_MODEL
    log(f"model: {model} (float32, CPU, {threads} thread{'s' if threads > 1 else ''})")
    base, tokenizer = load_model(model)
    identity = model_identity(model, base)
    clock.stop("load")

    run = _Run(out, target, settings, preset, model, identity, clock, progress, log)
    data_dir = run.data(base, tokenizer, answer_cache)
    final_dir = run.unlearn(base, data_dir)
    clock.start("eval", "Evaluating the original and the unlearned model (cached answers are reused)")
    original, unlearned = _evaluate(out, model, base, tokenizer, identity, data_dir, final_dir, settings, progress,
                                    log)
    clock.stop("eval")
    targets, report = _report(out, original, unlearned, clock, preset, threads,
                              title or f"SNAP: {Path(model).name} forgets {target.name}")
    clock.total()
    _print_results(out, original, unlearned, targets, log)
    log(f"\nreport: {report}  (and report.md)   total time {clock.wall['total']:.0f} s "
        f"(CPU {clock.cpu['total']:.0f} s)")
    summary = {"target": target.name, "preset": preset, "settings": asdict(settings), "model": model,
               "threads": threads, "timings_s": clock.wall, "cpu_s": clock.cpu, "original": original["headline"],
               "unlearned": unlearned["headline"], "targets": targets, "report": str(report),
               "cached_stages": run.cached}
    write_json(out / "summary.json", summary)
    return summary


@dataclass
class _Run:
    """The cached stages of one run: each is skipped when ``stages.json`` holds its fingerprint."""

    out: Path
    target: TargetSpec
    settings: ForgetSettings
    preset: str
    model: str
    identity: str
    clock: _Clock
    progress: bool
    log: Callable[[str], None]

    def __post_init__(self) -> None:
        self.stages = _Stages(self.out)
        self.cached: list[str] = []
        self.fp_data = _fingerprint(self.target.to_dict(), self.identity, _data_fields(self.settings))

    def data(self, base, tokenizer, answer_cache) -> Path:
        data_dir = self.out / "data"
        self.clock.start("data", f"Building the data for target '{self.target.name}'")
        if self.stages.cached("data", self.fp_data, data_dir / "manifest.json"):
            self.log("data: cached (same target, model and sizes)")
            self.cached.append("data")
        else:
            _build_data(self.target, data_dir, base, tokenizer, self.identity, self.settings, answer_cache,
                        self.progress, self.log)
            self.stages.finish("data", self.fp_data)
        self.clock.stop("data")
        return data_dir

    def unlearn(self, base, data_dir: Path) -> Path:
        run_dir = self.out / "run"
        fp_run = _fingerprint(self.fp_data, asdict(self.settings))
        final_dir = run_dir / "final"
        if self.stages.cached("unlearn", fp_run, final_dir / "adapter"):
            self.clock.start("unlearn", "Unlearning: cached (same data and settings)")
            self.cached.append("unlearn")
        else:
            final_dir = _unlearn(self.clock, self.model, base, data_dir, run_dir, self.settings, self.preset,
                                 self.progress, self.log)
            self.stages.finish("unlearn", fp_run)
        self.clock.stop("unlearn")
        return final_dir


def _report(out: Path, original: dict, unlearned: dict, clock: _Clock, preset: str, threads: int,
            title: str) -> tuple[dict, Path]:
    """Stage 5: the quality targets and the report; returns (targets, the HTML report's path)."""
    from .eval.evaluate import check_targets
    from .eval.report import build_report

    clock.start("report", "Writing the report")
    targets = check_targets(original, unlearned)
    lines = [f"Preset '{preset}', {threads} thread(s); stage wall time (CPU time) in s: "
             + ", ".join(f"{k} {v:.0f} ({clock.cpu[k]:.0f})" for k, v in clock.wall.items())]
    paths = build_report(out / "report", out / "eval" / "original", out / "eval" / "unlearned",
                         run_dir=out / "run", title=title, extra_lines=lines)
    clock.stop("report")
    return targets, paths["html"]


def _data_fields(settings: ForgetSettings) -> dict:
    names = ("n_forget", "n_retain", "n_general", "n_heldout_forget", "n_heldout_retain", "n_heldout_general",
             "max_new_tokens", "seed")
    return {k: getattr(settings, k) for k in names}


def _build_data(target: TargetSpec, data_dir: Path, base, tokenizer, identity: str, settings: ForgetSettings,
                answer_cache, progress: bool, log) -> Path:
    """Stage 2: the data folder (original answers from the cache when present)."""
    from .data.build import build_dataset
    from .data.collator import has_chat_template
    from .data.sets import QA_SETS

    log(f"aliases: {', '.join(target.aliases) or '-'}")
    log(f"hard-positive neighbours: {', '.join(target.neighbours) or '(proposed by the model)'}")
    if target.facts:
        log(f"facts: {len(target.facts)} (reverse questions are written from them)")
    else:
        log("facts: none given, so no reverse questions are written from them (only from original answers "
            "that name the target) and leaks are checked on the name and aliases only; --facts makes a "
            "stronger test")
    if not has_chat_template(tokenizer):
        log("the model has no chat template: prompts use the plain '### Question: / ### Answer:' template")
    log("original answers are generated once and cached on disk; forget answers become 'I don't know'")
    built = build_dataset(
        target, data_dir, model=base, tokenizer=tokenizer, model_id=identity, n_forget=settings.n_forget,
        n_retain=settings.n_retain, n_general=settings.n_general, n_heldout_forget=settings.n_heldout_forget,
        n_heldout_retain=settings.n_heldout_retain, n_heldout_general=settings.n_heldout_general,
        max_new_tokens=settings.max_new_tokens, batch_size=settings.gen_batch_size, seed=settings.seed,
        cache_dir=answer_cache, overwrite=True, progress=progress)
    log("sets: " + ", ".join(f"{k} {built.counts[k]}" for k in QA_SETS))
    return data_dir


def _unlearn(clock: _Clock, model: str, base, data_dir: Path, run_dir: Path, settings: ForgetSettings,
             preset: str, progress: bool, log) -> Path:
    """Stage 3: the unlearning run (resumed from its last checkpoint); returns ``final/``."""
    from .train.config import lora_layer_indices
    from .train.recipe import unlearn

    retain_bs = settings.retain_batch_size or settings.batch_size
    general_bs = settings.general_batch_size or retain_bs
    n_layers = base.config.num_hidden_layers
    layers = lora_layer_indices(settings.lora_layers, n_layers)
    adapted = f"layers {layers[0]}-{layers[-1]} of 0-{n_layers - 1}" if layers else f"all {n_layers} layers"
    from .io import read_jsonl

    n_forget = len(read_jsonl(data_dir / "forget.jsonl"))
    steps = (f"{settings.max_steps} steps" if settings.max_steps is not None
             else f"{settings.epochs:g} passes over {n_forget} forget questions, at least {settings.min_steps} steps")
    regularizer = f"λ={settings.lam:g}, {settings.reg_mode} directions" if settings.lam > 0 else "no regularizer"
    clock.start("unlearn", f"Unlearning with {settings.method.upper()} (LoRA r={settings.lora_r} on {adapted}, "
                f"{regularizer}, {steps})")
    log(f"each step: {settings.batch_size} forget questions -> 'I don't know' answers, {retain_bs} hard positives "
        f"+ {general_bs} general instructions held to the original model "
        f"({'KL to its next-token distributions' if settings.retain_loss == 'kl' else 'NLL of its answers'}, "
        f"α={settings.alpha})")
    resume = (run_dir / "config.yaml").is_file()
    config = settings.unlearn_config(model, data_dir, run_dir, progress=progress, resume=resume,
                                     overwrite=not resume, notes={"created_by": "snap-fast forget", "preset": preset})
    try:
        result = unlearn(config)
    except ValueError as exc:
        if not resume or "config differs" not in str(exc):
            raise
        log("the kept run was made with other settings: starting it again")
        result = unlearn({**config, "resume": False, "overwrite": True})
    if result.status != "completed":
        raise RuntimeError(f"unlearning did not complete (status {result.status}); see {run_dir}")
    return result.final_dir


def _evaluate(out: Path, model: str, base, tokenizer, identity: str, data_dir: Path, final_dir: Path,
              settings: ForgetSettings, progress: bool, log) -> tuple[dict, dict]:
    """Stage 4: the original model (its answers are the data's) and the unlearned one."""
    from .eval.cli import load_for_eval
    from .eval.evaluate import evaluate_model

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
    from .eval.report import pick_examples
    from .io import read_jsonl

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
        log(f"  {name:<27} {shown:>9}   target {t['target']:<9} {'met' if t['met'] else 'NOT met'}")
    log(f"  perplexity: original {original.get('perplexity', float('nan')):.2f}, "
        f"unlearned {unlearned.get('perplexity', float('nan')):.2f}")


# ------------------------------------------------------------------------------------------ CLI
def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Options shared by ``snap-fast forget`` and ``snap-fast demo``."""
    parser.add_argument("--out", default=default_out, help=f"output folder (default: ./{default_out})")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller data and fewer steps (a few minutes)")
    size.add_argument("--tiny", action="store_true", help="a tiny random model: checks the pipeline in seconds")
    parser.add_argument("--model", default=None, help="model spec instead of the packaged SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: automatic)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--seed", type=int, default=None, help="override the seed")
    parser.add_argument("--answer-cache", default=None,
                        help="folder caching the original model's answers (default: ~/.cache/snap_fast/originals)")


def settings_from_args(args: argparse.Namespace) -> ForgetSettings:
    """The preset the flags pick, with ``--steps`` / ``--seed`` applied (checked)."""
    settings = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.steps is not None:
        check_int("--steps", args.steps, minimum=1)
        settings = replace(settings, max_steps=args.steps)
    if args.seed is not None:
        check_int("--seed", args.seed, minimum=0)
        settings = replace(settings, seed=args.seed)
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``snap-fast forget`` options on ``parser``."""
    t = parser.add_argument_group("target")
    t.add_argument("--target", help='name of what to forget, e.g. "Marie Curie"')
    t.add_argument("--aliases", nargs="+", default=None, metavar="ALIAS", help="other names of the target")
    t.add_argument("--description", help="short description, used for indirect questions")
    t.add_argument("--facts", nargs="+", default=None, metavar="FACT",
                   help="facts that start with the name (reverse questions and leak checks are made from them)")
    t.add_argument("--neighbours", nargs="+", default=None, metavar="NAME",
                   help="neighbour entities to keep (default: built-in preset, else proposed by the model)")
    t.add_argument("--category", choices=["person", "character", "work", "place", "organization"])
    t.add_argument("--target-file", help="YAML/JSON target spec (flags override its fields)")
    add_common_arguments(parser, "snap_fast_forget")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds another run")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``snap-fast forget``."""
    from .data.cli import resolve_target

    target = resolve_target(args)
    settings = settings_from_args(args)
    summary = run_forget(target, args.out, settings=settings, model=args.model, threads=args.threads,
                         answer_cache=args.answer_cache, overwrite=args.overwrite)
    print(json.dumps({"target": summary["target"], "unlearned": summary["unlearned"],
                      "met": {k: v["met"] for k, v in summary["targets"].items()},
                      "report": summary["report"], "timings_s": summary["timings_s"]}, indent=2))
    return 0
