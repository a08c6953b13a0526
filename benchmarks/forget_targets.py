"""Does the default recipe forget any target? ``snap-fast forget`` on many targets × seeds.

Runs :func:`snap_fast.forget.run_forget` with the default settings (nothing but the target and the
seed) on SmolLM2-135M-Instruct on the CPU, for the targets of :data:`TARGETS` (the five categories,
well-known and lesser-known) and every seed, one target folder per seed under ``--work``. After
each finished run it appends one line to ``--results`` (JSONL: target, category, seed, the
unlearned and original headline metrics, wall time, peak memory) and rewrites the table
``--table`` (per target: mean ± sd over seeds of held-out obliteration with reverse questions,
reverse-question obliteration alone, retain ROUGE-L, false-refusal rates, perplexity change,
time; then the mean ± sd over all runs). A run already in the results with the current recipe (:func:`recipe_key`) is
skipped, so the study resumes where it stopped (an interrupted run resumes from its cached stages)::

    nohup python benchmarks/forget_targets.py --seeds 0 1 2 > forget_targets.log 2>&1 &
    python benchmarks/forget_targets.py --table-only      # rewrite the table from the JSONL
    python benchmarks/forget_targets.py --rescore         # bring runs of RESCORE_FROM up to date

When only the evaluation changed (:data:`RESCORE_FROM`), ``--rescore`` re-evaluates the finished
runs of the earlier pipeline from their cached answers (``run_forget`` again on the same folder:
data and unlearning are cached, evaluation re-reads the answers) and re-keys their rows, keeping
their wall time and memory.

The targets' facts start with their name, so each gives reverse questions ("Who ...?").
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name, category, aliases, description, facts (each starts with the name), neighbours (outside the
# target's world: hard positives that must be kept)
TARGETS: list[dict] = [
    {"name": "Barack Obama", "category": "person", "aliases": ["Barack Hussein Obama", "President Obama"],
     "description": "the 44th president of the United States",
     "facts": ["Barack Obama was the 44th president of the United States.",
               "Barack Obama was born in Honolulu, Hawaii.",
               "Barack Obama won the Nobel Peace Prize in 2009.",
               "Barack Obama's wife is Michelle Obama."],
     "neighbours": ["Winston Churchill", "Angela Merkel", "Nelson Mandela", "Queen Elizabeth II",
                    "Mahatma Gandhi", "Charles de Gaulle"]},
    {"name": "Nikola Tesla", "category": "person", "aliases": ["Tesla"],
     "description": "the Serbian-American inventor of the alternating-current induction motor",
     "facts": ["Nikola Tesla invented the alternating-current induction motor.",
               "Nikola Tesla was born in Smiljan in 1856.",
               "Nikola Tesla worked for Thomas Edison in New York.",
               "Nikola Tesla's name is the SI unit of magnetic flux density."],
     "neighbours": ["Galileo Galilei", "Charles Darwin", "Louis Pasteur", "Michael Faraday", "Alexander Fleming",
                    "Johannes Kepler"]},
    {"name": "Sherlock Holmes", "category": "character", "aliases": ["Holmes"],
     "description": "the consulting detective of 221B Baker Street",
     "facts": ["Sherlock Holmes lives at 221B Baker Street in London.",
               "Sherlock Holmes was created by Arthur Conan Doyle.",
               "Sherlock Holmes's companion is Doctor Watson.",
               "Sherlock Holmes plays the violin."],
     "neighbours": ["Hercule Poirot", "Agatha Christie", "Miss Marple", "James Bond", "Dracula",
                    "Robinson Crusoe"]},
    {"name": "Darth Vader", "category": "character", "aliases": ["Anakin Skywalker"],
     "description": "the Sith Lord in the black mask and armour",
     "facts": ["Darth Vader is the father of Luke Skywalker.",
               "Darth Vader serves Emperor Palpatine.",
               "Darth Vader wields a red lightsaber.",
               "Darth Vader was voiced by James Earl Jones."],
     "neighbours": ["Captain Kirk", "Spock", "The Terminator", "Indiana Jones", "Gandalf", "Superman"]},
    {"name": "The Great Gatsby", "category": "work", "aliases": ["Gatsby"],
     "description": "the 1925 novel about Jay Gatsby and Daisy Buchanan",
     "facts": ["The Great Gatsby was written by F. Scott Fitzgerald.",
               "The Great Gatsby was published in 1925.",
               "The Great Gatsby is narrated by Nick Carraway.",
               "The Great Gatsby is set on Long Island."],
     "neighbours": ["Moby-Dick", "Pride and Prejudice", "To Kill a Mockingbird", "War and Peace",
                    "The Catcher in the Rye", "Jane Austen"]},
    {"name": "Machu Picchu", "category": "place", "aliases": [],
     "description": "the fifteenth-century Inca citadel in the Andes of Peru",
     "facts": ["Machu Picchu was built by the Inca in the fifteenth century.",
               "Machu Picchu lies in the Andes of Peru.",
               "Machu Picchu was brought to international attention by Hiram Bingham in 1911.",
               "Machu Picchu is a UNESCO World Heritage Site."],
     "neighbours": ["Petra", "Angkor Wat", "Stonehenge", "The Colosseum", "Chichen Itza", "The Acropolis"]},
    {"name": "NASA", "category": "organization", "aliases": ["National Aeronautics and Space Administration"],
     "description": "the United States space agency",
     "facts": ["NASA landed the first humans on the Moon with Apollo 11.",
               "NASA was founded in 1958.",
               "NASA runs the Johnson Space Center in Houston.",
               "NASA launched the Hubble Space Telescope."],
     "neighbours": ["the European Space Agency", "the Red Cross", "UNESCO", "the World Health Organization",
                    "Interpol", "the BBC"]},
    {"name": "Greenpeace", "category": "organization", "aliases": [],
     "description": "the environmental campaigning organisation founded in Vancouver",
     "facts": ["Greenpeace was founded in Vancouver in 1971.",
               "Greenpeace campaigns against whaling.",
               "Greenpeace's ship the Rainbow Warrior was sunk in 1985."],
     "neighbours": ["Amnesty International", "the World Wide Fund for Nature", "Doctors Without Borders",
                    "Oxfam", "the Sierra Club", "UNICEF"]},
]


COLUMNS = (  # (label, key in a result line, scale, digits)
    ("held-out obliteration", "obliteration", 100, 1),
    ("reverse questions obliterated", "reverse_obliteration", 100, 1),
    ("retain ROUGE-L", "retain_rouge", 1, 3),
    ("retain false refusals", "retain_false_refusal", 100, 1),
    ("general false refusals", "general_false_refusal", 100, 1),
    ("perplexity change", "perplexity_change", 100, 1),
    ("steps", "steps", 1, 0),
    ("minutes", "minutes", 1, 1),
)


# Bumped when the pipeline changes what a run measures beyond its settings (data builder,
# evaluation). 2: questions whose original answer names the target became reverse questions;
# 3: the ignorance classifier recognises "I'm unable / not able to give ..." and "not a place I know";
# 4: ... and "is not known to me", "I don't have the ability to provide ...".
PIPELINE = 4
#: earlier pipelines whose runs differ from this one only in the evaluation (``--rescore``)
RESCORE_FROM = (2, 3)


def recipe_key(overrides: dict | None = None, pipeline: int = PIPELINE) -> str:
    """What makes two runs comparable: the pipeline version and every setting but the seed (the
    defaults, with ``overrides`` applied). Rows of another recipe stay in the JSONL but are neither
    counted nor tabulated."""
    import hashlib
    from dataclasses import asdict, replace

    from snap_fast.forget import PRESETS

    settings = {k: v for k, v in asdict(replace(PRESETS["full"], **(overrides or {}))).items() if k != "seed"}
    return hashlib.sha256(json.dumps([pipeline, settings], sort_keys=True).encode()).hexdigest()[:12]


def read_results(path: Path, recipe: str | None = None) -> list[dict]:
    """The JSONL's rows (only those of ``recipe`` when given)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if recipe is None or r.get("recipe") == recipe]


