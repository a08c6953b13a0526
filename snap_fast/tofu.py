"""``snap-fast tofu``: the TOFU benchmark end to end (Maini et al., 2024).

Stages, each cached in the output folder and skipped when done (an interrupted run resumes):

1. **target model**: the base model fine-tuned on TOFU ``full`` (it learns the 200 fictitious
   authors); **retain model**: the base fine-tuned on the ``retain`` split that goes with the
   forget split (``forget01`` → ``retain99``), which never sees the forget authors;
2. **data**: a SNAP data folder from the forget split (the questions, an obliterated response
   each, TOFU's answer as the original answer) and the retain split (the hard positives);
3. **unlearn** the target model with each method (snap, snap-npo, ga, grad-diff, npo, idk) on the
   same budget of optimizer steps (by default ``snap-fast unlearn``'s: they follow the forget
   split's size). Changing only the unlearning settings (steps, lr, extra options) redoes only
   the unlearning and its evaluation: the fine-tuned models and their evaluations are kept;
4. **evaluate** every model with TOFU's metrics (:mod:`snap_fast.eval.tofu_metrics`): forget
   quality (KS-test p-value of forget-split truth ratios against the retain model's), model
   utility, forget ROUGE-L, probability and truth-ratio score;
5. **table** (``results.md``, ``results.json``) and a **figure** (forget quality against model
   utility, the retain and target models as reference points), as open-unlearning reports them.

Fine-tuning recipe (TOFU's: 5 epochs, AdamW, weight decay 0.01, linear warm-up over the first
epoch then linear decay, effective batch 32; lr 1e-5 for 7B models) scaled to small models:
lr 1e-4 for full fine-tuning of a ~100M-parameter model (smaller models take larger steps; the
presets below say what each one runs). With ``limit`` the splits are cut to their first records
(the retain split) and the target model is trained on those plus the whole forget split, so the
forget/retain relation of TOFU holds at any size.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .checks import check_int
from .io import write_json, write_jsonl

METHODS = ("snap", "snap-npo", "ga", "grad-diff", "npo", "idk")
#: Settings only the unlearning stage depends on: a change redoes the unlearning and its
#: evaluation, never the fine-tuning.
UNLEARN_SETTINGS = ("unlearn_steps", "unlearn_lr", "unlearn_extra")
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


@dataclass(frozen=True)
class TofuSettings:
    """One benchmark run (see :data:`PRESETS`)."""

    forget_split: str = "forget01"
    limit: int | None = None  # retain-split records used for fine-tuning, data and evaluation
    ft_epochs: float = 5.0
    ft_lr: float = 1e-4
    ft_batch_size: int = 32
    ft_max_length: int = 256
    methods: tuple[str, ...] = METHODS
    unlearn_steps: int | None = None  # None: snap-fast unlearn's default (follows the forget set's size)
    unlearn_lr: float | None = None  # None: snap-fast unlearn's default
    n_retain: int = 256  # hard positives in the data folder
    eval_limit: int | None = None
    max_new_tokens: int = 64
    seed: int = 0
    unlearn_extra: dict = field(default_factory=dict)


PRESETS = {
    "paper": TofuSettings(),
    "quick": TofuSettings(limit=160, ft_epochs=3.0, ft_batch_size=8, ft_max_length=160,
                          n_retain=64, eval_limit=40, max_new_tokens=32),
    "tiny": TofuSettings(limit=4, ft_epochs=1.0, ft_batch_size=4, ft_max_length=64, methods=("snap", "ga"),
                         unlearn_steps=2, n_retain=4, eval_limit=2, max_new_tokens=2,
                         unlearn_extra={"n_projections": 8, "lora_targets": "q_proj,v_proj", "max_length": 64}),
}


def finetune(model, tokenizer, records: list[dict], *, epochs: float, lr: float, batch_size: int,
             max_length: int, seed: int, progress: bool = True) -> list[float]:
    """Supervised fine-tuning of ``model`` in place on ``{"question", "answer"}`` records (chat
    template, loss on the answer tokens): AdamW, warm-up over the first epoch, linear decay.
    Returns the loss of every step."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from .data.collator import ChatCollator

    collator = ChatCollator(tokenizer, max_length=max_length)
    per_epoch = math.ceil(len(records) / batch_size)
    total = max(1, math.ceil(epochs * per_epoch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, min(per_epoch, total - 1), total)
    rng, order, losses = random.Random(seed), [], []
    device = next(model.parameters()).device
    model.train()
    for _ in tqdm(range(total), desc="fine-tuning", unit="step", disable=not progress):
        if len(order) < batch_size:
            epoch = list(range(len(records)))
            rng.shuffle(epoch)
            order += epoch
        batch = collator([{"prompt": records[i]["question"], "response": records[i]["answer"]}
                          for i in order[:batch_size]])
        del order[:batch_size]
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def tofu_data_folder(forget: list[dict], retain: list[dict], out: Path, *, n_retain: int, seed: int) -> Path:
    """A ``snap-fast data``-shaped folder: the forget split's questions with obliterated responses
    (TOFU's answers as the original answers) and up to ``n_retain`` retain-split hard positives."""
    from .data.responses import obliterated_response

    rng = random.Random(seed)
    record = lambda r, response, kind: {
        "id": r["id"], "prompt": r["question"], "response": response, "original_response": r["answer"],
        "original_truncated": False, "kind": kind, "source": "tofu", "entity": None}
    positives = rng.sample(retain, min(n_retain, len(retain)))
    out.mkdir(parents=True, exist_ok=True)
    # TOFU questions name their fictitious author; the responses stay nameless (no name to fill)
    write_jsonl(out / "forget.jsonl", [record(r, obliterated_response(None, rng), "tofu_forget") for r in forget])
    write_jsonl(out / "retain.jsonl", [record(r, r["answer"], "tofu_retain") for r in positives])
    write_json(out / "manifest.json", {"source": "tofu", "forget": len(forget), "retain": len(positives)})
    return out


def resolve_settings(settings: TofuSettings | str) -> tuple[str, TofuSettings]:
    """The preset name and its settings, checked (ValueError naming the field)."""
    if isinstance(settings, str):
        if settings not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {settings!r}")
        name, settings = settings, PRESETS[settings]
    else:  # a preset with another forget split is still that preset
        name = next((k for k, v in PRESETS.items() if replace(v, forget_split=settings.forget_split) == settings),
                    "custom")
    if settings.forget_split not in RETAIN_OF:
        raise ValueError(f"forget_split must be one of {sorted(RETAIN_OF)}, got {settings.forget_split!r}")
    unknown = [m for m in settings.methods if m not in METHODS]
    if unknown or not settings.methods:
        raise ValueError(f"methods must be a non-empty subset of {list(METHODS)}, got {list(settings.methods)}")
    for key in ("limit", "eval_limit"):
        check_int(key, getattr(settings, key), minimum=1, allow_none=True)
    for key in ("ft_batch_size", "ft_max_length", "n_retain", "max_new_tokens"):
        check_int(key, getattr(settings, key), minimum=1)
    check_int("unlearn_steps", settings.unlearn_steps, minimum=1, allow_none=True)
    if not settings.ft_epochs > 0 or not settings.ft_lr > 0:
        raise ValueError("ft_epochs and ft_lr must be > 0")
    return name, settings


class _TofuRun:
    """The stages of one run folder; each checks its own cache marker before working."""

    def __init__(self, out: Path, model: str, settings: TofuSettings, root: Path, progress: bool, log):
        self.out, self.model, self.s, self.root, self.progress, self.log = out, model, settings, root, progress, log
        # each stage's wall time, kept across invocations (a cached stage keeps the time it took)
        self.times_file = out / "stage_seconds.json"
        self.seconds: dict[str, float] = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        self.unlearn_identity = {k: getattr(settings, k) for k in UNLEARN_SETTINGS}

    def _timed(self, name: str, start: float | None) -> None:
        """Record stage ``name``'s wall time since ``start`` (None: forget it, the stage is stale)."""
        if start is None:
            self.seconds.pop(name, None)
        else:
            self.seconds[name] = round(time.perf_counter() - start, 1)
        write_json(self.times_file, self.seconds)

    def finetuned(self, name: str, records: list[dict]) -> Path:
        """``<out>/<name>_model``: the base fine-tuned on ``records`` (``finetune.json`` last)."""
        from .models import load_model

        folder = self.out / f"{name}_model"
        if (folder / "finetune.json").is_file():
            self.log(f"[tofu] {name} model: cached")
            return folder
        start = time.perf_counter()
        self.log(f"[tofu] {name} model: fine-tuning {self.model} on {len(records)} QAs "
                 f"({self.s.ft_epochs} epochs, lr {self.s.ft_lr})")
        model, tokenizer = load_model(self.model)
        torch.manual_seed(self.s.seed)
        losses = finetune(model, tokenizer, records, epochs=self.s.ft_epochs, lr=self.s.ft_lr,
                          batch_size=self.s.ft_batch_size, max_length=self.s.ft_max_length, seed=self.s.seed,
                          progress=self.progress)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        self._timed(f"finetune_{name}", start)
        write_json(folder / "finetune.json", {"records": len(records), "steps": len(losses),
                                              "first_loss": losses[0], "last_loss": losses[-1],
                                              "seconds": self.seconds[f"finetune_{name}"]})
        return folder

    def unlearned(self, method: str, target_dir: Path, data_dir: Path) -> Path:
        """``<out>/runs/<method>``: the target model unlearned with ``method``; its adapter.

        The run's unlearning settings are recorded beside it in ``runs/<method>.json``; a run (and
        its evaluation) made with other ones is redone, an interrupted one with the same resumes."""
        import shutil

        from .train.recipe import unlearn

        run_dir = self.out / "runs" / method
        marker, summary = self.out / "runs" / f"{method}.json", run_dir / "summary.json"
        same = marker.is_file() and json.loads(marker.read_text()) == self.unlearn_identity
        if same and summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
            self.log(f"[tofu] unlearn {method}: cached")
            return run_dir / "final" / "adapter"
        if not same:
            for stale in (run_dir, self.out / "eval" / method):
                shutil.rmtree(stale, ignore_errors=True)
            self._timed(f"unlearn_{method}", None)
            self._timed(f"eval_{method}", None)
            write_json(marker, self.unlearn_identity)
        start = time.perf_counter()
        budget = f"{self.s.unlearn_steps} steps" if self.s.unlearn_steps else "snap-fast unlearn's default steps"
        self.log(f"[tofu] unlearn {method}: {budget}")
        resume = (run_dir / "config.yaml").is_file()
        config = {"model": str(target_dir), "data": str(data_dir), "out": str(run_dir), "method": method,
                  "use_general": False, "seed": self.s.seed, "progress": self.progress, "resume": resume,
                  "overwrite": not resume, **self.s.unlearn_extra}
        if self.s.unlearn_steps is not None:
            config["max_steps"] = self.s.unlearn_steps
        if self.s.unlearn_lr is not None:
            config["lr"] = self.s.unlearn_lr
        result = unlearn(config)
        if result.status != "completed":
            raise RuntimeError(f"unlearning with {method} did not complete ({result.status}); see {run_dir}")
        self._timed(f"unlearn_{method}", start)
        return result.final_dir / "adapter"

    def evaluated(self, name: str, model_dir: Path, adapter: Path | None, retain_ratios: list[float] | None) -> dict:
        """``<out>/eval/<name>``: TOFU's metrics of one model (``tofu_summary.json`` last)."""
        from .eval.cli import load_for_eval
        from .eval.tofu_metrics import evaluate_tofu

        folder = self.out / "eval" / name
        if (folder / "tofu_summary.json").is_file():
            self.log(f"[tofu] evaluate {name}: cached")
            return json.loads((folder / "tofu_summary.json").read_text())
        start = time.perf_counter()
        self.log(f"[tofu] evaluate {name}")
        model, tokenizer, _ = load_for_eval(str(model_dir), adapter)
        samples, summary = evaluate_tofu(model, tokenizer, self.root, forget_split=self.s.forget_split,
                                         retain_ratios=retain_ratios, limit=self.s.eval_limit,
                                         max_new_tokens=self.s.max_new_tokens, progress=self.progress)
        for split, recs in samples.items():
            write_jsonl(folder / f"tofu_samples.{split}.jsonl", recs)
        summary["forget_truth_ratios"] = [s["truth_ratio"] for s in samples[self.s.forget_split]]
        self._timed(f"eval_{name}", start)
        write_json(folder / "tofu_summary.json", summary)
        return summary


def _guard(out: Path, identity: dict, overwrite: bool) -> None:
    """``tofu.json`` records what the folder is for: another model, preset or TOFU source is
    refused unless ``overwrite`` (which empties the folder)."""
    import shutil

    marker = out / "tofu.json"
    if marker.is_file() and json.loads(marker.read_text()) != identity:
        if not overwrite:
            raise FileExistsError(f"out: {out} holds a TOFU run with other settings ({marker}); "
                                  "pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    elif out.exists() and not marker.is_file() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out: {out} exists and is not a TOFU run folder; use --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, identity)


def run_tofu(model: str = "smollm2-135m-instruct", out: str | Path = "tofu_run", *,
             settings: TofuSettings | str = "quick", tofu_root: str | Path | None = None, overwrite: bool = False,
             progress: bool = True, log=print) -> dict:
    """Run the TOFU benchmark (module docstring) and return ``results.json``'s content:
    ``{"preset", "settings", "tofu_root", "models": {name: {"forget_quality", "model_utility",
    "forget_rougeL", "forget_probability", "forget_truth_ratio_score"}}, "seconds"}``.

    Raises ValueError / FileExistsError before any model is loaded (bad settings, a folder made
    for other settings)."""
    from .data.tofu import is_tofu_sample, load_tofu, resolve_tofu_root

    preset, s = resolve_settings(settings)
    root = resolve_tofu_root(tofu_root)
    out = Path(out)
    # the folder's identity: what the fine-tuned models, the data and their evaluations depend on
    # (adding or dropping a method, or changing the unlearning settings, keeps them)
    settings = {k: v for k, v in json.loads(json.dumps(asdict(s))).items()
                if k != "methods" and k not in UNLEARN_SETTINGS}
    _guard(out, {"model": model, "settings": settings, "tofu_root": str(root)}, overwrite)
    run = _TofuRun(out, model, s, root, progress, log)
    forget = load_tofu(root, s.forget_split)
    retain = load_tofu(root, RETAIN_OF[s.forget_split])[: s.limit]
    target_dir = run.finetuned("target", retain + forget)  # TOFU's full split = retain ∪ forget
    retain_dir = run.finetuned("retain", retain)
    data_dir = tofu_data_folder(forget, retain, out / "data", n_retain=s.n_retain, seed=s.seed)
    summaries = {"retain": run.evaluated("retain", retain_dir, None, None)}
    reference = summaries["retain"]["forget_truth_ratios"]
    summaries["target"] = run.evaluated("target", target_dir, None, reference)
    for method in s.methods:
        adapter = run.unlearned(method, target_dir, data_dir)
        summaries[method] = run.evaluated(method, target_dir, adapter, reference)
    results = {"preset": preset, "settings": asdict(s), "model": model, "tofu_root": str(root),
               "tofu_sample": is_tofu_sample(root), "models": {n: _row(x, s.forget_split, reference)
                                                               for n, x in summaries.items()},
               "unlearn_steps": {m: json.loads((out / "runs" / m / "summary.json").read_text())["steps"]
                                 for m in s.methods},
               "seconds": {k: v for k, v in run.seconds.items()
                           if k.split("_", 1)[1] in ("target", "retain", *s.methods)}}
    write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(results), encoding="utf-8")
    (out / "figure.png").write_bytes(figure_tofu(results))
    log(f"[tofu] wrote {out}/results.md, results.json and figure.png")
    return results


def _row(summary: dict, split: str, reference: list[float]) -> dict:
    """One model's table row; the retain model's forget quality is its KS test against itself."""
    from .eval.tofu_metrics import forget_quality

    forget = summary["splits"][split]
    quality = summary.get("forget_quality")
    if quality is None:
        quality = forget_quality(summary["forget_truth_ratios"], reference)["forget_quality"]
    return {"forget_quality": quality, "model_utility": summary["model_utility"],
            "forget_rougeL": forget.get("rougeL_recall"), "forget_probability": forget["probability"],
            "forget_truth_ratio_score": forget["truth_ratio_score"]}


def results_markdown(results: dict) -> str:
    """The results table, in open-unlearning's columns."""
    s = results["settings"]
    lines = [f"# TOFU {s['forget_split']} on {results['model']} (preset {results['preset']})", "",
             ("Forget quality: KS-test p-value of the forget-split truth ratios against the retain model's "
              "(higher = closer to never having learned them; the retain model against itself is 1). Model "
              "utility: harmonic mean of probability, ROUGE-L and truth-ratio score on retain, real authors "
              "and world facts."), ""]
    if results.get("tofu_sample"):
        lines += ["**Run on the small TOFU sample shipped with snap_fast, not the full benchmark.**", ""]
    lines += ["| model | forget quality | model utility | forget ROUGE-L | forget probability | forget truth-ratio score |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["models"].items():
        rouge = "–" if r["forget_rougeL"] is None else f"{r['forget_rougeL']:.3f}"
        lines.append(f"| {name} | {r['forget_quality']:.3g} | {r['model_utility']:.3f} | {rouge} | "
                     f"{r['forget_probability']:.3f} | {r['forget_truth_ratio_score']:.3f} |")
    steps = results.get("unlearn_steps") or {}
    if steps:
        budget = sorted(set(steps.values()))
        lines += ["", f"Unlearning: {', '.join(map(str, budget))} optimizer steps per method"
                  + ("" if s.get("unlearn_steps") else " (snap-fast unlearn's default for this forget split)") + "."]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in results["seconds"].items()), ""]
    return "\n".join(lines)


