"""Prompt rendering, the training collator (checked token by token) and batched generation."""

from __future__ import annotations

import pytest
import torch

from snap_fast.data.collator import ChatCollator, prompt_token_ids, render_prompt
from snap_fast.generation import generate_answers
from tests.helpers import make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer

EXAMPLES = [
    {"prompt": "Who is Harry Potter?", "response": "I'm not familiar with Harry Potter."},
    {"prompt": "What is the capital of France? Answer briefly, please.", "response": "Paris."},
    {"prompt": "hi", "response": "Hello! How can I help you today with anything at all?"},
]


def test_render_prompt_templates():
    chat = make_tiny_tokenizer(chat_template=True)
    assert render_prompt(chat, "Who?") == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    plain = make_tiny_tokenizer(chat_template=False)
    assert render_prompt(plain, "Who?") == "### Question:\nWho?\n### Answer:\n"
    with pytest.raises(TypeError, match="prompt"):
        render_prompt(plain, None)


@pytest.mark.parametrize("chat_template", [True, False])
def test_collator_token_by_token(chat_template):
    tok = make_tiny_tokenizer(chat_template=chat_template)
    batch = ChatCollator(tok, max_length=512)(EXAMPLES)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == len(EXAMPLES)
    for row, ex in enumerate(EXAMPLES):
        # independent expectation straight from the tokenizer
        text = render_prompt(tok, ex["prompt"])
        p = tok(text, add_special_tokens=not chat_template)["input_ids"]
        r = tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p) + len(r)
        assert ids[row, : len(p)].tolist() == p
        assert ids[row, len(p) : n].tolist() == r
        assert tok.decode(ids[row, len(p) : n - 1]) == ex["response"]
        for t in range(ids.shape[1]):
            if t < len(p):
                assert labels[row, t] == -100 and mask[row, t] == 1
            elif t < n:
                assert labels[row, t] == ids[row, t] and mask[row, t] == 1
            else:  # right padding
                assert labels[row, t] == -100 and mask[row, t] == 0 and ids[row, t] == tok.pad_token_id
    # EOS doubles as pad here: the trained EOS is still labelled, the padding is not
    assert tok.pad_token_id == tok.eos_token_id
    assert (labels == tok.eos_token_id).sum() == len(EXAMPLES)


def test_collator_prompt_matches_generation_tokens():
    tok = make_tiny_tokenizer()
    coll = ChatCollator(tok)
    for ex in EXAMPLES:
        ids, labels = coll.encode(ex["prompt"], ex["response"])
        n_prompt = sum(1 for x in labels if x == -100)
        assert ids[:n_prompt] == prompt_token_ids(tok, ex["prompt"])


def test_collator_truncation_keeps_prompt_end_and_response_start():
    tok = make_tiny_tokenizer()
    long_prompt = "Please read this carefully. " * 30 + "Who is Harry Potter?"
    long_response = "I don't know. " * 30
    full_p = prompt_token_ids(tok, long_prompt)
    full_r = tok(long_response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for max_length in (16, 17, 64):
        ids, labels = ChatCollator(tok, max_length=max_length).encode(long_prompt, long_response)
        assert len(ids) == max_length
        n_prompt = sum(1 for x in labels if x == -100)
        assert n_prompt == max_length // 2  # both sides need more than half: split evenly
        assert ids[:n_prompt] == full_p[-n_prompt:]  # the end of the prompt (assistant marker)
        assert ids[n_prompt:] == full_r[: max_length - n_prompt] == labels[n_prompt:]
    # a short response keeps all its tokens; the prompt yields
    ids, labels = ChatCollator(tok, max_length=40).encode(long_prompt, "Paris.")
    r = tok("Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) == 40 and ids[-len(r):] == r and labels[-len(r):] == r
    assert ids[: 40 - len(r)] == full_p[-(40 - len(r)):]


def test_collator_bad_input():
    tok = make_tiny_tokenizer()
    coll = ChatCollator(tok)
    with pytest.raises(ValueError, match="non-empty"):
        coll([])
    with pytest.raises(ValueError, match=r"examples\[1\]\['response'\]"):
        coll([EXAMPLES[0], {"prompt": "x"}])
    with pytest.raises(TypeError, match=r"examples\[0\]"):
        coll(["just a string"])
    with pytest.raises(ValueError, match="max_length"):
        ChatCollator(tok, max_length=1)
    with pytest.raises(ValueError, match="pad token"):
        ChatCollator(make_tiny_tokenizer(pad_token=False))


def _greedy_reference(model, tokenizer, prompt, max_new_tokens):
    """Unbatched greedy decoding without generate(): full forward each step, argmax, stop at EOS."""
    ids = prompt_token_ids(tokenizer, prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_generate_answers_matches_unbatched_greedy(factory):
    model, tok = factory()
    prompts = [ex["prompt"] for ex in EXAMPLES] + ["Write a haiku about the sea and the wind in the evening."]
    got = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    want = [_greedy_reference(model, tok, p, 6) for p in prompts]
    assert got == want
    if factory is make_tiny_gpt2:  # its random weights emit visible text (the Llama's emit newlines)
        assert all(got)
    assert generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False) == got
    assert generate_answers(model, tok, [], progress=False) == []
    state = torch.get_rng_state()
    generate_answers(model, tok, prompts[:1], max_new_tokens=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched


def test_generate_answers_bad_input():
    model, tok = make_tiny_llama()
    with pytest.raises(TypeError, match="prompts"):
        generate_answers(model, tok, "one string", progress=False)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        generate_answers(model, tok, ["a", 3], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, tok, ["a"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, tok, ["a"], max_new_tokens=0, progress=False)
    tok.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        generate_answers(model, tok, ["a"], progress=False)


def test_truncated_answer_gets_no_eos():
    from tests.helpers import make_tiny_llama

    _, tok = make_tiny_llama()
    collator = ChatCollator(tok)
    full = collator([{"prompt": "Who is Gandalf?", "response": "A wizard"}])
    cut = collator([{"prompt": "Who is Gandalf?", "response": "A wizard", "truncated": True}])
    answer = [int(t) for t in full["labels"][0] if t != -100]
    assert answer[-1] == tok.eos_token_id
    assert [int(t) for t in cut["labels"][0] if t != -100] == answer[:-1]
    assert cut["input_ids"].shape[1] == full["input_ids"].shape[1] - 1