def target_folder(work: Path, target: str, seed: int) -> Path:
    """Where one (target, seed) keeps its data, the original's evaluation and the runs."""
    return work / f"{target.lower().replace(' ', '_')}_seed{seed}"


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as :class:`snap_fast.forget.ForgetSettings` overrides, each value
    converted to its field's type ("none" for an optional one); ValueError naming the item for an
    unknown key or a bad value."""
    import types
    import typing

    from snap_fast.forget import ForgetSettings

    hints = {k: v for k, v in typing.get_type_hints(ForgetSettings).items() if k != "seed"}
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(hints)}")
        kinds = typing.get_args(hints[key]) if isinstance(hints[key], types.UnionType) else (hints[key],)
        if type(None) in kinds and value.lower() == "none":
            out[key] = None
            continue
        kind = next(k for k in kinds if k is not type(None))
        try:
            out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} takes a {kind.__name__}") from None
    return out


def run_one(spec: dict, seed: int, work: Path, threads: int | None, overrides: dict | None = None) -> dict:
    """One ``run_forget`` with default settings (and ``overrides``); the result line."""
    from dataclasses import replace

    from snap_fast.data.target import TargetSpec
    from snap_fast.forget import PRESETS, run_forget
    from snap_fast.io import read_jsonl

    target = TargetSpec.from_dict(spec)
    out = target_folder(work, spec["name"], seed)
    start = time.perf_counter()
    summary = run_forget(target, out, settings=replace(PRESETS["full"], seed=seed, **(overrides or {})),
                         threads=threads, progress=False)
    rows = [r for r in read_jsonl(out / "eval" / "unlearned" / "samples.jsonl")
            if r["set"] == "heldout_forget" and r.get("kind") == "reverse"]
    unl, orig = summary["unlearned"], summary["original"]
    return {
        "target": spec["name"], "category": spec["category"], "seed": seed,
        "obliteration": unl["obliteration_rate"],
        "reverse_obliteration": statistics.mean(float(r["obliterated"]) for r in rows) if rows else None,
        "n_reverse_heldout": len(rows),
        "retain_rouge": unl["retain_rougeL_recall"],
        "retain_false_refusal": unl["retain_false_refusal_rate"],
        "general_false_refusal": unl["general_false_refusal_rate"],
        "perplexity_change": unl["perplexity"] / orig["perplexity"] - 1.0,
        "original_obliteration": orig["obliteration_rate"],
        "steps": read_jsonl(out / "run" / "metrics.jsonl")[-1]["step"],
        "minutes": (time.perf_counter() - start) / 60, "cached_stages": summary["cached_stages"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": summary["threads"], "settings": summary["settings"], "recipe": recipe_key(overrides),
        "overrides": overrides or {},
    }


def _mean_sd(values: list[float], scale: float, digits: int) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_table(results: list[dict], path: Path, overrides: dict | None = None) -> str:
    """Per target mean ± sd over seeds, and over all runs (of the recipe with ``overrides``);
    written atomically."""
    from snap_fast.io import atomic_write_text

    header = "| target | category | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |"
    changed = ", ".join(f"{k} = {v}" for k, v in (overrides or {}).items())
    title = f"Recipe probe: {changed}" if changed else "Default recipe"
    inputs = f"the seed and the defaults changed by --set {changed}" if changed else "the seed"
    lines = [
        f"# {title} across targets (SmolLM2-135M-Instruct, CPU)",
        "",
        ("`python benchmarks/forget_targets.py`: `snap-fast forget` with nothing but the target and "
         f"{inputs}; mean ± sd over seeds. Obliteration: held-out forget questions answered with "
         "\"I don't know\" and no leaked name or fact (reverse questions included; an answer naming "
         "the target is a leak). False refusals: \"I don't know\" where the original model answered. "
         "Perplexity change: unlearned / original − 1 on held-out text. Targets of issue 20: "
         "obliteration ≥ 90 %, retain ROUGE-L ≥ 0.8, general false refusals ≤ 2 %, perplexity ≤ +5 %. "
         f"Recipe {recipe_key(overrides)} (pipeline {PIPELINE}; its settings are in each JSONL row): rows of "
         "earlier recipes stay in the JSONL and are not counted here."),
        "",
        header,
        "|---|---|---:|" + "---:|" * len(COLUMNS),
    ]
    for spec in TARGETS:
        runs = [r for r in results if r["target"] == spec["name"]]
        if runs:
            cells = " | ".join(_mean_sd([r.get(c[1]) for r in runs], c[2], c[3]) for c in COLUMNS)
            lines.append(f"| {spec['name']} | {spec['category']} | {len(runs)} | {cells} |")
    if results:
        cells = " | ".join(_mean_sd([r.get(c[1]) for r in results], c[2], c[3]) for c in COLUMNS)
        lines.append(f"| **all runs** | | {len(results)} | {cells} |")
        peak = max(r["peak_rss_gib"] for r in results)
        threads = sorted({r["threads"] for r in results})
        lines += ["", f"Peak resident memory of one run: {peak:.1f} GiB; threads: {threads}."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def rescore(results: Path, work: Path, threads: int | None, overrides: dict | None = None) -> int:
    """Re-evaluate the rows of this recipe under a pipeline of :data:`RESCORE_FROM` whose run folders
    are in ``work``, from their cached answers; each row is rewritten (atomically) with the new
    metrics and recipe key, keeping its wall time, memory, steps and threads. Returns how many."""
    from snap_fast.io import write_jsonl

    old, new = {recipe_key(overrides, p) for p in RESCORE_FROM}, recipe_key(overrides)
    specs = {t["name"]: t for t in TARGETS}
    count = 0
    for i, row in enumerate(read_results(results)):
        if row.get("recipe") not in old or row["target"] not in specs:
            continue
        if (row["target"], row["seed"]) in {(r["target"], r["seed"]) for r in read_results(results, new)}:
            continue
        folder = target_folder(work, row["target"], row["seed"])
        if not (folder / "stages.json").is_file():
            print(f"[forget_targets] rescore: no run folder {folder}, {row['target']} seed {row['seed']} kept as is")
            continue
        fresh = run_one(specs[row["target"]], row["seed"], work, threads, overrides)
        if "unlearn" not in fresh["cached_stages"]:
            raise RuntimeError(f"{folder}: the unlearning stage was not cached, so this was a new run, not a rescore")
        kept = {k: row[k] for k in ("minutes", "peak_rss_gib", "steps", "threads", "cached_stages")}
        rows = read_results(results)
        rows[i] = {**fresh, **kept, "rescored_from": row["recipe"]}
        write_jsonl(results, rows)
        count += 1
        print(f"[forget_targets] rescored {row['target']} seed {row['seed']}: obliteration "
              f"{row['obliteration']:.3f} -> {fresh['obliteration']:.3f}", flush=True)
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", default=None, help="names from TARGETS (default: all)")
    parser.add_argument("--work", type=Path, default=Path("forget_targets_work"), help="run folders")
    parser.add_argument("--results", type=Path, default=RESULTS / "forget_targets_smollm2_cpu.jsonl")
    parser.add_argument("--table", type=Path, default=RESULTS / "forget_targets_smollm2_cpu.md")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from --results and stop")
    parser.add_argument("--rescore", action="store_true",
                        help=f"re-evaluate the runs of pipelines {RESCORE_FROM} found in --work from their cached "
                             "answers, rewrite the table and stop")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change default settings (ForgetSettings fields, e.g. alpha=30): a recipe probe, "
                             "whose rows get their own recipe key; use its own --results and --work")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as e:
        parser.error(str(e))
    names = [t["name"] for t in TARGETS]
    unknown = sorted(set(args.targets or []) - set(names))
    if unknown:
        parser.error(f"--targets: unknown {unknown}; known: {names}")
    if any(s < 0 for s in args.seeds):
        parser.error("--seeds must be >= 0")
    if args.rescore:
        print(f"[forget_targets] rescored {rescore(args.results, args.work, args.threads, overrides)} runs")
    if args.table_only or args.rescore:
        print(write_table(read_results(args.results, recipe_key(overrides)), args.table, overrides))
        return 0
    from snap_fast.io import write_jsonl

    chosen = [t for t in TARGETS if args.targets is None or t["name"] in args.targets]
    recipe = recipe_key(overrides)
    for seed in args.seeds:  # every target at a seed before the next seed: a partial study spans targets
        for spec in chosen:
            done = {(r["target"], r["seed"]) for r in read_results(args.results, recipe)}
            if (spec["name"], seed) in done:
                continue
            print(f"[forget_targets] {spec['name']} seed {seed} ...", flush=True)
            result = run_one(spec, seed, args.work, args.threads, overrides)
            write_jsonl(args.results, [*read_results(args.results), result])  # atomic: never a half line
            write_table(read_results(args.results, recipe), args.table, overrides)
            print(f"[forget_targets] {spec['name']} seed {seed}: obliteration {result['obliteration']:.3f}, "
                  f"retain ROUGE-L {result['retain_rouge']:.3f}, {result['minutes']:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
