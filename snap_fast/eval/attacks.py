"""Does the forgetting hold? Attacks on an unlearned model, run by ``snap-fast eval --attacks``.

* **Quantization** (``quant``): round the weights of every linear layer to ``bits`` bits,
  symmetric round-to-nearest per group of ``group_size`` input weights (one scale per group,
  ``max |w| / (2^(bits-1) - 1)``), the scheme most post-training quantizers start from; then
  evaluate the held-out forget and retain questions again. Quantizing an unlearned model has been
  reported to restore forgotten knowledge (arXiv 2410.16454: 21 % → 83 % at 4 bits), because a
  small unlearning update can be rounded away. The original model quantized the same way is the
  control: its answers show what quantization alone does. ``library`` adds a library quantizer
  that runs on the CPU (:data:`LIBRARY_QUANTIZERS`: torchao's int8 weight-only, per output
  channel), so the result does not rest on our rounding alone.

* **Relearning** (``relearn``): fine-tune a copy (a fresh LoRA adapter, r = 8 on every linear
  layer, AdamW) for k steps on a few training forget questions with the *original* model's
  answers, then evaluate the held-out forget questions (other questions, never trained on) after
  each k in ``relearn_steps``: a recovery curve. A few steps bringing most answers back
  (arXiv 2406.13356, 2409.18025) means the knowledge was hidden, not removed. Run it on the
  original model too, and on a λ = 0 run, as references.

* **Prompt attacks** (``prompts``, :mod:`snap_fast.eval.prompt_attacks`): the held-out forget
  questions asked in RWKU's nine adversarial ways; leak rate per kind.

* **Membership inference** (``mia``, :mod:`snap_fast.eval.mia`): loss, zlib, Min-K % and
  Min-K %++ AUCs of trained against held-out forget questions; privacy leak against the original.

Each attack evaluates a copy: the model passed in is never changed. Python:
:func:`quantize_linear_weights_`, :func:`quantization_attack`, :func:`relearning_attack`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from snap_fast.checks import check_int

__all__ = ["ATTACKS", "LIBRARY_QUANTIZERS", "parse_attacks", "quantization_attack", "quantize_linear_weights_",
           "quantize_with_library_", "relearning_attack"]

#: Attack names ``snap-fast eval --attacks`` accepts (``all``: every one). ``prompts`` and ``mia``
#: live in :mod:`snap_fast.eval.prompt_attacks` and :mod:`snap_fast.eval.mia`.
ATTACKS = ("quant", "relearn", "prompts", "mia")
#: Library quantizers the quantization attack can add (name → what it does); each needs its package.
LIBRARY_QUANTIZERS = {
    "torchao-int8": "torchao Int8WeightOnlyConfig: symmetric int8 weights, one scale per output channel",
}
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


def _refuse_unmerged_lora(model: torch.nn.Module) -> None:
    """Quantization acts on the deployed weights W0 + ΔW: a PEFT adapter must be merged first."""
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("model has unmerged LoRA layers: merge the adapter first (merge_and_unload)")


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
    _refuse_unmerged_lora(model)
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


def check_library_quantizer(name: str) -> None:
    """Raise ValueError for an unknown library quantizer ``name`` and ImportError when its package
    is missing, before any model is copied."""
    if name not in LIBRARY_QUANTIZERS:
        raise ValueError(f"--quant-library: unknown quantizer {name!r}; choose from {sorted(LIBRARY_QUANTIZERS)}")
    try:
        _import_torchao()
    except ImportError as exc:
        raise ImportError(f"--quant-library {name} needs torchao (pip install torchao; it runs on the CPU and "
                          "installs no other package)") from exc


def _import_torchao():
    """torchao's int8 weight-only API (its import-time noise is quieted in ``snap_fast/__init__``)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    return quantize_, Int8WeightOnlyConfig


@torch.no_grad()
def quantize_with_library_(model: torch.nn.Module, name: str) -> int:
    """Quantize every ``nn.Linear`` weight of ``model`` in place with library quantizer ``name``
    (see :data:`LIBRARY_QUANTIZERS`); returns the number of quantized layers.

    Unlike :func:`quantize_linear_weights_`, a head tied to the input embedding is quantized as a
    layer of its own (the library replaces the head's weight; the embedding keeps its values).

    Raises:
        ValueError: an unknown name or unmerged LoRA layers; ImportError: the library is missing.
    """
    check_library_quantizer(name)
    _refuse_unmerged_lora(model)
    quantize_, int8_config = _import_torchao()
    count = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    quantize_(model, int8_config())
    return count


