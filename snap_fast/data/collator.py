"""Prompt formatting and the training collator.

Training (the collator) and generation (``snap_fast.generation``) both tokenise prompts through
:func:`prompt_token_ids`, so the tokens a model is trained to answer after are exactly the tokens
it is later asked to continue: a prompt means the same thing in both places.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

PLAIN_TEMPLATE = "### Question:\n{prompt}\n### Answer:\n"
IGNORE_INDEX = -100


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a chat template (``tokenizer.chat_template`` is set)."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str) -> str:
    """The text a model sees before its answer to ``prompt``.

    With a chat template: the template applied to one user message with
    ``add_generation_prompt=True`` (so the text ends where the assistant's answer begins).
    Without one: ``"### Question:\\n{prompt}\\n### Answer:\\n"``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_TEMPLATE.format(prompt=prompt)


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``render_prompt(tokenizer, prompt)``.

    A chat template writes its own special tokens (BOS, role markers) into the text, so no
    special tokens are added on top; the plain template gets the tokenizer's usual ones (e.g. a
    Llama BOS), as a base model expects.
    """
    text = render_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"])


def response_token_ids(tokenizer, response: str, *, eos: bool = True) -> list[int]:
    """Token ids of an answer: the text without special tokens, then EOS so the model learns
    to stop (the EOS is a trained label even when it doubles as the pad token). ``eos=False``
    for an answer that was cut at a length cap: the model did not stop there."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if eos and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _truncate(prompt_ids: list[int], response_ids: list[int], max_length: int):
    """Fit prompt + response into ``max_length`` tokens.

    The end of the prompt (the question itself and the assistant marker, right before the
    answer) and the start of the response matter most, so the prompt loses tokens from its left
    and the response from its right. Each side keeps at least half the budget when it needs it.
    """
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    half = max_length // 2
    keep_prompt = min(len(prompt_ids), max(half, max_length - len(response_ids)))
    keep_response = max_length - keep_prompt
    return prompt_ids[len(prompt_ids) - keep_prompt :], response_ids[:keep_response]


class ChatCollator:
    """Turns ``[{"prompt": str, "response": str}, ...]`` into a right-padded training batch.

    Returns a dict of ``torch.long`` tensors of shape ``(batch, T)``, ``T`` the longest example:

    * ``input_ids``: prompt tokens (``prompt_token_ids``) followed by response tokens + EOS,
      then padding with ``tokenizer.pad_token_id``;
    * ``attention_mask``: 1 on real tokens, 0 on padding;
    * ``labels``: the response tokens (EOS included); ``-100`` on prompt tokens and padding.

    An example with ``"truncated": True`` (an original answer cut at the generation cap) gets
    no EOS: its answer continues, and the model must not learn to stop there.

    Examples longer than ``max_length`` are truncated (prompt from the left, response from the
    right, see :func:`_truncate`).
    """

    def __init__(self, tokenizer, max_length: int = 512):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "tokenizer has no pad token; load it with snap_fast.models.load_model or set "
                "tokenizer.pad_token = tokenizer.eos_token"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length

    def encode(self, prompt: str, response: str, *, truncated: bool = False) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one example, unpadded; ``truncated``: no EOS after the response."""
        p, r = _truncate(
            prompt_token_ids(self.tokenizer, prompt),
            response_token_ids(self.tokenizer, response, eos=not truncated),
            self.max_length,
        )
        return p + r, [IGNORE_INDEX] * len(p) + r

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
        if not isinstance(examples, Sequence) or len(examples) == 0:
            raise ValueError("examples must be a non-empty list of {'prompt', 'response'} dicts")
        encoded = []
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping):
                raise TypeError(f"examples[{i}] must be a dict, got {type(ex).__name__}")
            for key in ("prompt", "response"):
                if not isinstance(ex.get(key), str):
                    raise ValueError(f"examples[{i}][{key!r}] must be a str, got {ex.get(key)!r}")
            encoded.append(self.encode(ex["prompt"], ex["response"], truncated=bool(ex.get("truncated", False))))
        width = max(len(ids) for ids, _ in encoded)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
            attention[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
