"""Sequential unlearning: forget several targets one after another; what is kept after each?

A chain of targets (default: the three of ``regularizer_study.STUDY_TARGETS``) is unlearned in
order, each stage a fresh ``snap-fast unlearn`` (the configuration's overrides on the defaults)
that starts from the previous stage's merged model, as a user chaining runs would do; the
regularizer therefore anchors each stage at the model it starts from. After every stage the
model is evaluated on every target of the chain:

* targets already forgotten: held-out obliteration (does the earlier forgetting hold?);
* targets not yet forgotten: ROUGE-L recall of their held-out forget answers against the
  original model's (is knowledge the user has not asked to remove still there?) and the share
  of them answered "I don't know" (collateral forgetting);
* every target's held-out hard positives: ROUGE-L recall; general requests: false refusals.

One JSONL line per finished stage (``--results``; a stage already there is skipped and the chain
resumes from the merged model it saved), then the table (mean ± sd over seeds per configuration
and stage) and a figure (retention of not-yet-forgotten targets and hard positives per stage)::

    nohup python benchmarks/sequential_study.py --configs lora/none lora/swd-10 lora/l2sp-10 \\
        --work DIR > sequential.log 2>&1 &
    python benchmarks/sequential_study.py --table-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from forget_targets import TARGETS, _mean_sd, read_results
from regularizer_study import (
    CONFIGS,
    EVAL_SETS,
    STUDY_TARGETS,
    overrides_for,
    paired_cells,
    prepare,
)

DEFAULT_CONFIGS = ("lora/none", "lora/swd-10", "lora/l2sp-10")


def stage_dir(work: Path, config: str, seed: int, stage: int, target: str) -> Path:
    return work / "sequential" / config.replace("/", "_") / f"seed{seed}" / f"stage{stage}_{slug(target)}"


def slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def merged_model(run_dir: Path) -> Path:
    """The stage's whole model: ``final/merged`` (LoRA runs are made with ``merge=True``)."""
    path = run_dir / "final" / "merged"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no merged model: the stage did not finish")
    return path


def unlearn_stage(config: str, data: Path, start_model: str, run_dir: Path, seed: int) -> tuple[Path, int]:
    """One stage: unlearn ``data`` from ``start_model``; the merged model's folder and the steps."""
    from snap_fast.train.recipe import unlearn

    overrides = overrides_for(config)
    merge = overrides.get("lora", True)  # full fine-tuning saves the whole model anyway
    result = unlearn({"data": str(data), "out": str(run_dir), "model": start_model, "seed": seed, "device": "cpu",
                      "progress": False, "overwrite": True, "merge": merge, **overrides})
    if result.status != "completed":
        raise RuntimeError(f"{config} {run_dir.name}: unlearning did not complete ({result.status})")
    return merged_model(run_dir), result.steps


def evaluate_chain(model_dir: Path, folders: dict[str, Path], forgotten: list[str], out: Path) -> dict:
    """Every target's held-out sets on the stage's model: the per-target metrics of one row."""
    from snap_fast.eval.cli import load_for_eval
    from snap_fast.eval.evaluate import evaluate_model

    model, tokenizer, identity = load_for_eval(str(model_dir))
    per_target = {}
    for name, folder in folders.items():
        sets = EVAL_SETS if name == next(iter(folders)) else ("heldout_forget", "heldout_retain")
        summary = evaluate_model(model, tokenizer, folder / "data", out / slug(name), identity=identity, sets=sets,
                                 batch_size=64, max_new_tokens=32, perplexity=False, progress=False,
                                 log=lambda m: None)
        h = summary["headline"]
        per_target[name] = {"forgotten": name in forgotten, "obliteration": h["obliteration_rate"],
                            "forget_rouge": h["forget_rougeL_recall"], "retain_rouge": h["retain_rougeL_recall"]}
        if h.get("general_false_refusal_rate") is not None:
            per_target[name]["general_false_refusal"] = h["general_false_refusal_rate"]
    return per_target


