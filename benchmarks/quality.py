"""Quality comparison on the demo's data: SNAP's regularizer modes, λ = 0, and the GA / NPO baselines.

Every configuration trains with the demo's budget (same steps, batch, learning rate, LoRA) on the
demo's data folder and is evaluated on the same held-out sets; each runs with several seeds.

    python benchmarks/quality.py --demo-dir snap_fast_demo            # after `snap-fast demo`
    python benchmarks/quality.py --demo-dir snap_fast_demo --only snap-resample snap-fixed --seeds 0 1

Results accumulate in ``<demo-dir>/quality/results.jsonl`` (one line per finished run, so an
interrupted grid keeps what it finished; a finished run is skipped when the script is run again)
and the table is written to ``benchmarks/results/quality_<machine>.md``.

Default-mode rule (issue 7): the fastest regularizer mode whose metrics match ``resample`` within
run-to-run noise. Noise of a metric = half the spread (max - min) between the seeds of a
configuration; two configurations match on a metric when their means differ by no more than the
larger of their noises (plus 0.02 absolute, the resolution of 40-question rates). "Fastest" is
decided by the one cost that differs between the modes' steps, the regularizer call (forward +
backward), timed back to back in one process on the demo's LoRA shapes (:func:`time_modes`,
cached in ``<out>/mode_timing.json``): step times of separate runs differ more with the machine's
load than between modes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from snap_fast.forget import PRESETS, ForgetSettings

# name -> overrides of the demo's training settings (method, λ, regularizer mode)
CONFIGS: dict[str, dict] = {
    "snap-resample": {"method": "snap", "lam": 0.1, "reg_mode": "resample"},
    "snap-fixed": {"method": "snap", "lam": 0.1, "reg_mode": "fixed"},
    "snap-refresh10": {"method": "snap", "lam": 0.1, "reg_mode": "refresh", "reg_refresh_every": 10},
    "snap-lam0": {"method": "snap", "lam": 0.0},
    "ga": {"method": "ga", "lam": 0.0},
    "npo": {"method": "npo", "lam": 0.0},
}
MODES = ("snap-resample", "snap-fixed", "snap-refresh10")
COMPARED = ("obliteration_rate", "retain_rougeL_recall", "general_rougeL_recall", "perplexity")


def run_one(name: str, seed: int, settings: ForgetSettings, demo_dir: Path, model: str, out: Path,
            overrides: dict | None = None, tag: str = "") -> dict:
    """Train one configuration with one seed and evaluate it; returns the result record.

    ``overrides`` (``--lam``) replace both the demo settings and the configuration's own values; ``tag`` is appended to the configuration's name (run folder and
    ``config`` field), so tuned variants are stored beside the plain ones instead of skipped."""
    from snap_fast.eval.cli import load_for_eval
    from snap_fast.eval.evaluate import evaluate_model, read_jsonl
    from snap_fast.train.recipe import unlearn

    run_settings = replace(settings, **{**CONFIGS[name], **(overrides or {}), "seed": seed})
    cfg = asdict(run_settings)
    run_dir = out / f"{name}{tag}-s{seed}"
    t0, c0 = time.perf_counter(), time.process_time()
    result = unlearn(run_settings.unlearn_config(model, demo_dir / "data", run_dir / "run", progress=True))
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    steps = read_jsonl(run_dir / "run" / "metrics.jsonl")
    model_u, tok, ident = load_for_eval(model, result.final_dir / "adapter")
    t0, c0 = time.perf_counter(), time.process_time()
    summary = evaluate_model(model_u, tok, demo_dir / "data", run_dir / "eval", identity=ident,
                             sets=("heldout_forget", "heldout_retain", "heldout_general"),
                             batch_size=settings.gen_batch_size, max_new_tokens=settings.max_new_tokens,
                             seed=0, progress=True)
    return {
        "config": name + tag, "seed": seed, "status": result.status, "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "settings": {k: cfg[k] for k in ("method", "lam", "reg_mode", "lr", "alpha", "max_steps", "batch_size",
                                         "retain_batch_size", "general_batch_size", "retain_loss", "lora_r",
                                         "lora_targets", "lora_layers")},
        "eval_s": time.perf_counter() - t0, "eval_cpu_s": time.process_time() - c0,
        "median_step_s": statistics.median(m["step_time_s"] for m in steps if "step_time_s" in m),
        "final_reg": steps[-1].get("reg"), **summary["headline"],
        "gibberish_rate": summary["sets"]["heldout_forget"]["gibberish_rate"],
        "retain_ignorance_rate": summary["sets"]["heldout_retain"]["ignorance_rate"],
    }


def _stats(rows: list[dict], key: str) -> tuple[float | None, float]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None, 0.0
    return statistics.mean(vals), (max(vals) - min(vals)) / 2


def time_modes(settings: ForgetSettings, repeats: int = 5, shape: str = "smollm2") -> dict[str, float]:
    """Milliseconds per regularizer call (forward + backward) of each mode in :data:`MODES`.

    Measured in one process on a random-init model of the demo's shapes with LoRA of the demo's
    rank on every linear layer of every decoder layer (``shape="tiny"``: the same code on tiny
    shapes; each mode's cost is a sum over the adapted layers, so adapting fewer scales all modes
    alike), the modes interleaved in rotating order over ``repeats`` rounds; medians.
    ``refresh`` is timed over windows of ``reg_refresh_every`` calls, so its redraws are
    amortised as in training.
    """
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_lora import lora_llama, lora_params
    from bench_regularizer import time_calls

    from snap_fast.regularizer import SlicedWassersteinRegularizer

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model = lora_llama(shape, settings.lora_r)
    params = lora_params(model)
    regs = {}
    for name in MODES:
        mode_settings = replace(settings, **{k: v for k, v in CONFIGS[name].items() if k != "method"})
        reg = SlicedWassersteinRegularizer(model, n_projections=mode_settings.n_projections,
                                           mode=mode_settings.reg_mode, refresh_every=mode_settings.reg_refresh_every)
        window = mode_settings.reg_refresh_every if mode_settings.reg_mode == "refresh" else 1
        regs[name] = (reg, window)
    seconds: dict[str, list[float]] = {name: [] for name in MODES}
    for i in range(repeats):
        for name in MODES[i % len(MODES):] + MODES[: i % len(MODES)]:
            reg, window = regs[name]
            seconds[name].append(time_calls(reg, params, 1, window)[0])
    return {name: 1e3 * statistics.median(t) for name, t in seconds.items()}


def recommend(results: list[dict], reg_ms: dict[str, float] | None) -> str:
    """The default-mode recommendation by the rule in the module docstring (a sentence).

    ``reg_ms``: :func:`time_modes`' milliseconds per regularizer call; ``None`` (not timed yet)
    gives no recommendation rather than one from step times of separate runs.
    """
    by = {m: [r for r in results if r["config"] == m] for m in MODES}
    if not by["snap-resample"]:
        return "no recommendation: snap-resample was not run"
    if reg_ms is None:
        return "no recommendation: the modes' regularizer calls were not timed (run without --no-timing)"
    base = by["snap-resample"]
    matching = []
    for mode, rows in by.items():
        if not rows:
            continue
        ok = True
        for key in ("obliteration_rate", "retain_rougeL_recall"):
            m0, n0 = _stats(base, key)
            m1, n1 = _stats(rows, key)
            if m0 is None or m1 is None or abs(m1 - m0) > max(n0, n1) + 0.02:
                ok = False
        if ok:
            matching.append((reg_ms[mode], mode))
    if not matching:
        return "no mode matches resample"
    matching.sort()
    mode = matching[0][1]
    caveat = "" if all(len(by[m]) >= 2 for m in MODES if by[m]) else \
        " (some modes ran with one seed only, so their noise is unmeasured: provisional)"
    timed = ", ".join(f"{m} {reg_ms[m]:.0f} ms" for m in MODES)
    return (f"recommended default: {mode} (matches resample on obliteration and hard-positive ROUGE-L within "
            f"run-to-run noise, and has the cheapest regularizer call of the matching modes; forward + backward "
            f"per call, back to back in one process: {timed}){caveat}")


def write_table(results: list[dict], original: dict, settings: ForgetSettings, path: Path, notes: list[str],
                reg_ms: dict[str, float] | None = None) -> None:
    """Markdown table: one row per configuration (mean ± half-spread over seeds)."""
    budget_keys = ("lr", "alpha", "max_steps", "batch_size", "retain_batch_size", "general_batch_size",
                   "retain_loss", "lora_layers")
    budgets = {json.dumps({k: r["settings"].get(k) for k in budget_keys}) for r in results if "settings" in r}
    if len(budgets) > 1:
        notes = [f"WARNING: rows were trained with different budgets: {sorted(budgets)}", *notes]
    retain_bs = settings.retain_batch_size or settings.batch_size
    general_bs = settings.general_batch_size or retain_bs
    lines = [
        "# Quality comparison on the demo (SmolLM2-135M-Instruct forgets Harry Potter, CPU)", "",
        (f"Same budget for every row: LoRA r={settings.lora_r} ({settings.lora_targets}"
        f"{f', layers {settings.lora_layers}' if settings.lora_layers is not None else ''}), "
        f"{settings.max_steps} steps, "
        f"{settings.batch_size} forget + {retain_bs} hard-positive + {general_bs} general examples per step, "
        f"lr {settings.lr}, "
        f"retain term {settings.retain_loss} (α={settings.alpha}), max_length {settings.max_length}; "
        f"evaluated on the demo's held-out sets (greedy, {settings.max_new_tokens} new tokens). "
        "Values: mean ± half the spread over seeds."), "",
        ("| config | seeds | obliteration (held-out forget) | ROUGE-L hard positives | ROUGE-L general "
        "| perplexity | gibberish (forget) | false 'I don't know' (hard pos.) | median step (s) | train time (s) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
        (f"| original model | – | {original.get('obliteration_rate', 0):.2f} | 1.00 | 1.00 | "
        f"{original.get('perplexity', float('nan')):.2f} | – | – | – | – |"),
    ]
    for name in CONFIGS:
        rows = [r for r in results if r["config"] == name]
        if not rows:
            lines.append(f"| {name} | not run | | | | | | | | |")
            continue

        def cell(key: str, fmt: str = ".2f", rows: list[dict] = rows) -> str:
            m, n = _stats(rows, key)
            if m is not None and abs(m) >= 1e5:  # a destroyed model's perplexity
                fmt = ".2e"
            return "–" if m is None else (f"{m:{fmt}} ± {n:{fmt}}" if len(rows) > 1 else f"{m:{fmt}}")

        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rows)} | {cell('obliteration_rate')} | "
                     f"{cell('retain_rougeL_recall')} | {cell('general_rougeL_recall')} | {cell('perplexity')} | "
                     f"{cell('gibberish_rate')} | {cell('retain_ignorance_rate')} | {cell('median_step_s')} | "
                     f"{cell('train_s', '.0f')} |")
    lines += ["", recommend(results, reg_ms), ""] + notes
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def _mode_timing(settings: ForgetSettings, out: Path, retime: bool) -> dict[str, float]:
    """:func:`time_modes` for these settings, reused from ``<out>/mode_timing.json`` when it was
    measured for the same settings and thread count (written atomically)."""
    import torch

    from snap_fast.io import write_json

    key = {"lora_r": settings.lora_r, "n_projections": settings.n_projections,
           "reg_refresh_every": settings.reg_refresh_every, "threads": torch.get_num_threads()}
    path = out / "mode_timing.json"
    if path.is_file() and not retime:
        cached = json.loads(path.read_text())
        if cached.get("settings") == key:
            return cached["reg_ms"]
    print("timing the regularizer call of each mode, back to back in one process ...", flush=True)
    reg_ms = time_modes(settings)
    write_json(path, {"settings": key, "reg_ms": reg_ms})
    return reg_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-dir", required=True, help="output folder of `snap-fast demo` (data + original eval)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="override the demo's step count")
    p.add_argument("--alpha", type=float, default=None, help="override the demo's retain weight α")
    p.add_argument("--lr", type=float, default=None, help="override the demo's learning rate")
    p.add_argument("--lam", type=float, default=None, help="override the regularizer weight λ of every config")
    p.add_argument("--lora-targets", default=None, help="override the LoRA target modules (e.g. q_proj,v_proj)")
    p.add_argument("--lora-layers", default=None, help="override the decoder layers with adapters (e.g. 15-29)")
    p.add_argument("--lora-r", type=int, default=None, help="override the LoRA rank")
    p.add_argument("--batch-size", type=int, default=None, help="override the forget batch size")
    p.add_argument("--retain-batch-size", type=int, default=None, help="override the retain batch size")
    p.add_argument("--general-batch-size", type=int, default=None, help="override the general batch size")
    p.add_argument("--retain-loss", choices=("nll", "kl"), default=None, help="override the retain term")
    p.add_argument("--tag", default="", help="suffix for the config names of this invocation (tuning variants)")
    p.add_argument("--out", default=None, help="results folder (default: <demo-dir>/quality)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table", default=str(REPO / "benchmarks" / "results" / "quality_smollm2_cpu.md"))
    p.add_argument("--note", action="append", default=[], help="a line added under the table")
    p.add_argument("--no-timing", action="store_true",
                   help="skip timing the modes' regularizer calls (about a minute; no recommendation then)")
    p.add_argument("--retime", action="store_true", help="time the regularizer calls again instead of reusing "
                   "<out>/mode_timing.json")
    args = p.parse_args(argv)

    import torch

    from snap_fast.forget import choose_threads

    demo_dir = Path(args.demo_dir)
    if not (demo_dir / "data" / "manifest.json").is_file():
        raise FileNotFoundError(f"--demo-dir: {demo_dir}/data is not a finished data folder; run `snap-fast demo` first")
    torch.set_num_threads(args.threads or choose_threads())
    overrides = {k: v for k, v in (("max_steps", args.steps), ("alpha", args.alpha), ("lr", args.lr),
                                   ("batch_size", args.batch_size), ("lora_targets", args.lora_targets),
                                   ("lora_layers", args.lora_layers), ("lora_r", args.lora_r),
                                   ("retain_batch_size", args.retain_batch_size),
                                   ("general_batch_size", args.general_batch_size),
                                   ("retain_loss", args.retain_loss)) if v is not None}
    settings = replace(PRESETS["full"], **overrides)  # the table's header describes these
    # λ is applied over each configuration's own value (CONFIGS sets it), not only over the demo's
    run_overrides = {"lam": args.lam} if args.lam is not None else {}
    out = Path(args.out) if args.out else demo_dir / "quality"
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results = [json.loads(x) for x in results_path.read_text().splitlines() if x.strip()] if results_path.is_file() else []
    original = json.loads((demo_dir / "eval" / "original" / "summary.json").read_text())["headline"]
    # seeds second: every configuration's first seed before any second seed
    for seed in args.seeds:
        for name in args.only:
            if any(r["config"] == name + args.tag and r["seed"] == seed for r in results):
                continue
            print(f"\n=== {name}{args.tag}, seed {seed} ===", flush=True)
            rec = run_one(name, seed, settings, demo_dir, args.model, out, run_overrides, args.tag)
            results.append(rec)
            with results_path.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            write_table(results, original, settings, Path(args.table), args.note)
            print(json.dumps(rec), flush=True)
    reg_ms = None if args.no_timing else _mode_timing(settings, out, args.retime)
    write_table(results, original, settings, Path(args.table), args.note, reg_ms)
    print(recommend(results, reg_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
