"""The unlearning report: ``report.md`` + a self-contained ``report.html`` with matplotlib figures.

Inputs are files only: two evaluation folders (``summary.json`` + ``samples.jsonl`` from
:func:`snap_fast.eval.evaluate.evaluate_model`) for the original and the unlearned model, and
optionally the training run folder (``metrics.jsonl``, ``config.yaml``, ``final/adapter``).

Sections: headline (quality targets), metrics before/after, the attacks when any ran
(:mod:`snap_fast.eval.attack_report`), training curves of every loss term
and the regularizer, LoRA-delta statistics per layer, examples (question, original answer, new
answer), settings. Figures are PNG files in ``figures/`` (linked from the Markdown) and embedded
as base64 data URIs in the HTML, so the page renders offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: figures are only written to files
import matplotlib.pyplot as plt
import matplotlib.ticker

from snap_fast.io import atomic_write_bytes, atomic_write_text, read_jsonl

from .attack_report import attack_section, figure_attacks
from .evaluate import check_targets

# (set, key, label) of the bars in the before/after figure and rows of the before/after table
COMPARED = (
    ("heldout_forget", "obliteration_rate", "obliteration rate (held-out forget)"),
    ("heldout_forget", "rougeL_recall", "ROUGE-L recall (held-out forget)"),
    ("forget", "rougeL_recall", "ROUGE-L recall (forget)"),
    ("heldout_retain", "rougeL_recall", "ROUGE-L recall (held-out hard positives)"),
    ("heldout_general", "rougeL_recall", "ROUGE-L recall (held-out general)"),
    ("heldout_forget", "probability", "P(original answer) (held-out forget)"),
    ("heldout_retain", "probability", "P(original answer) (held-out hard positives)"),
    ("heldout_retain", "ignorance_rate", "'I don't know' rate (held-out hard positives)"),
    ("heldout_general", "ignorance_rate", "'I don't know' rate (held-out general)"),
    ("heldout_retain", "false_refusal_rate", "false refusals (held-out hard positives)"),
    ("heldout_general", "false_refusal_rate", "false refusals (held-out general)"),
    ("heldout_forget", "gibberish_rate", "gibberish rate (held-out forget)"),
    ("heldout_retain", "gibberish_rate", "gibberish rate (held-out hard positives)"),
)
LOSS_KEYS = ("loss", "loss_forget", "loss_retain", "loss_general", "reg", "reg_weighted", "reg_grad_share")
HEADINGS = ("Headline", "Metrics before and after", "Training curves", "LoRA-delta statistics per layer",
            "Examples", "Settings")


# ------------------------------------------------------------------------------------- helpers
def _load_eval(folder: str | Path) -> tuple[dict, list[dict]]:
    folder = Path(folder)
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found (run `snap-fast eval --out {folder}` first)")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    samples_path = folder / "samples.jsonl"
    samples = read_jsonl(samples_path) if samples_path.is_file() else []
    return summary, samples


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if pct:
        return f"{100 * v:.1f} %"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def compared_values(summary: Mapping) -> list[tuple[str, float | None]]:
    """``[(label, value)]`` of :data:`COMPARED` from one evaluation summary."""
    sets = summary.get("sets", {})
    return [(label, sets.get(s, {}).get(key)) for s, key, label in COMPARED]


# ------------------------------------------------------------------------------------- figures
def figure_before_after(original: Mapping, unlearned: Mapping) -> bytes | None:
    """Grouped bars (original vs unlearned) of every rate/recall/probability in
    :data:`COMPARED`, plus perplexity in its own panel. PNG bytes, or None with nothing to plot."""
    rows = [(lbl, a, b) for (lbl, a), (_, b) in zip(compared_values(original), compared_values(unlearned))
            if a is not None or b is not None]
    if not rows:
        return None
    ppl = (original.get("perplexity"), unlearned.get("perplexity"))
    has_ppl = any(p is not None for p in ppl)
    fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(12 if has_ppl else 9, 0.45 * len(rows) + 1.6),
                             gridspec_kw={"width_ratios": [4, 1]} if has_ppl else None, squeeze=False)
    ax = axes[0][0]
    y = range(len(rows))
    h = 0.38
    ax.barh([i - h / 2 for i in y], [r[1] or 0 for r in rows], h, label="original", color="#8c8c8c")
    ax.barh([i + h / 2 for i in y], [r[2] or 0 for r in rows], h, label="unlearned", color="#d6604d")
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_title("original vs unlearned (0–1)")
    ax.legend(loc="lower right", fontsize=8)
    if has_ppl:
        ax2 = axes[0][1]
        ax2.bar(["original", "unlearned"], [p or 0 for p in ppl], color=["#8c8c8c", "#d6604d"])
        ax2.set_title("perplexity (held-out text)")
    return _png(fig)


def figure_training_curves(metrics: Sequence[Mapping]) -> bytes | None:
    """One panel per loss term / regularizer key present in ``metrics.jsonl`` rows, against step."""
    keys = [k for k in LOSS_KEYS if any(isinstance(m.get(k), (int, float)) for m in metrics)]
    extra = sorted({k for m in metrics for k in m if k.startswith("loss_") and k not in keys
                    and isinstance(m.get(k), (int, float))})
    keys += extra
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip([a for r in axes for a in r], keys):
        pts = [(m.get("step", i), m[key]) for i, m in enumerate(metrics) if isinstance(m.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None, color="#2166ac")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in [a for r in axes for a in r][len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


_LAYER_NUM = re.compile(r"layers?\.(\d+)\.")


def lora_stats_from_metrics(metrics: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """Per-layer LoRA statistics from the last ``metrics.jsonl`` row that has ``lora/`` keys.

    Keys look like ``lora/<module name>/<stat>`` (or ``lora/<module name>.<stat>``); keys with
    no module part (totals) are returned under ``"total"``. Returns ``{stat: {module: value}}``.
    """
    last = next((m for m in reversed(metrics) if any(k.startswith("lora/") for k in m)), None)
    out: dict[str, dict[str, float]] = defaultdict(dict)
    if last is None:
        return {}
    for k, v in last.items():
        if not k.startswith("lora/") or not isinstance(v, (int, float)):
            continue
        rest = k[len("lora/"):]
        if "/" in rest:
            module, stat = rest.rsplit("/", 1)
        elif "." in rest:
            module, stat = rest.rsplit(".", 1)
        else:
            module, stat = "total", rest
        out[stat][module] = float(v)
    return dict(out)


def lora_stats_from_adapter(adapter_dir: str | Path) -> dict[str, dict[str, float]]:
    """Per-module ‖ΔW‖_F and spectral norm of ΔW = s·B·A from a PEFT adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``); ``{}`` when absent.

    Used when the run logged no per-layer statistics. ΔW is never formed: with B = Q_B R_B and
    Aᵀ = Q_A R_A (thin QR), ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ has the singular values of the r×r core
    s·R_B·R_Aᵀ, so both norms cost O((n + d)·r²) per module."""
    import torch
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        return {}
    cfg = json.loads(cfg_path.read_text())
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    weights = load_file(str(w_path))
    out: dict[str, dict[str, float]] = {"fro": {}, "spectral": {}}
    for name, a in weights.items():
        if ".lora_A." not in name:
            continue
        b = weights.get(name.replace(".lora_A.", ".lora_B."))
        if b is None:
            continue
        module = name.split(".lora_A.")[0].replace("base_model.model.", "")
        core = scale * (torch.linalg.qr(b.double())[1] @ torch.linalg.qr(a.double().T)[1].T)
        sv = torch.linalg.svdvals(core)
        out["fro"][module] = float(sv.norm())
        out["spectral"][module] = float(sv.max())
    return out if out["fro"] else {}


def lora_layer_series(values: Mapping[str, float]) -> dict[str, list[tuple[int, float]]]:
    """``{module kind: [(layer index, value), ...]}`` sorted by layer, from ``{module: value}``;
    the ``"total"`` entry is not a layer and is left out."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for module, value in values.items():
        if module == "total":
            continue
        m = _LAYER_NUM.search(module + ".")
        kind = module.rsplit(".", 1)[-1]
        series[kind].append((int(m.group(1)) if m else len(series[kind]), value))
    return {kind: sorted(pts) for kind, pts in series.items()}