def quantization_attack(
    model,
    tokenizer,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    identity: str,
    bits: Sequence[int] = (8, 4),
    group_size: int = 64,
    library: Sequence[str] = (),
    evaluate_kwargs: dict | None = None,
    log=print,
) -> dict:
    """Evaluate ``model`` quantized to each of ``bits`` (and with each ``library`` quantizer) on
    the held-out forget and retain sets.

    Args:
        model, tokenizer, identity: as for :func:`snap_fast.eval.evaluate.evaluate_model` (a
            merged model; it is copied, never changed).
        data_dir: the data folder.
        out_dir: each setting's evaluation goes to ``out_dir/quant_<bits>bit_g<group_size>``.
        bits, group_size: the round-to-nearest settings (see :func:`quantize_linear_weights_`).
        library: names of :data:`LIBRARY_QUANTIZERS` (each evaluated after the RTN settings, in
            ``out_dir/quant_<name>``).
        evaluate_kwargs: extra keyword arguments of ``evaluate_model`` (batch size, limit, ...).

    Returns ``{"group_size", "settings": {"<bits>bit" or library name: {"obliteration_rate",
    "leak_rate", "retain_rougeL_recall", "quantized_tensors", "scheme"}}}``.
    """
    bits, library = list(bits), list(dict.fromkeys(library))
    for b in bits:  # every setting checked before any evaluation
        quantize_linear_weights_(torch.nn.Linear(group_size, 1), b, group_size)
    for name in library:
        check_library_quantizer(name)
    settings = [(f"{b}bit", f"rtn{b}g{group_size}", f"quant_{b}bit_g{group_size}",
                 f"{b}-bit round-to-nearest, groups of {group_size}",
                 lambda m, b=b: quantize_linear_weights_(m, b, group_size)) for b in bits]
    settings += [(name, name, f"quant_{name}", LIBRARY_QUANTIZERS[name],
                  lambda m, name=name: quantize_with_library_(m, name)) for name in library]
    out: dict = {"group_size": group_size, "settings": {}}
    for key, tag, folder, scheme, quantize in settings:
        log(f"[attack quant] {scheme}")
        out["settings"][key] = {**_evaluate_quantized(model, tokenizer, data_dir, Path(out_dir) / folder,
                                                      f"{identity}+{tag}", quantize, evaluate_kwargs, log),
                                "scheme": scheme}
    return out


def _evaluate_quantized(model, tokenizer, data_dir, out_dir: Path, identity: str, quantize,
                        evaluate_kwargs: dict | None, log) -> dict:
    """Quantize a copy of ``model`` and evaluate the attack sets; the setting's result."""
    from .evaluate import evaluate_model

    attacked = copy.deepcopy(model)
    count = quantize(attacked)
    summary = evaluate_model(attacked, tokenizer, data_dir, out_dir, identity=identity, sets=ATTACK_SETS,
                             perplexity=False, probability=False, log=log,
                             **(evaluate_kwargs or {}))  # answer probabilities are not reported: not computed
    del attacked
    forget, retain = summary["sets"].get("heldout_forget", {}), summary["sets"].get("heldout_retain", {})
    return {"obliteration_rate": forget.get("obliteration_rate"), "leak_rate": forget.get("leak_rate"),
            "retain_rougeL_recall": retain.get("rougeL_recall"), "quantized_tensors": count}


def relearning_attack(
    model,
    tokenizer,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    identity: str,
    steps: Sequence[int] = (0, 10, 25, 50),
    n_examples: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    evaluate_kwargs: dict | None = None,
    log=print,
) -> dict:
    """Fine-tune a copy of ``model`` on ``n_examples`` forget questions with their original answers
    and evaluate the held-out forget questions after each number of steps in ``steps``.

    Args:
        model, tokenizer, identity: as for :func:`snap_fast.eval.evaluate.evaluate_model`.
        data_dir: the data folder: training examples from ``forget.jsonl`` (those with an
            ``original_response``), evaluation on ``heldout_forget.jsonl`` (other questions).
        out_dir: each evaluation goes to ``out_dir/relearn_<k>steps``.
        steps: k values (≥ 0), evaluated in increasing order along one fine-tuning run.
        n_examples: forget examples to relearn from (all in every step's batch).
        lr, seed: AdamW learning rate on a fresh LoRA adapter (r = 8, all linear layers); the
            seed picks the examples and the adapter's initialisation.

    Returns ``{"n_examples", "lr", "steps": {"<k>": {"obliteration_rate", "leak_rate"}}}``.

    Raises:
        ValueError: a negative k, ``n_examples`` < 1, a non-positive ``lr``, or a data folder
            with no forget example carrying an original answer.
    """
    import random

    from peft import LoraConfig, get_peft_model

    from snap_fast.checks import check_number
    from snap_fast.data.collator import ChatCollator
    from snap_fast.io import read_jsonl

    from .evaluate import evaluate_model

    steps = sorted({int(k) for k in steps})
    if any(k < 0 for k in steps) or not steps:
        raise ValueError(f"relearn steps must be >= 0, got {list(steps)}")
    check_int("n_examples", n_examples, minimum=1)
    check_number("lr", lr, positive=True)
    pool = [r for r in read_jsonl(Path(data_dir) / "forget.jsonl") if isinstance(r.get("original_response"), str)]
    if not pool:
        raise ValueError(f"{data_dir}/forget.jsonl has no example with an original_response to relearn from")
    examples = random.Random(seed).sample(pool, min(n_examples, len(pool)))
    batch = ChatCollator(tokenizer, max_length=256)(
        [{"prompt": r["prompt"], "response": r["original_response"], "truncated": bool(r.get("original_truncated"))}
         for r in examples])
    torch.manual_seed(seed)
    attacked = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    device = next(attacked.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in attacked.parameters() if p.requires_grad], lr=lr)
    out: dict = {"n_examples": len(examples), "lr": lr, "steps": {}}
    done = 0
    for k in steps:
        attacked.train()
        while done < k:
            loss = attacked(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
        attacked.eval()
        log(f"[attack relearn] {k} steps on {len(examples)} forget examples")
        summary = evaluate_model(attacked, tokenizer, data_dir, Path(out_dir) / f"relearn_{k}steps",
                                 identity=f"{identity}+relearn{len(examples)}x{k}lr{lr}s{seed}",
                                 sets=("heldout_forget",), perplexity=False, probability=False, log=log,
                                 **(evaluate_kwargs or {}))
        forget = summary["sets"].get("heldout_forget", {})
        out["steps"][str(k)] = {"obliteration_rate": forget.get("obliteration_rate"), "leak_rate": forget.get("leak_rate")}
    return out
