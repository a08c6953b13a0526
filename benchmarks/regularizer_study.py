"""Where does the sliced-Wasserstein regularizer change outcomes? A λ study across regimes.

For each target (three of ``forget_targets.TARGETS``: a person, a character, a work) and seed,
the data folder is built once and the original model evaluated once; then every configuration of
:data:`CONFIGS` unlearns from the original model with ``snap-fast unlearn``'s defaults at α = 20
(:data:`STUDY_BASE`) plus the configuration's overrides, and the unlearned model is evaluated on
the held-out sets. Regimes:

* ``lora``: the shipped LoRA recipe (upper half; α = 20), λ on a log grid, SWD and L2-SP;
* ``full``: full fine-tuning at the SNAP paper's lr 1e-5, where updates are not low-rank;
* ``full-lr1e-4``: full fine-tuning at 10× that lr (at 1e-5 it forgot 60 % where LoRA forgets
  90 %), to give the penalty a run that forgets to act on;
* ``over``: over-unlearning (3× the passes at 2× the lr), where forgetting methods collapse.

One JSONL line per finished run (``--results``; a run already there is skipped, so the study
resumes), then the table (mean ± sd over targets and seeds per configuration) and the Pareto
figure (held-out obliteration against retain ROUGE-L, one panel per regime)::

    nohup python benchmarks/regularizer_study.py --seeds 0 --work DIR > study.log 2>&1 &
    python benchmarks/regularizer_study.py --table-only

Each line records the configuration, the regularizer's last value and its mean share of the
gradient norm (from ``metrics.jsonl``), and the wall time. ``--relearn`` then adds, to the finished
runs selected by ``--configs / --targets / --seeds``, the held-out obliteration left after a
relearning attack of :data:`RELEARN_STEPS` steps (how fast does the knowledge come back?).
Sequential unlearning (several targets in a row) is ``sequential_study.py``, which shares the
work folder.
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

from forget_targets import TARGETS, _mean_sd, read_results, target_folder

STUDY_TARGETS = ("Barack Obama", "Sherlock Holmes", "The Great Gatsby")
_FULL = {"lora": False, "lr": 1e-5}
_FULL_FAST = {"lora": False, "lr": 1e-4}
_OVER = {"epochs": 7.5, "lr": 3e-3}
#: under every configuration: the study began when the default α was 20, and its runs must stay
#: comparable across sessions whatever the shipped default becomes
STUDY_BASE = {"alpha": 20.0}
#: name -> UnlearnConfig overrides (on top of STUDY_BASE: :func:`overrides_for`). "lora/none" is the
#: shipped LoRA recipe at the study's α, "lora/swd-0.1" the paper's λ.
CONFIGS: dict[str, dict] = {
    "lora/none": {"lam": 0.0},
    **{f"lora/swd-{lam:g}": {"lam": lam} for lam in (0.1, 1.0, 10.0, 100.0, 1000.0)},
    **{f"lora/l2sp-{lam:g}": {"reg_kind": "l2sp", "lam": lam} for lam in (1.0, 10.0, 100.0)},
    "full/none": {**_FULL, "lam": 0.0},
    **{f"full/swd-{lam:g}": {**_FULL, "lam": lam} for lam in (1.0, 10.0)},
    "full/l2sp-10": {**_FULL, "reg_kind": "l2sp", "lam": 10.0},
    "full-lr1e-4/none": {**_FULL_FAST, "lam": 0.0},
    **{f"full-lr1e-4/swd-{lam:g}": {**_FULL_FAST, "lam": lam} for lam in (10.0, 100.0, 1000.0)},
    "full-lr1e-4/l2sp-1": {**_FULL_FAST, "reg_kind": "l2sp", "lam": 1.0},
    "over/none": {**_OVER, "lam": 0.0},
    **{f"over/swd-{lam:g}": {**_OVER, "lam": lam} for lam in (10.0, 100.0)},
    "over/l2sp-10": {**_OVER, "reg_kind": "l2sp", "lam": 10.0},
}
EVAL_SETS = ("heldout_forget", "heldout_retain", "heldout_general")


def overrides_for(name: str) -> dict:
    """What a configuration's runs pass to ``unlearn``: :data:`STUDY_BASE` and its own overrides."""
    return {**STUDY_BASE, **CONFIGS[name]}
