"""Batched greedy generation of answers: original answers for hard positives, eval answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .checks import check_int, check_str_list
from .data.collator import prompt_token_ids


def _eos_ids(model, tokenizer) -> list[int]:
    # Instruct models often end a turn with a token other than the tokenizer's EOS (listed in
    # generation_config); stopping on any of them avoids rambling into a next turn.
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


#: Prompts per generation call: greedy answers do not depend on it (tests/test_data_collator.py),
#: and larger calls run faster on a CPU (64 against 8: about 1.9x on 2 cores with SmolLM2-135M).
DEFAULT_GEN_BATCH_SIZE = 64


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = DEFAULT_GEN_BATCH_SIZE,
    seed: int = 0,
    progress: bool = True,
    on_batch: Callable[[list[int], list[str], list[bool]], None] | None = None,
    return_finished: bool = False,
) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy answers of ``model`` to ``prompts``, in the order given.

    Each prompt is rendered with :func:`snap_fast.data.collator.render_prompt` (chat template or
    plain template) and tokenised exactly as the training collator does; prompts are sorted by
    length and left-padded in batches of ``batch_size`` (less padding, same answers), decoded
    without the prompt and without special tokens, and stripped of surrounding whitespace.

    Args:
        model: a causal LM (``transformers`` ``generate`` API).
        tokenizer: its tokenizer; needs a pad token (``load_model`` sets one).
        prompts: list of user prompts (str).
        max_new_tokens: generation length cap, >= 1.
        batch_size: prompts per ``generate`` call, >= 1.
        seed: seeds torch inside a forked RNG for each batch (the caller's RNG state is left
            untouched); greedy decoding is deterministic anyway, the seed only guards against
            models with stochastic layers.
        progress: show a tqdm bar over prompts.
        on_batch: called after each batch with the batch's prompt indices (into ``prompts``),
            their answers and their ``finished`` flags, e.g. to save progress of a long run.
        return_finished: also return, per prompt, whether the model ended its answer (an EOS
            token) rather than being cut at ``max_new_tokens``.

    Returns:
        ``list[str]`` with one answer per prompt, or ``(answers, finished)`` with
        ``return_finished``. A cut answer must not be trained on with an EOS after it: the model
        would learn to stop there (see :class:`snap_fast.data.collator.ChatCollator`).
    """
    check_str_list("prompts", prompts)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    if not prompts:
        return ([], []) if return_finished else []

    encoded = [prompt_token_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    finished: list[bool] = [False] * len(prompts)
    pad = int(tokenizer.pad_token_id)
    eos = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            input_ids, attention = _left_padded([encoded[i] for i in idx], pad)
            # fork_rng: seeding here must not disturb the caller's RNG stream (a training loop
            # that evaluates mid-run must resume identically).
            fork_devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
                torch.manual_seed(seed)
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                    eos_token_id=eos or None,
                )
            new_tokens = out[:, input_ids.shape[1]:].cpu()
            ended = torch.isin(new_tokens, torch.tensor(eos, dtype=new_tokens.dtype)).any(dim=1) if eos else None
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
                finished[i] = bool(ended[row]) if ended is not None else False
            if on_batch is not None:
                on_batch(list(idx), [answers[i] for i in idx], [finished[i] for i in idx])
            bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return (answers, finished) if return_finished else answers


def _left_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` (B, width) long, every sequence ending at the last column."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    return input_ids, attention