def summarise_stage(per_target: dict) -> dict:
    """The row's aggregate columns from its per-target metrics."""
    done = [m for m in per_target.values() if m["forgotten"]]
    kept = [m for m in per_target.values() if not m["forgotten"]]

    def mean(rows, key):
        return statistics.mean(m[key] for m in rows) if rows else None

    general = [m["general_false_refusal"] for m in per_target.values() if "general_false_refusal" in m]
    return {"forgotten_obliteration": mean(done, "obliteration"), "kept_forget_rouge": mean(kept, "forget_rouge"),
            "kept_obliteration": mean(kept, "obliteration"), "retain_rouge": mean(list(per_target.values()), "retain_rouge"),
            "general_false_refusal": general[0] if general else None}


def run_chain(config: str, seed: int, chain: list[str], folders: dict[str, Path], work: Path, results: Path,
              base_model: str = "smollm2-135m-instruct") -> None:
    """Every stage of one (configuration, seed) chain that is not in ``results`` yet.

    ``folders[name] / "data"`` is each target's data folder; stage 1 starts from ``base_model``.
    """
    from snap_fast.io import write_jsonl

    start_model = base_model
    for stage, target in enumerate(chain, start=1):
        run_dir = stage_dir(work, config, seed, stage, target)
        done = {(r["config"], r["seed"], r["stage"]) for r in read_results(results)}
        if (config, seed, stage) in done:
            start_model = str(merged_model(run_dir))
            continue
        print(f"[sequential_study] {config} seed {seed} stage {stage}: {target} ...", flush=True)
        began = time.perf_counter()
        model_dir, steps = unlearn_stage(config, folders[target] / "data", start_model, run_dir, seed)
        per_target = evaluate_chain(model_dir, folders, chain[:stage], run_dir / "eval_chain")
        row = {"config": config, "seed": seed, "stage": stage, "target": target, "chain": chain, "steps": steps,
               **summarise_stage(per_target), "per_target": per_target,
               "minutes": (time.perf_counter() - began) / 60}
        write_jsonl(results, [*read_results(results), row])
        start_model = str(model_dir)


COLUMNS = (("forgotten: obliteration", "forgotten_obliteration", 100, 1),
           ("not yet forgotten: ROUGE-L vs original", "kept_forget_rouge", 1, 3),
           ("not yet forgotten: obliterated", "kept_obliteration", 100, 1),
           ("hard positives ROUGE-L", "retain_rouge", 1, 3), ("general false refusals", "general_false_refusal", 100, 1),
           ("minutes", "minutes", 1, 1))


PAIRED_COLUMNS = (("Δ forgotten: obliteration (points)", "forgotten_obliteration", 100, 1),
                  ("Δ not yet forgotten: ROUGE-L vs original", "kept_forget_rouge", 1, 3),
                  ("Δ not yet forgotten: obliterated (points)", "kept_obliteration", 100, 1),
                  ("Δ hard positives ROUGE-L", "retain_rouge", 1, 3))


def paired_stage_differences(rows: list[dict]) -> list[str]:
    """Markdown lines: each penalised configuration minus its regime's ``/none`` chain at the same
    seed and stage, mean ± sd over the seeds where both finished. A seed fixes the data and the
    sampling of both chains, so the difference is the penalty's own effect; a mean within
    2 sd/√n of 0 is not distinguishable from seed noise."""
    by_key = {(r["config"], r["seed"], r["stage"]): r for r in rows}
    out = []
    for config in (c for c in CONFIGS if not c.endswith("/none")):
        base = config.split("/")[0] + "/none"
        for stage in sorted({r["stage"] for r in rows if r["config"] == config}):
            pairs = [(r, by_key[(base, r["seed"], stage)]) for r in rows
                     if r["config"] == config and r["stage"] == stage and (base, r["seed"], stage) in by_key]
            if not pairs:
                continue
            out.append(f"| {config} | {stage} | {len(pairs)} | " + " | ".join(paired_cells(pairs, PAIRED_COLUMNS)) + " |")
    if not out:
        return []
    return ["", "## Paired with no penalty", "",
            ("Each configuration minus `<regime>/none` at the same seed and stage, mean ± sd over n seeds; a mean "
             "within 2 sd/√n of 0 is not distinguishable from seed noise."), "",
            "| configuration | stage | n seeds | " + " | ".join(c[0] for c in PAIRED_COLUMNS) + " |",
            "|---|---:|---:|" + "---:|" * len(PAIRED_COLUMNS), *out]


