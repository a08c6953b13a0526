"""Does the forgetting hold? Attacks on an unlearned model, run by ``snap-fast eval --attacks``.

* **Quantization** (``quant``): round the weights of every linear layer to ``bits`` bits,
  symmetric round-to-nearest per group of ``group_size`` input weights (one scale per group,
  ``max |w| / (2^(bits-1) - 1)``), the scheme most post-training quantizers start from; then
  evaluate the held-out forget and retain questions again. Quantizing an unlearned model has been
  reported to restore forgotten knowledge (arXiv 2410.16454: 21 % → 83 % at 4 bits), because a
  small unlearning update can be rounded away. The original model quantized the same way is the
  control: its answers show what quantization alone does.

Each attack evaluates a copy: the model passed in is never changed. Python:
:func:`quantize_linear_weights_`, :func:`quantization_attack`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from snap_fast.checks import check_int

__all__ = ["ATTACKS", "parse_attacks", "quantization_attack", "quantize_linear_weights_"]

#: Attack names ``snap-fast eval --attacks`` accepts (``all``: every one).
ATTACKS = ("quant",)
#: Sets an attack re-evaluates: the held-out forget questions, and the hard positives as a control.
ATTACK_SETS = ("heldout_forget", "heldout_retain")


def parse_attacks(spec: str | None) -> list[str]:
    """``"quant"``, ``"all"`` or a comma-separated list → attack names; ValueError naming ``--attacks``."""
    if spec is None or not spec.strip():
        return []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        return list(ATTACKS)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ValueError(f"--attacks: unknown attack(s) {unknown}; choose from {list(ATTACKS)} or 'all'")
    return list(dict.fromkeys(names))


@torch.no_grad()
def quantize_linear_weights_(model: torch.nn.Module, bits: int, group_size: int) -> int:
    """Round every ``nn.Linear`` weight of ``model`` in place to ``bits``-bit symmetric RTN per group.

    Args:
        model: a plain model (a PEFT adapter must be merged first: quantization acts on the
            deployed weights W0 + ΔW).
        bits: 2 … 8.
        group_size: input weights per scale; must divide every linear layer's input size.

    Returns the number of quantized weight tensors.

    Raises:
        ValueError: bad ``bits`` / ``group_size``, a group size that does not divide a layer's
            input size (checked for every layer before any weight changes), or unmerged LoRA layers.
    """
    check_int("bits", bits, minimum=2)
    if bits > 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    check_int("group_size", group_size, minimum=1)
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("model has unmerged LoRA layers: merge the adapter first (merge_and_unload)")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    bad = [f"{name} ({m.in_features})" for name, m in linears if m.in_features % group_size]
    if bad:
        raise ValueError(f"group_size {group_size} does not divide the input size of {bad[:3]}")
    levels = 2 ** (bits - 1) - 1
    done: set[int] = set()
    for _, module in linears:
        weight = module.weight
        if id(weight) in done:  # a tied head and embedding: quantize once
            continue
        done.add(id(weight))
        groups = weight.detach().float().reshape(weight.shape[0], -1, group_size)
        scale = groups.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / levels
        weight.copy_((torch.round(groups / scale).clamp_(-levels, levels) * scale).reshape(weight.shape))
    return len(done)


def quantization_attack(
    model,
    tokenizer,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    identity: str,
    bits: Sequence[int] = (8, 4),
    group_size: int = 64,
    evaluate_kwargs: dict | None = None,
    log=print,
) -> dict:
    """Evaluate ``model`` quantized to each of ``bits`` on the held-out forget and retain sets.

    Args:
        model, tokenizer, identity: as for :func:`snap_fast.eval.evaluate.evaluate_model` (a
            merged model; it is copied, never changed).
        data_dir: the data folder.
        out_dir: each setting's evaluation goes to ``out_dir/quant_<bits>bit_g<group_size>``.
        bits, group_size: the settings (see :func:`quantize_linear_weights_`).
        evaluate_kwargs: extra keyword arguments of ``evaluate_model`` (batch size, limit, ...).

    Returns ``{"group_size", "settings": {"<bits>bit": {"obliteration_rate", "leak_rate",
    "retain_rougeL_recall", "quantized_tensors"}}}``.
    """
    from .evaluate import evaluate_model

    bits = list(bits)
    for b in bits:  # every setting checked before any evaluation
        quantize_linear_weights_(torch.nn.Linear(group_size, 1), b, group_size)
    out: dict = {"group_size": group_size, "settings": {}}
    for b in bits:
        log(f"[attack quant] {b}-bit, groups of {group_size}")
        attacked = copy.deepcopy(model)
        count = quantize_linear_weights_(attacked, b, group_size)
        summary = evaluate_model(
            attacked, tokenizer, data_dir, Path(out_dir) / f"quant_{b}bit_g{group_size}",
            identity=f"{identity}+rtn{b}g{group_size}", sets=ATTACK_SETS, perplexity=False, log=log,
            **(evaluate_kwargs or {}))
        del attacked
        forget, retain = summary["sets"].get("heldout_forget", {}), summary["sets"].get("heldout_retain", {})
        out["settings"][f"{b}bit"] = {
            "obliteration_rate": forget.get("obliteration_rate"), "leak_rate": forget.get("leak_rate"),
            "retain_rougeL_recall": retain.get("rougeL_recall"), "quantized_tensors": count,
        }
    return out
