"""The original model's outputs: computed once before training changes a weight, or per batch.

NPO compares with the original model's sequence log-probabilities of the forget answers
(:func:`original_forget_logprobs`); ``retain_loss="kl"`` with its next-token distributions at the
retain and general answers (:func:`original_answer_logprobs`, cached when they fit, else
:func:`original_logits` per batch). :func:`answer_window` is how many trailing positions the
losses read, so the LM head can skip the prompt.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from .batches import UnlearnData, training_pair
from .losses import IGNORE_INDEX, answer_logprobs, sequence_logprob
from .runtime import Runtime

__all__ = [
    "accepts_logits_to_keep",
    "answer_window",
    "original_answer_logprobs",
    "original_forget_logprobs",
    "original_logits",
]


@torch.no_grad()
def original_forget_logprobs(model, collator, data: UnlearnData, runtime: Runtime, batch_size: int) -> torch.Tensor:
    """log π_ref(y|x) of every forget example under the original model, (N,) float32 on CPU:
    NPO's reference, π_ref being the model before unlearning.

    Computed once, before training changes any weight (see :func:`original_logits`).
    """
    out = torch.empty(len(data.forget))
    for start in range(0, len(data.forget), batch_size):
        rows = data.forget[start:start + batch_size]
        batch = runtime.to_device(collator([training_pair(r, data.forget_key) for r in rows]))
        with runtime.autocast():
            logits = original_logits(model, None, batch)
        out[start:start + len(rows)] = sequence_logprob(logits, batch["labels"]).cpu()
    return out


def accepts_logits_to_keep(model) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes ``logits_to_keep`` (transformers ≥ 4.50)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_window(labels: torch.Tensor) -> int:
    """How many trailing positions of a batch the losses read: from the one that predicts the
    batch's earliest answer token to the end (HF's ``logits_to_keep``).

    Every loss here reads logits only where they predict an answer token, so the LM head (a
    V × d matmul per position, V = 49 152 for SmolLM2) and the softmax can skip the prompt. With
    ``labels[:, -keep:]`` beside logits of the last ``keep`` positions, the losses' causal shift
    pairs the same logits and labels as on the whole sequence.
    """
    answer = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)
    if not bool(answer.any()):
        return labels.shape[1]
    return labels.shape[1] - int(answer.nonzero()[0])


@torch.no_grad()
def original_logits(model, frozen: torch.nn.Module | None, batch: dict[str, torch.Tensor],
                    keep: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) of the original model on ``batch``, in eval mode (no dropout):
    ``frozen`` when given (a copy kept for full fine-tuning), else ``model`` with its LoRA
    adapter disabled (the original model whatever the adapter holds) or, without an adapter,
    ``model`` itself (only the original before training changes a weight). ``keep``: only the
    last ``keep`` positions (B, keep, V), see :func:`answer_window`."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if keep is not None:
        inputs["logits_to_keep"] = keep
    if frozen is not None:
        return frozen(**inputs).logits
    was_training = model.training
    model.eval()
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with adapter_off:
            return model(**inputs).logits
    finally:
        model.train(was_training)


def _answer_positions(collator, record: dict) -> int:
    """Answer positions of one retain/general example as the collator labels it (after the shift)."""
    _, labels = collator.encode(record["prompt"], record["response"], truncated=record.get("truncated", False))
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


@torch.no_grad()
def original_answer_logprobs(model, collator, data: UnlearnData,
                              runtime: Runtime, batch_size: int, limit_gib: float,
                              progress: bool = True) -> dict[str, list[torch.Tensor]] | None:
    """The original model's next-token log-probabilities at every answer position of the retain
    and general sets, computed once, before training changes ``model``: ``{"retain": [...],
    "general": [...]}``, one (n_i, V) float32 CPU tensor per example (n_i its answer tokens, in
    :func:`answer_logprobs` order), or None when they would take more than ``limit_gib``
    GiB (then every step runs the original model on its batch instead).

    Why: ``retain_loss="kl"`` otherwise spends one extra forward per retain/general batch on
    the original model, about a quarter of a LoRA step; the answers are fixed, so are these.
    With right padding an example's rows do not depend on its batch, so per-example rows
    concatenated in batch order equal what the per-step forward gives.
    """
    sets = {name: [training_pair(r, "response") for r in getattr(data, name)] for name in ("retain", "general")}
    positions = sum(_answer_positions(collator, r) for rows in sets.values() for r in rows)
    if positions * _vocab_size(model) * 4 > limit_gib * 2**30:
        return None
    from tqdm.auto import tqdm

    total = sum(len(rows) for rows in sets.values())
    trim = accepts_logits_to_keep(model)  # LM head on the answer window only, as in the steps
    out: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=total, desc="original model (KL reference)", unit="example",
              disable=not progress or not runtime.is_main_process, dynamic_ncols=True) as bar:
        for name, rows in sets.items():
            out[name] = []
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = runtime.to_device(collator(chunk))
                labels = batch["labels"]
                keep = answer_window(labels) if trim else None
                with runtime.autocast():
                    logits = original_logits(model, None, batch, keep)
                if keep is not None:
                    labels = labels[:, -keep:]
                # One log-softmax for the chunk, split per example (rows are in row-major order).
                counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
                out[name] += list(answer_logprobs(logits, labels).cpu().split(counts))
                bar.update(len(chunk))
    return out
