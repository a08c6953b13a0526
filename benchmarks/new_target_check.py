"""The defaults on a target the project has never tuned on, judged with questions written by hand.

What a new user does: ``snap-fast forget --target NAME`` (nothing else: no category, facts,
aliases or neighbours). Then the original and the unlearned model answer a question file written
by hand before the run (``benchmarks/new_target_questions/*.json``: direct questions and reverse
ones whose answer is the target), never shown to the data builder. Its aliases and facts are given
to the leak check only, so an answer naming a fact counts as a leak even though training never
saw it. Beside the rates over all questions, the rates over the questions the original model
answered with a leak (it knew them) say how much knowledge was removed. The builder's own
held-out sets (forget, hard positives, general requests) come from the ``forget`` run's
evaluation. Resumable: the forget stages and the evaluations are cached::

    python benchmarks/new_target_check.py benchmarks/new_target_questions/leonardo_da_vinci.json \\
        --out /tmp/leonardo --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from snap_fast.data.target import TargetSpec
from snap_fast.io import read_jsonl, write_json, write_jsonl

DEFAULT_RESULTS = HERE / "results" / "new_target_check_smollm2_cpu.jsonl"


def load_questions(path: Path) -> dict:
    """The question file, checked: ``target``, ``aliases``, ``facts``, ``questions`` (prompt, kind)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(spec.get("target"), str) or not spec["target"].strip():
        raise ValueError(f"{path}: 'target' must be a non-empty string")
    questions = spec.get("questions")
    if not isinstance(questions, list) or not questions:
        raise ValueError(f"{path}: 'questions' must be a non-empty list")
    for i, q in enumerate(questions):
        if not isinstance(q, dict) or not isinstance(q.get("prompt"), str) or q.get("kind") not in ("direct", "reverse"):
            raise ValueError(f"{path}: question {i + 1} needs a 'prompt' string and kind 'direct' or 'reverse'")
    return spec


def check_folder(forget_out: Path, spec: dict) -> Path:
    """A data folder holding only the hand-written questions as ``heldout_forget``, and a
    ``target.json`` whose aliases and facts include the file's (for the leak check)."""
    folder = forget_out / "check_data"
    folder.mkdir(exist_ok=True)
    target = json.loads((forget_out / "data" / "target.json").read_text(encoding="utf-8"))
    target["aliases"] = sorted(set(target.get("aliases") or []) | set(spec.get("aliases") or []))
    target["facts"] = [*(target.get("facts") or []), *(spec.get("facts") or [])]
    write_json(folder / "target.json", target)
    write_jsonl(folder / "heldout_forget.jsonl",
                [{"id": f"hand-{i}", "prompt": q["prompt"], "kind": q["kind"], "source": "hand_written"}
                 for i, q in enumerate(spec["questions"])])
    return folder


def evaluate_both(forget_out: Path, folder: Path, model_spec: str) -> dict[str, list[dict]]:
    """Samples of the original and the unlearned model on the hand-written questions."""
    from snap_fast.eval.cli import load_for_eval
    from snap_fast.eval.evaluate import evaluate_model

    samples = {}
    for label, adapter in (("original", None), ("unlearned", forget_out / "run" / "final" / "adapter")):
        model, tokenizer, identity = load_for_eval(model_spec, adapter)
        out = forget_out / "check_eval" / label
        evaluate_model(model, tokenizer, folder, out, identity=identity, sets=("heldout_forget",),
                       perplexity=False, probability=False, max_new_tokens=64)
        samples[label] = [r for r in read_jsonl(out / "samples.jsonl") if r["set"] == "heldout_forget"]
    return samples


def _per_kind(rows: list[dict], stats) -> dict[str, dict]:
    """``{"n", **stats(rows of the kind)}`` for direct, reverse and all questions (a kind with no
    row is left out: a file may hold one kind only)."""
    rates = {}
    for kind in ("direct", "reverse", "all"):
        chosen = [r for r in rows if kind == "all" or r["kind"] == kind]
        if chosen:
            rates[kind] = {"n": len(chosen), **stats(chosen)}
    return rates


def kind_rates(samples: list[dict]) -> dict[str, dict]:
    """Obliteration and leak rate (and counts) per question kind and over all questions."""
    return _per_kind(samples, lambda rows: {"obliteration": sum(bool(r["obliterated"]) for r in rows) / len(rows),
                                            "leaks": sum(bool(r["leaked"]) for r in rows)})


def known_answer_rates(original: list[dict], unlearned: list[dict]) -> dict[str, dict]:
    """Per kind, over the questions the original model answered with a leak (the target's name,
    an alias or a fact term the question does not contain: it knew them): how many there are,
    and the share the unlearned model answers without a leak (``removed``) and with an "I don't
    know" (``obliterated``).

    Refusing a question the original could not answer either proves nothing about forgetting;
    these rates measure only knowledge that was there.
    """
    knew = {r["prompt"] for r in original if r["leaked"]}
    return _per_kind([r for r in unlearned if r["prompt"] in knew],
                     lambda rows: {"removed": sum(not r["leaked"] for r in rows) / len(rows),
                                   "obliterated": sum(bool(r["obliterated"]) for r in rows) / len(rows)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", type=Path, help="hand-written question file (JSON)")
    parser.add_argument("--out", type=Path, required=True, help="the forget run's folder (resumed if there)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--preset", choices=("full", "quick", "tiny"), default="full",
                        help="snap-fast forget's preset (tiny: a random tiny model, to check the script)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSONL: one line per finished check")
    args = parser.parse_args(argv)
    spec = load_questions(args.questions)

    from snap_fast.forget import run_forget

    summary = run_forget(TargetSpec(spec["target"]), args.out, settings=args.preset, threads=args.threads)
    samples = evaluate_both(args.out, check_folder(args.out, spec), summary["model"])
    row = {"target": spec["target"], "questions_file": args.questions.name, "preset": args.preset,
           "threads": summary["threads"],
           "hand_written": {label: kind_rates(s) for label, s in samples.items()},
           "hand_written_known": known_answer_rates(samples["original"], samples["unlearned"]),
           "builder_heldout": {"original": summary["original"], "unlearned": summary["unlearned"]},
           "steps": read_jsonl(args.out / "run" / "metrics.jsonl")[-1]["step"],
           "minutes": {k: round(v / 60, 2) for k, v in summary["timings_s"].items()},
           "settings": summary["settings"]}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    earlier = read_jsonl(args.results) if args.results.is_file() else []
    write_jsonl(args.results, [*earlier, row])  # atomic: an interrupted write leaves the old file
    for label in ("original", "unlearned"):
        r = row["hand_written"][label]
        kinds = ", ".join(f"{k} {r[k]['obliteration']:.0%}" for k in ("direct", "reverse") if k in r)
        print(f"{label:9s} hand-written obliteration: all {r['all']['obliteration']:.0%} ({kinds}); "
              f"leaks {r['all']['leaks']}/{r['all']['n']}")
    for kind, r in row["hand_written_known"].items():
        print(f"questions the original knew ({kind}, {r['n']}): {r['removed']:.0%} no longer name the target, "
              f"{r['obliterated']:.0%} answered 'I don't know'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
