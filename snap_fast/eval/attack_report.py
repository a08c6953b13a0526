"""The report's "Does the forgetting hold?" section: one table per attack (``snap-fast eval
--attacks``) for whichever models ran it, and one figure with a panel per attack."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .mia import MIA_SCORES, privacy_leak
from .prompt_attacks import PROMPT_ATTACK_KINDS

_MODELS = (("original", "#8c8c8c"), ("unlearned", "#d6604d"))


def _attack(summary: Mapping, name: str) -> Mapping | None:
    return summary.get("attacks", {}).get(name) or None


def quant_rows(models: Mapping[str, Mapping], fmt) -> list[list]:
    """Each model unquantized, then per setting."""
    rows = []
    for label, summary in models.items():
        attack = _attack(summary, "quant")
        if not attack:
            continue
        forget = summary.get("sets", {}).get("heldout_forget", {})
        rows.append([label, "as trained", fmt(forget.get("obliteration_rate"), pct=True),
                     fmt(forget.get("leak_rate"), pct=True),
                     fmt(summary.get("sets", {}).get("heldout_retain", {}).get("rougeL_recall"))])
        for setting, r in attack["settings"].items():
            weights = f"{setting}, groups of {attack['group_size']}" if setting.endswith("bit") else setting
            rows.append([label, weights, fmt(r["obliteration_rate"], pct=True),
                         fmt(r["leak_rate"], pct=True), fmt(r["retain_rougeL_recall"])])
    return rows


def prompt_rows(models: Mapping[str, Mapping], fmt) -> list[list]:
    """One row per kind: leak rate (and obliteration) of each model."""
    attacks = {label: _attack(s, "prompts") for label, s in models.items() if _attack(s, "prompts")}
    rows = []
    for kind in PROMPT_ATTACK_KINDS:
        cells = [attacks[label]["kinds"].get(kind) for label in attacks]
        if not any(cells):
            continue
        n = next(c["n"] for c in cells if c)
        rows.append([kind, n, *(f"{fmt(c['leak_rate'], pct=True)} / {fmt(c['obliteration_rate'], pct=True)}"
                                if c else "–" for c in cells)])
    return rows


def mia_rows(models: Mapping[str, Mapping], fmt) -> list[list]:
    """One row per score: each model's AUC, and the unlearned model's privacy leak vs the original."""
    orig, unl = _attack(models.get("original", {}), "mia"), _attack(models.get("unlearned", {}), "mia")
    if not orig and not unl:
        return []
    rows = []
    for score in MIA_SCORES:
        a, b = (orig or {}).get("auc", {}).get(score), (unl or {}).get("auc", {}).get(score)
        leak = privacy_leak(b, a) if a is not None and b is not None else None
        rows.append([score, fmt(a), fmt(b), fmt(leak, pct=True)])
    return rows


def attack_section(doc, models: Mapping[str, Mapping], fmt) -> None:
    """Write the attacks' paragraphs, tables and figure into ``doc`` (nothing if none ran)."""
    if not any(summary.get("attacks") for summary in models.values()):
        return
    doc.section("Does the forgetting hold? (attacks)")
    doc.figure("attacks", "attacks", "")
    rows = quant_rows(models, fmt)
    if rows:
        doc.para("Quantization (--attacks quant): each model's linear weights rounded to the given bits "
                 "(symmetric, per group; torchao-int8: the torchao library's int8 weight-only quantizer, "
                 "one scale per output channel), held-out sets evaluated again; the original quantized the "
                 "same way is the control.")
        doc.table(["model", "weights", "obliteration (held-out forget)", "leak rate", "retain ROUGE-L"], rows)
    rows = [[label, k, fmt(r["obliteration_rate"], pct=True), fmt(r["leak_rate"], pct=True)]
            for label, summary in models.items()
            for k, r in (_attack(summary, "relearn") or {}).get("steps", {}).items()]
    if rows:
        doc.para("Relearning (--attacks relearn): a fresh LoRA adapter fine-tuned for k steps on a few forget "
                 "questions with the original answers; the held-out forget questions are other questions.")
        doc.table(["model", "relearning steps", "obliteration (held-out forget)", "leak rate"], rows)
    rows = prompt_rows(models, fmt)
    if rows:
        labels = [label for label, s in models.items() if _attack(s, "prompts")]
        doc.para("Prompt attacks (--attacks prompts): the held-out forget questions asked in nine adversarial "
                 "ways (snap_fast.eval.prompt_attacks); leak rate / obliteration per kind (obliteration is "
                 "not judged for cross-lingual replies).")
        doc.table(["kind", "prompts", *(f"{label}: leak / obliteration" for label in labels)], rows)
    rows = mia_rows(models, fmt)
    if rows:
        doc.para("Membership inference (--attacks mia): can the trained forget questions be told from the "
                 "held-out ones by the likelihood of their original answers? AUC 0.5: not at all. Privacy "
                 "leak: (AUC unlearned − AUC original) / AUC original; far from 0, an observer can tell "
                 "what was unlearned.")
        doc.table(["score", "AUC original", "AUC unlearned", "privacy leak"], rows)