def figure_lora_stats(stats: Mapping[str, Mapping[str, float]]) -> bytes | None:
    """For each statistic with per-module values: the value per module, grouped by module type
    (q_proj, v_proj, ...) across layer index. PNG bytes or None."""
    plotted = {s: v for s, v in stats.items() if len([m for m in v if m != "total"]) >= 2}
    if not plotted:
        return None
    names = sorted(plotted)[:6]
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.6 * len(names)), squeeze=False)
    for ax, stat in zip([r[0] for r in axes], names):
        for kind, pts in sorted(lora_layer_series(plotted[stat]).items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        # the model-wide total (norms in quadrature, a max, a sum...) is on another scale than any
        # layer: stated in the title and the totals table, never drawn among the layers
        total = plotted[stat].get("total")
        ax.set_title(f"LoRA ΔW: {stat}" + (f" (all layers: {_fmt(total)})" if total is not None else ""))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return _png(fig)


# -------------------------------------------------------------------------------------- report
def pick_examples(original_samples: Sequence[Mapping], unlearned_samples: Sequence[Mapping],
                  n_per_set: int = 5, sets: Sequence[str] = ("heldout_forget", "heldout_retain", "heldout_general")
                  ) -> list[dict]:
    """Rows ``{"set", "prompt", "original", "unlearned"}``: the first ``n_per_set`` questions of
    each set present in both evaluations (matched by set and id)."""
    before = {(s["set"], s["id"]): s for s in original_samples}
    rows = []
    for st in sets:
        chosen = [s for s in unlearned_samples if s["set"] == st and (st, s["id"]) in before][:n_per_set]
        for s in chosen:
            rows.append({"set": st, "prompt": s["prompt"], "original": before[(st, s["id"])]["answer"],
                         "unlearned": s["answer"], "obliterated": s.get("obliterated")})
    return rows


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _truncate(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def build_report(
    out_dir: str | Path,
    original_eval: str | Path,
    unlearned_eval: str | Path,
    *,
    run_dir: str | Path | None = None,
    title: str | None = None,
    n_examples: int = 5,
    extra_lines: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``.

    Args:
        out_dir: report folder (created).
        original_eval, unlearned_eval: evaluation folders of the original / unlearned model.
        run_dir: the training run folder (``metrics.jsonl``, ``config.yaml``, ``final/adapter``);
            without it the training-curve and LoRA sections say so.
        title: page title; default "Unlearning report: <target>".
        n_examples: example questions per set in the example table.
        extra_lines: Markdown lines added under the headline (e.g. timings).

    Returns:
        ``{"md": path, "html": path, "figures": folder}``.
    """
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    orig, orig_samples = _load_eval(original_eval)
    unl, unl_samples = _load_eval(unlearned_eval)
    target = unl.get("target") or orig.get("target") or "the target"
    title = title or f"Unlearning report: {target}"
    metrics, config_text, lora_stats = _run_inputs(run_dir)
    figures = {
        "before_after": figure_before_after(orig, unl),
        "training_curves": figure_training_curves(metrics) if metrics else None,
        "lora_stats": figure_lora_stats(lora_stats) if lora_stats else None,
        "attacks": figure_attacks({"original": orig, "unlearned": unl}),
    }
    for name, png in figures.items():
        if png is not None:
            atomic_write_bytes(out / "figures" / f"{name}.png", png)

    doc = _Document(title, figures)
    doc.section("Headline")
    doc.table(["quality target", "unlearned", "target", "met"], _headline_rows(check_targets(orig, unl)))
    for line in extra_lines:
        doc.para(line)

    doc.section("Metrics before and after")
    cmp_rows = [[lbl, _fmt(a), _fmt(b)] for (lbl, a), (_, b) in zip(compared_values(orig), compared_values(unl))
                if a is not None or b is not None]
    cmp_rows.append(["perplexity (held-out text)", _fmt(orig.get("perplexity")), _fmt(unl.get("perplexity"))])
    doc.table(["metric", "original", "unlearned"], cmp_rows)
    doc.figure("before_after", "metrics before and after", "No metrics to plot.")
    attack_section(doc, {"original": orig, "unlearned": unl}, _fmt)

    doc.section("Training curves")
    doc.figure("training_curves", "training curves",
               "No training metrics (run folder not given or metrics.jsonl absent).")

    doc.section("LoRA-delta statistics per layer")
    doc.figure("lora_stats", "LoRA-delta statistics per layer",
               "No per-layer LoRA statistics (full fine-tuning, or no adapter / lora/ metrics in the run).")
    totals = {stat: v["total"] for stat, v in lora_stats.items() if "total" in v}
    if totals:
        doc.table(["statistic (all layers)", "value"], [[k, _fmt(v)] for k, v in sorted(totals.items())])

    doc.section("Examples")
    examples = pick_examples(orig_samples, unl_samples, n_per_set=n_examples)
    doc.table(["set", "question", "original answer", "new answer"],
              [[e["set"], e["prompt"], _truncate(e["original"]), _truncate(e["unlearned"])] for e in examples])

    doc.section("Settings")
    doc.para(f"original model: {orig.get('model')}; unlearned model: {unl.get('model')}; data: {unl.get('data')}")
    doc.para(f"generation: greedy, {unl.get('settings', {})}")
    if config_text:
        doc.code(config_text, "yaml")
    atomic_write_text(out / "report.md", doc.markdown())
    atomic_write_text(out / "report.html", doc.html())
    return {"md": out / "report.md", "html": out / "report.html", "figures": out / "figures"}


def _run_inputs(run_dir: str | Path | None) -> tuple[list[dict], str, dict]:
    """What the report reads from a training run: metrics, config.yaml, LoRA statistics per layer
    (from the logged metrics, else from the saved adapter)."""
    if run_dir is None:
        return [], "", {}
    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    lora_stats = lora_stats_from_metrics(metrics)
    if not any(len(v) >= 2 for v in lora_stats.values()):
        lora_stats = lora_stats_from_adapter(run_dir / "final" / "adapter") or lora_stats
    return metrics, config_text, lora_stats


def _headline_rows(targets: Mapping) -> list[list]:
    rows = []
    for key, t in targets.items():
        val = _fmt(t["value"], pct=key != "retain_rougeL_recall")
        if key == "perplexity_increase" and t["value"] is not None:
            val = f"{100 * t['value']:+.1f} %"
        rows.append([key.replace("_", " "), val, t["target"], "yes" if t["met"] else "NO"])
    return rows


class _Document:
    """The report's content, written once and rendered twice: Markdown and self-contained HTML
    (figures inlined as base64 PNG)."""

    _STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
              "td,th{border:1px solid #bbb;padding:4px 8px;vertical-align:top;text-align:left}"
              "th{background:#eee}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}")

    def __init__(self, title: str, figures: Mapping[str, bytes | None]):
        self.title = title
        self.figures = figures
        self.md: list[str] = [f"# {title}", ""]
        self.hb: list[str] = []

    def section(self, name: str) -> None:
        self.md.extend([f"## {name}", ""])
        self.hb.append(f"<h2>{html.escape(name)}</h2>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> None:
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        self.md.extend("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows)
        self.md.append("")
        self.hb.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                                 for r in rows)
                       + "</table>")

    def para(self, text: str) -> None:
        self.md.extend([text, ""])
        self.hb.append(f"<p>{html.escape(text)}</p>")

    def figure(self, name: str, alt: str, missing: str) -> None:
        png = self.figures.get(name)
        if png is None:
            self.para(missing)
            return
        self.md.extend([f"![{alt}](figures/{name}.png)", ""])
        data = base64.b64encode(png).decode("ascii")
        self.hb.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')

    def code(self, text: str, language: str) -> None:
        self.md.extend([f"```{language}", text.rstrip(), "```", ""])
        self.hb.append(f"<pre>{html.escape(text)}</pre>")

    def markdown(self) -> str:
        return "\n".join(self.md)

    def html(self) -> str:
        title = html.escape(self.title)
        return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
                f"<style>{self._STYLE}</style></head><body><h1>{title}</h1>\n" + "\n".join(self.hb)
                + "\n</body></html>\n")