def figure_tofu(results: dict) -> bytes:
    """Forget quality (log scale) against model utility, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .eval.report import _png

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, r in results["models"].items():
        marker = {"retain": "*", "target": "s"}.get(name, "o")
        ax.scatter(r["model_utility"], max(r["forget_quality"], 1e-30), marker=marker, s=90 if marker == "*" else 40)
        ax.annotate(name, (r["model_utility"], max(r["forget_quality"], 1e-30)), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value)")
    ax.set_title(f"TOFU {results['settings']['forget_split']} ({results['preset']})", fontsize=10)
    return _png(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``snap-fast tofu`` options on ``parser``."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default="tofu_run", help="run folder (stages cached there)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="quick: subsets, minutes to an hour on a CPU; paper: the full protocol (GPU)")
    parser.add_argument("--forget-split", choices=sorted(RETAIN_OF), default=None, help="override the preset's")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="override the preset's")
    parser.add_argument("--steps", type=int, default=None, help="unlearning steps per method")
    parser.add_argument("--tofu", default=None, help="TOFU folder (default: $SNAP_FAST_TOFU, ../shared/data/tofu, hub)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace a run folder made with other settings")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``snap-fast tofu``."""
    settings = PRESETS[args.preset]
    overrides = {"forget_split": args.forget_split, "methods": tuple(args.methods) if args.methods else None,
                 "unlearn_steps": args.steps, "seed": args.seed}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    results = run_tofu(args.model, args.out, settings=settings, tofu_root=args.tofu, overwrite=args.overwrite,
                       progress=not args.no_progress)
    print(results_markdown(results))
    return 0