#: relearning attack steps measured by ``--relearn`` (k = 0 is the run's own held-out obliteration)
RELEARN_STEPS = (2, 5, 10, 25)


def prepare(spec: dict, seed: int, work: Path, model, tokenizer, identity: str) -> tuple[Path, dict]:
    """The (target, seed) data folder and the original model's evaluation, both cached."""
    from snap_fast.data.build import build_dataset
    from snap_fast.data.target import TargetSpec
    from snap_fast.eval.evaluate import evaluate_model

    folder = target_folder(work, spec["name"], seed)
    data = folder / "data"
    if not (data / "manifest.json").is_file():
        build_dataset(TargetSpec.from_dict(spec), data, model=model, tokenizer=tokenizer, model_id=identity,
                      seed=seed, overwrite=True, progress=False)
    original = evaluate_model(model, tokenizer, data, folder / "eval_original", identity=identity, sets=EVAL_SETS,
                              answers_from_data=True, batch_size=64, max_new_tokens=32, progress=False,
                              log=lambda m: None)
    return folder, original


def run_config(name: str, folder: Path, seed: int, original: dict) -> dict:
    """Unlearn with one configuration and evaluate; the result line (without target / seed)."""
    from snap_fast.eval.evaluate import evaluate_model
    from snap_fast.io import read_jsonl
    from snap_fast.train.recipe import unlearn

    run_dir = run_folder(folder, name)
    start = time.perf_counter()
    result = unlearn({"data": str(folder / "data"), "out": str(run_dir), "seed": seed, "device": "cpu",
                      "progress": False, "overwrite": True, **overrides_for(name)})
    if result.status != "completed":
        raise RuntimeError(f"{name}: unlearning did not complete ({result.status})")
    model, tokenizer, identity = load_run_model(run_dir)
    unl = evaluate_model(model, tokenizer, folder / "data", run_dir / "eval", identity=identity, sets=EVAL_SETS,
                         batch_size=64, max_new_tokens=32, progress=False, log=lambda m: None)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    shares = [m["reg_grad_share"] for m in metrics if m.get("reg_grad_share") is not None]
    h, o = unl["headline"], original["headline"]
    return {"config": name, "regime": name.split("/")[0], "overrides": CONFIGS[name],
            "obliteration": h["obliteration_rate"], "retain_rouge": h["retain_rougeL_recall"],
            "general_false_refusal": h["general_false_refusal_rate"],
            "perplexity_change": h["perplexity"] / o["perplexity"] - 1.0,
            "reg_last": metrics[-1].get("reg"), "reg_grad_share": statistics.mean(shares) if shares else None,
            "steps": result.steps, "minutes": (time.perf_counter() - start) / 60}


def run_folder(folder: Path, name: str) -> Path:
    return folder / "runs" / name.replace("/", "_")


def load_run_model(run_dir: Path):
    """``(model, tokenizer, identity)`` of a finished run, its adapter merged."""
    from snap_fast.eval.cli import load_for_eval

    final = run_dir / "final"
    if (final / "adapter").is_dir():
        return load_for_eval("smollm2-135m-instruct", final / "adapter")
    return load_for_eval(str(final / "merged"))


def relearn_columns(folder: Path, row: dict) -> dict:
    """The relearning attack on a finished run: fine-tune its model on 8 forget questions with
    their original answers (fresh LoRA, lr 1e-3) and measure held-out obliteration after each of
    :data:`RELEARN_STEPS` steps. Returns ``{"relearn<k>_obliteration": ...}``."""
    from snap_fast.eval.attacks import relearning_attack

    run_dir = run_folder(folder, row["config"])
    model, tokenizer, identity = load_run_model(run_dir)
    out = relearning_attack(model, tokenizer, folder / "data", run_dir / "relearn", identity=identity,
                            steps=RELEARN_STEPS, seed=row["seed"], log=lambda m: None,
                            evaluate_kwargs={"batch_size": 64, "max_new_tokens": 32, "progress": False})
    return {f"relearn{k}_obliteration": out["steps"][str(k)]["obliteration_rate"] for k in RELEARN_STEPS}