def figure_attacks(models: Mapping[str, Mapping]) -> bytes | None:
    """One panel per attack that ran: obliteration by quantization setting, obliteration along
    relearning steps, leak rate per prompt kind, AUC per membership score. PNG bytes or None."""
    from .report import _png

    panels = [name for name in ("quant", "relearn", "prompts", "mia")
              if any(_attack(s, name) for s in models.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        _PANELS[name](ax, models)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _bars(ax, models, labels, values_of, title, ylabel):
    width = 0.8 / len(models)
    for i, (label, color) in enumerate(c for c in _MODELS if c[0] in models):
        values = values_of(models[label])
        if values is None:
            continue
        ax.bar([j + (i - (len(models) - 1) / 2) * width for j in range(len(labels))],
               [v if v is not None else 0 for v in values], width, label=label, color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)


def _panel_quant(ax, models):
    settings = next(list(a["settings"]) for s in models.values() if (a := _attack(s, "quant")))

    def values(summary):
        a = _attack(summary, "quant")
        if not a:
            return None
        plain = summary.get("sets", {}).get("heldout_forget", {}).get("obliteration_rate")
        return [plain, *(a["settings"].get(k, {}).get("obliteration_rate") for k in settings)]

    _bars(ax, models, ["as trained", *settings], values, "quantization", "obliteration (held-out forget)")
    ax.set_ylim(0, 1.05)


def _panel_relearn(ax, models):
    for label, color in _MODELS:
        a = _attack(models.get(label, {}), "relearn")
        if a:
            steps = sorted(a["steps"], key=int)
            ax.plot([int(k) for k in steps], [a["steps"][k]["obliteration_rate"] for k in steps], "o-",
                    color=color, label=label)
    ax.set_title("relearning", fontsize=9)
    ax.set_xlabel("fine-tuning steps on forget answers", fontsize=8)
    ax.set_ylabel("obliteration (held-out forget)", fontsize=8)
    ax.set_ylim(0, 1.05)


def _panel_prompts(ax, models):
    kinds = [k for k in PROMPT_ATTACK_KINDS
             if any(k in (_attack(s, "prompts") or {}).get("kinds", {}) for s in models.values())]

    def values(summary):
        a = _attack(summary, "prompts")
        return [a["kinds"].get(k, {}).get("leak_rate") for k in kinds] if a else None

    _bars(ax, models, kinds, values, "prompt attacks", "leak rate")
    ax.set_ylim(0, 1.05)


def _panel_mia(ax, models):
    def values(summary):
        a = _attack(summary, "mia")
        return [a["auc"].get(k) for k in MIA_SCORES] if a else None

    _bars(ax, models, list(MIA_SCORES), values, "membership inference", "AUC (0.5: indistinguishable)")
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_ylim(0, 1.05)


_PANELS = {"quant": _panel_quant, "relearn": _panel_relearn, "prompts": _panel_prompts, "mia": _panel_mia}
