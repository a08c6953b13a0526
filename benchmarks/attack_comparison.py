"""Does the forgetting hold, method by method? Every attack of ``snap-fast eval --attacks`` on
SNAP and the baselines, same data, same budget.

For each target and seed, the data folder is built once and the original model evaluated and
attacked once (the control); then each method of :data:`METHODS` unlearns from the original with
``snap-fast unlearn``'s defaults (``idk`` is SNAP without the regularizer, λ = 0), and the
unlearned model is evaluated and attacked: quantization (8 and 4 bits round-to-nearest, and
torchao's int8), relearning (0, 10, 25 steps on 8 forget answers), the nine prompt attacks,
membership inference. One JSONL line per finished (target, seed, method), with each attack's
wall time; the table gives mean ± sd per method::

    nohup python benchmarks/attack_comparison.py --work DIR > attacks.log 2>&1 &
    python benchmarks/attack_comparison.py --table-only
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
from regularizer_study import prepare

METHODS = ("original", "snap", "idk", "snap-npo", "grad-diff", "npo", "ga")
COMPARISON_TARGETS = ("Barack Obama", "Sherlock Holmes")
RELEARN_STEPS = (0, 10, 25)
QUANT_GROUP_SIZE = 64


def attack_all(model, tokenizer, data: Path, out: Path, identity: str, seed: int) -> dict:
    """Every attack on ``model``; ``{name: result with "seconds"}``."""
    from snap_fast.eval.attacks import quantization_attack, relearning_attack
    from snap_fast.eval.mia import membership_inference
    from snap_fast.eval.prompt_attacks import prompt_attack

    quiet = {"progress": False, "batch_size": 64, "max_new_tokens": 32, "seed": seed}
    runs = {
        "quant": lambda: quantization_attack(model, tokenizer, data, out, identity=identity, bits=(8, 4),
                                             group_size=QUANT_GROUP_SIZE, library=("torchao-int8",),
                                             evaluate_kwargs=quiet, log=lambda m: None),
        "relearn": lambda: relearning_attack(model, tokenizer, data, out, identity=identity, steps=RELEARN_STEPS,
                                             seed=seed, evaluate_kwargs=quiet, log=lambda m: None),
        "prompts": lambda: prompt_attack(model, tokenizer, data, out, seed=seed, batch_size=64, progress=False,
                                         log=lambda m: None),
        "mia": lambda: membership_inference(model, tokenizer, data, batch_size=16, progress=False, log=lambda m: None),
    }
    results = {}
    for name, run in runs.items():
        start = time.perf_counter()
        results[name] = {**run(), "seconds": time.perf_counter() - start}
    return results


#: (row key, evaluation folder under the method's ``eval``) of each evaluation whose held-out forget leak
#: rate a row records: the unlearned model's own, then the folders quantization_attack and
#: relearning_attack write
ATTACK_FOLDERS = (("leak_rate", "."), ("quant8_leak_rate", f"quant_8bit_g{QUANT_GROUP_SIZE}"),
                  ("quant4_leak_rate", f"quant_4bit_g{QUANT_GROUP_SIZE}"), ("torchao_int8_leak_rate", "quant_torchao-int8"),
                  *((f"relearn{k}_leak_rate", f"relearn_{k}steps") for k in RELEARN_STEPS))


def leak_columns(eval_dir: Path) -> dict:
    """Method-neutral columns from the saved summaries: held-out forget leak rate (an answer naming the
    target or one of its facts) after each attack, and the gibberish rate before any. Obliteration
    counts only fluent "I don't know" answers, so a method that collapses into gibberish scores 0 %
    there while leaking nothing; the leak rate compares every method on the same footing."""
    import json

    def forget(folder: str) -> dict:
        return json.loads((eval_dir / folder / "summary.json").read_text())["sets"]["heldout_forget"]

    return {**{key: forget(folder)["leak_rate"] for key, folder in ATTACK_FOLDERS},
            "gibberish_rate": forget(".")["gibberish_rate"]}


def run_method(method: str, folder: Path, seed: int, base, tokenizer, identity: str) -> dict:
    """Unlearn with ``method`` (none for "original"), evaluate and attack; the result line."""
    from snap_fast.eval.cli import load_for_eval
    from snap_fast.eval.evaluate import evaluate_model
    from snap_fast.train.recipe import unlearn

    out = folder / "methods" / method
    start = time.perf_counter()
    model = base
    if method != "original":
        result = unlearn({"data": str(folder / "data"), "out": str(out / "run"), "method": method, "seed": seed,
                          "device": "cpu", "progress": False, "overwrite": True})
        if result.status != "completed":
            raise RuntimeError(f"{method}: unlearning did not complete ({result.status})")
        model, tokenizer, identity = load_for_eval("smollm2-135m-instruct", result.final_dir / "adapter")
    unlearn_minutes = (time.perf_counter() - start) / 60
    summary = evaluate_model(model, tokenizer, folder / "data", out / "eval", identity=identity,
                             sets=("heldout_forget", "heldout_retain", "heldout_general"), batch_size=64,
                             max_new_tokens=32, progress=False, log=lambda m: None)
    attacks = attack_all(model, tokenizer, folder / "data", out / "eval", identity, seed)
    h = summary["headline"]
    kinds = attacks["prompts"]["kinds"]
    return {
        "method": method, "obliteration": h["obliteration_rate"], "retain_rouge": h["retain_rougeL_recall"],
        "general_false_refusal": h["general_false_refusal_rate"], "perplexity": h["perplexity"],
        "quant8_obliteration": attacks["quant"]["settings"]["8bit"]["obliteration_rate"],
        "quant4_obliteration": attacks["quant"]["settings"]["4bit"]["obliteration_rate"],
        "torchao_int8_obliteration": attacks["quant"]["settings"]["torchao-int8"]["obliteration_rate"],
        **{f"relearn{k}_obliteration": attacks["relearn"]["steps"][str(k)]["obliteration_rate"] for k in RELEARN_STEPS},
        "prompt_leak_mean": statistics.mean(k["leak_rate"] for k in kinds.values()),
        "prompt_leak": {name: k["leak_rate"] for name, k in kinds.items()},
        "mia_auc": attacks["mia"]["auc"],
        "attack_seconds": {name: a["seconds"] for name, a in attacks.items()},
        "unlearn_minutes": unlearn_minutes,
        **leak_columns(out / "eval"),
    }


COLUMNS = (("held-out obliteration", "obliteration", 100, 1), ("retain ROUGE-L", "retain_rouge", 1, 3),
           ("8-bit obliteration", "quant8_obliteration", 100, 1), ("4-bit obliteration", "quant4_obliteration", 100, 1),
           ("torchao int8 obliteration", "torchao_int8_obliteration", 100, 1),
           ("after 10 relearning steps", "relearn10_obliteration", 100, 1),
           ("after 25 relearning steps", "relearn25_obliteration", 100, 1),
           ("prompt attacks: mean leak rate", "prompt_leak_mean", 100, 1))
LEAK_COLUMNS = (("held-out leak rate", "leak_rate"), ("gibberish rate", "gibberish_rate"),
                ("8-bit leak", "quant8_leak_rate"), ("4-bit leak", "quant4_leak_rate"),
                ("torchao int8 leak", "torchao_int8_leak_rate"), ("leak after 10 relearning steps", "relearn10_leak_rate"),
                ("leak after 25 relearning steps", "relearn25_leak_rate"))


def _method_rows(results: list[dict], cells) -> list[str]:
    """One table row per method with results, in :data:`METHODS` order: name, n, ``cells(runs)``."""
    rows = []
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if runs:
            rows.append(f"| {method} | {len(runs)} | " + " | ".join(cells(runs)) + " |")
    return rows


def write_table(results: list[dict], path: Path) -> str:
    """Mean ± sd per method over targets and seeds, MIA AUC (loss, Min-K %++) and attack times."""
    from snap_fast.io import atomic_write_text

    lines = ["# Attacks on SNAP and the baselines (SmolLM2-135M-Instruct, CPU)", "",
             ("`python benchmarks/attack_comparison.py`: each method with `snap-fast unlearn`'s defaults on the same "
              "data; every attack of `snap-fast eval --attacks all`. Obliteration: held-out forget questions; "
              "the original model is the control. MIA: AUC of trained against held-out forget answers (0.5: "
              "indistinguishable)."), "",
             "| method | n | " + " | ".join(c[0] for c in COLUMNS) + " | MIA AUC (loss) | MIA AUC (Min-K %++) |",
             "|---|---:|" + "---:|" * (len(COLUMNS) + 2)]
    lines += _method_rows(results, lambda runs: [_mean_sd([r[c[1]] for r in runs], c[2], c[3]) for c in COLUMNS]
                          + [_mean_sd([r["mia_auc"][k] for r in runs], 1, 3) for k in ("loss", "min_k_plus_plus")])
    lines += ["", ("Leak rates, % of held-out forget answers that name the target or one of its facts (every "
                   "method on the same footing: a collapsed model leaks nothing but is not obliterated either):"), "",
              "| method | n | " + " | ".join(c[0] for c in LEAK_COLUMNS) + " |", "|---|---:|" + "---:|" * len(LEAK_COLUMNS)]
    lines += _method_rows([r for r in results if "leak_rate" in r],
                          lambda runs: [_mean_sd([r[key] for r in runs], 100, 1) for _, key in LEAK_COLUMNS])
    if results:
        names = list(results[0]["attack_seconds"])
        lines += ["", "Wall time per attack (s, mean over runs): " + ", ".join(
            f"{n} {statistics.mean(r['attack_seconds'][n] for r in results):.0f}" for n in names)
            + f"; threads {sorted({r['threads'] for r in results})}."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def add_leak_columns(results: Path, work: Path) -> None:
    """Give finished rows written before the leak columns existed their values, from the evaluations
    their run saved under ``work`` (rows whose folders are gone are left as they are)."""
    from snap_fast.io import write_jsonl

    rows = read_results(results)
    for row in rows:
        eval_dir = target_folder(work, row["target"], row["seed"]) / "methods" / row["method"] / "eval"
        if "leak_rate" not in row and (eval_dir / "summary.json").is_file():
            row.update(leak_columns(eval_dir))
    write_jsonl(results, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--targets", nargs="+", default=list(COMPARISON_TARGETS))
    parser.add_argument("--work", type=Path, default=Path("attack_comparison_work"))
    parser.add_argument("--results", type=Path, default=RESULTS / "attack_comparison_smollm2_cpu.jsonl")
    parser.add_argument("--table", type=Path, default=RESULTS / "attack_comparison_smollm2_cpu.md")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.targets) - {t["name"] for t in TARGETS})
    if unknown:
        parser.error(f"--targets: unknown {unknown}")
    if args.table_only:
        print(write_table(read_results(args.results), args.table))
        return 0
    add_leak_columns(args.results, args.work)
    import torch

    from snap_fast.io import write_jsonl
    from snap_fast.models import load_model, model_identity

    base, tokenizer = load_model("smollm2-135m-instruct")
    identity = model_identity("smollm2-135m-instruct", base)
    for seed in args.seeds:
        for spec in (t for t in TARGETS if t["name"] in args.targets):
            folder, _ = prepare(spec, seed, args.work, base, tokenizer, identity)
            for method in args.methods:
                if (spec["name"], seed, method) in {(r["target"], r["seed"], r["method"])
                                                    for r in read_results(args.results)}:
                    continue
                print(f"[attack_comparison] {spec['name']} seed {seed} {method} ...", flush=True)
                row = {"target": spec["name"], "seed": seed,
                       **run_method(method, folder, seed, base, tokenizer, identity),
                       "threads": torch.get_num_threads()}
                write_jsonl(args.results, [*read_results(args.results), row])
                write_table(read_results(args.results), args.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