def write_outputs(rows: list[dict], table: Path, figure: Path) -> str:
    """The table (mean ± sd over seeds per configuration and stage) and the retention figure."""
    from snap_fast.io import atomic_write_bytes, atomic_write_text

    chain = rows[0]["chain"] if rows else list(STUDY_TARGETS)
    lines = ["# Sequential unlearning (SmolLM2-135M-Instruct, CPU)", "",
             (f"`python benchmarks/sequential_study.py`: the chain {' → '.join(chain)}, each stage `snap-fast "
              "unlearn`'s defaults plus the configuration's overrides, started from the previous stage's merged "
              "model; after each stage every target's held-out sets are evaluated. Mean ± sd over the seeds that "
              "finished (n); — where there is nothing to measure (no target forgotten yet, or none left)."), "",
             "| configuration | stage | n | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for config in CONFIGS:
        for stage in sorted({r["stage"] for r in rows if r["config"] == config}):
            runs = [r for r in rows if r["config"] == config and r["stage"] == stage]
            lines.append(f"| {config} | {stage} | {len(runs)} | "
                         + " | ".join(_mean_sd([r.get(c[1]) for r in runs], c[2], c[3]) for c in COLUMNS) + " |")
    lines += paired_stage_differences(rows)
    text = "\n".join(lines) + "\n"
    atomic_write_text(table, text)
    if rows:
        atomic_write_bytes(figure, retention_figure(rows))
    return text


def retention_figure(rows: list[dict]) -> bytes:
    """Two panels against the stage: ROUGE-L of not-yet-forgotten targets, and of hard positives;
    one line per configuration (mean over seeds, bars ± sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from snap_fast.eval.report import _png

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "kept_forget_rouge", "not yet forgotten targets: ROUGE-L vs original"),
                           (axes[1], "retain_rouge", "hard positives: ROUGE-L")):
        for config in (c for c in CONFIGS if any(r["config"] == c for r in rows)):
            stages = sorted({r["stage"] for r in rows if r["config"] == config and r[key] is not None})
            values = [[r[key] for r in rows if r["config"] == config and r["stage"] == s] for s in stages]
            sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(stages, [statistics.mean(v) for v in values], yerr=sds, marker="o", capsize=3,
                        label=f"{config} (n = {max(len(v) for v in values)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("stage (targets forgotten)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help=f"names from {list(CONFIGS)}")
    parser.add_argument("--chain", nargs="+", default=list(STUDY_TARGETS), help="targets, in the order forgotten")
    parser.add_argument("--work", type=Path, default=Path("regularizer_study_work"),
                        help="work folder (shared with regularizer_study.py: the data folders are reused)")
    parser.add_argument("--results", type=Path, default=RESULTS / "sequential_study_smollm2_cpu.jsonl")
    parser.add_argument("--table", type=Path, default=RESULTS / "sequential_study_smollm2_cpu.md")
    parser.add_argument("--figure", type=Path, default=RESULTS / "sequential_study_smollm2_cpu.png")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.configs) - set(CONFIGS)) + sorted(set(args.chain) - {t["name"] for t in TARGETS})
    if unknown or len(set(args.chain)) < 2:
        parser.error(f"unknown configurations or targets: {unknown}" if unknown else "--chain needs two targets or more")
    if args.table_only:
        print(write_outputs(read_results(args.results), args.table, args.figure))
        return 0
    import torch

    from snap_fast.models import load_model, model_identity

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, tokenizer = load_model("smollm2-135m-instruct")
    identity = model_identity("smollm2-135m-instruct", model)
    for seed in args.seeds:
        specs = {t["name"]: t for t in TARGETS}
        folders = {name: prepare(specs[name], seed, args.work, model, tokenizer, identity)[0] for name in args.chain}
        for config in args.configs:
            run_chain(config, seed, args.chain, folders, args.work, args.results)
            print(write_outputs(read_results(args.results), args.table, args.figure), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