def add_relearning(results: Path, work: Path, selected) -> None:
    """Add the relearning columns to every selected row that lacks one of them (the attack is rerun
    from its seed for all of :data:`RELEARN_STEPS`; rows rewritten atomically)."""
    from snap_fast.io import write_jsonl

    for i, row in enumerate(read_results(results)):
        if not selected(row) or all(f"relearn{k}_obliteration" in row for k in RELEARN_STEPS):
            continue
        print(f"[regularizer_study] relearning {row['target']} seed {row['seed']} {row['config']} ...", flush=True)
        folder = target_folder(work, row["target"], row["seed"])
        rows = read_results(results)
        rows[i] = {**rows[i], **relearn_columns(folder, row)}
        write_jsonl(results, rows)


COLUMNS = (("held-out obliteration", "obliteration", 100, 1), ("retain ROUGE-L", "retain_rouge", 1, 3),
           ("general false refusals", "general_false_refusal", 100, 1), ("perplexity change", "perplexity_change", 100, 1),
           ("regularizer share of ‖∇‖", "reg_grad_share", 100, 2),
           *((f"obliteration after {k} relearning steps", f"relearn{k}_obliteration", 100, 1) for k in RELEARN_STEPS),
           ("minutes", "minutes", 1, 1))


def write_outputs(results: list[dict], table: Path, figure: Path) -> str:
    """The table (mean ± sd per configuration over targets × seeds) and the Pareto figure."""
    from snap_fast.io import atomic_write_bytes, atomic_write_text

    lines = ["# Where does the regularizer matter? (SmolLM2-135M-Instruct, CPU)", "",
             ("`python benchmarks/regularizer_study.py`: each configuration is `snap-fast unlearn`'s defaults "
              f"at α = {STUDY_BASE['alpha']:g} plus its overrides; mean ± sd over the targets and seeds that finished (n). Obliteration on "
              "held-out forget questions (reverse questions included), ROUGE-L recall on held-out hard "
              "positives, perplexity on held-out text."), "",
             "| configuration | n | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    for name in CONFIGS:
        runs = [r for r in results if r["config"] == name]
        if runs:
            lines.append(f"| {name} | {len(runs)} | "
                         + " | ".join(_mean_sd([r.get(c[1]) for r in runs], c[2], c[3]) for c in COLUMNS) + " |")
    lines += paired_differences(results)
    text = "\n".join(lines) + "\n"
    atomic_write_text(table, text)
    if results:
        atomic_write_bytes(figure, pareto_figure(results))
    return text


#: columns of the paired table: (header, row key, scale, digits)
PAIRED_COLUMNS = (("Δ held-out obliteration (points)", "obliteration", 100, 1), ("Δ retain ROUGE-L", "retain_rouge", 1, 3),
                  ("Δ general false refusals (points)", "general_false_refusal", 100, 1),
                  *((f"Δ obliteration after {k} relearning steps (points)", f"relearn{k}_obliteration", 100, 1)
                    for k in RELEARN_STEPS))


def paired_cells(pairs: list[tuple[dict, dict]], columns) -> list[str]:
    """One cell per ``(title, key, scale, digits)`` column: mean ± sd of ``a[key] − b[key]`` over
    the (penalised, unpenalised) pairs where both rows have the value."""
    return [_mean_sd([a[key] - b[key] for a, b in pairs if a.get(key) is not None and b.get(key) is not None],
                     scale, digits) for _, key, scale, digits in columns]


def paired_differences(results: list[dict]) -> list[str]:
    """Markdown lines: each penalised configuration minus its regime's ``/none`` run on the same
    target and seed, mean ± sd over those pairs (n). Seeds and targets move every metric more than
    most penalties do; a pair shares both, so its difference is the penalty's own effect."""
    by_key = {(r["target"], r["seed"], r["config"]): r for r in results}
    rows = []
    for name in (n for n in CONFIGS if not n.endswith("/none")):
        base = name.split("/")[0] + "/none"
        pairs = [(r, by_key[(r["target"], r["seed"], base)]) for r in results
                 if r["config"] == name and (r["target"], r["seed"], base) in by_key]
        if pairs:
            rows.append(f"| {name} | {len(pairs)} | " + " | ".join(paired_cells(pairs, PAIRED_COLUMNS)) + " |")
    if not rows:
        return []
    return ["", "## Paired with no penalty", "",
            ("Each configuration minus `<regime>/none` on the same target and seed, mean ± sd over n pairs; "
             "a mean within 2 sd/√n of 0 is not distinguishable from seed and target noise."), "",
            "| configuration | n pairs | " + " | ".join(c[0] for c in PAIRED_COLUMNS) + " |",
            "|---|---:|" + "---:|" * len(PAIRED_COLUMNS), *rows]


def pareto_figure(results: list[dict]) -> bytes:
    """Held-out obliteration (x) against retain ROUGE-L (y): one panel per regime, one colour per
    regularizer kind, each run a point and each configuration's mean a labelled marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from snap_fast.eval.report import _png

    regimes = [r for r in dict.fromkeys(n.split("/")[0] for n in CONFIGS) if any(x["regime"] == r for x in results)]
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4.2), squeeze=False)
    colours = {"none": "#444444", "swd": "#d6604d", "l2sp": "#4393c3"}
    for ax, regime in zip(axes[0], regimes):
        for name in (n for n in CONFIGS if n.startswith(regime + "/")):
            runs = [r for r in results if r["config"] == name]
            if not runs:
                continue
            colour = colours[name.split("/")[1].split("-")[0]]
            ax.scatter([r["obliteration"] for r in runs], [r["retain_rouge"] for r in runs], color=colour, alpha=0.3, s=14)
            mx, my = statistics.mean(r["obliteration"] for r in runs), statistics.mean(r["retain_rouge"] for r in runs)
            ax.scatter([mx], [my], color=colour, s=50, edgecolor="k")
            ax.annotate(name.split("/")[1], (mx, my), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(regime, fontsize=10)
        ax.set_xlabel("held-out obliteration")
        ax.set_ylabel("retain ROUGE-L")
    fig.tight_layout()
    return _png(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--configs", nargs="+", default=None, help=f"names from CONFIGS (default: all): {list(CONFIGS)}")
    parser.add_argument("--targets", nargs="+", default=list(STUDY_TARGETS))
    parser.add_argument("--work", type=Path, default=Path("regularizer_study_work"))
    parser.add_argument("--results", type=Path, default=RESULTS / "regularizer_study_smollm2_cpu.jsonl")
    parser.add_argument("--table", type=Path, default=RESULTS / "regularizer_study_smollm2_cpu.md")
    parser.add_argument("--figure", type=Path, default=RESULTS / "regularizer_study_smollm2_cpu.png")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--relearn", action="store_true",
                        help=f"only add the relearning attack ({RELEARN_STEPS} steps) to the selected finished runs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.configs or []) - set(CONFIGS)) + sorted(
        set(args.targets) - {t["name"] for t in TARGETS})
    if unknown:
        parser.error(f"unknown configurations or targets: {unknown}")
    if args.table_only:
        print(write_outputs(read_results(args.results), args.table, args.figure))
        return 0
    import torch

    from snap_fast.io import write_jsonl
    from snap_fast.models import load_model, model_identity

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.relearn:
        configs = set(args.configs or CONFIGS)
        add_relearning(args.results, args.work, lambda r: r["config"] in configs and r["target"] in args.targets
                       and r["seed"] in args.seeds)
        print(write_outputs(read_results(args.results), args.table, args.figure))
        return 0
    model, tokenizer = load_model("smollm2-135m-instruct")
    identity = model_identity("smollm2-135m-instruct", model)
    for seed in args.seeds:
        for spec in (t for t in TARGETS if t["name"] in args.targets):
            folder, original = prepare(spec, seed, args.work, model, tokenizer, identity)
            for name in args.configs or list(CONFIGS):
                done = {(r["target"], r["seed"], r["config"]) for r in read_results(args.results)}
                if (spec["name"], seed, name) in done:
                    continue
                print(f"[regularizer_study] {spec['name']} seed {seed} {name} ...", flush=True)
                row = {"target": spec["name"], "seed": seed, **run_config(name, folder, seed, original),
                       "threads": torch.get_num_threads()}
                write_jsonl(args.results, [*read_results(args.results), row])
                write_outputs(read_results(args.results), args.table, args.figure)
                print(f"[regularizer_study] {name}: obliteration {row['obliteration']:.3f}, retain ROUGE-L "
                      f"{row['retain_rouge']:.3f}, {row['minutes']:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
