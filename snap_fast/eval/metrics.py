"""Per-sample metrics: ROUGE-L recall, answer probability, perplexity, fluency.

Every function here is stateless and works on plain lists, so each metric can be tested against
a hand-computed value; :mod:`snap_fast.eval.evaluate` strings them together over a data folder.

Definitions (see ``docs/evaluation.md``):

* **ROUGE-L recall** — ``rouge_score.rouge_scorer.RougeScorer(["rougeL"])``, the ``recall``
  field: LCS(answer, reference) / len(reference) over the library's lower-cased word tokens.
* **Answer probability** — ``exp(-mean NLL)`` of the answer's tokens given the rendered prompt,
  tokenised exactly as the training collator does (answer tokens + EOS).
* **Perplexity** — ``exp(total NLL / total predicted tokens)`` over a corpus of texts: every
  token after the first of each text is predicted (token-weighted, like a corpus LM perplexity).
* **Fluency** — cheap statistics of an answer that flag gibberish, the failure mode of gradient
  ascent (thresholds in :data:`FLUENCY_THRESHOLDS`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from snap_fast.checks import check_int, check_str_list
from snap_fast.data.collator import IGNORE_INDEX, ChatCollator

_SCORERS: dict[bool, rouge_scorer.RougeScorer] = {}


def rouge_l_recall(prediction: str, reference: str, *, use_stemmer: bool = False) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (``rouge-score`` library).

    ``use_stemmer=True`` applies the Porter stemmer (TOFU's setting); the default follows the
    library's default. An empty reference gives 0.0.
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("prediction and reference must be str")
    scorer = _SCORERS.setdefault(use_stemmer, rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer))
    # rouge-score's signature is score(target, prediction): recall is measured against the target
    return float(scorer.score(reference, prediction)["rougeL"].recall)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _token_nll(model, input_ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor):
    """Per-row (sum of NLL over labelled positions, count of labelled positions), float64 sums.

    ``labels`` are aligned with ``input_ids`` (HF convention): position t's label is predicted
    from the logits at t-1.
    """
    device = _model_device(model)
    with torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(device)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    mask = target != IGNORE_INDEX
    return (nll * mask).double().sum(1).cpu(), mask.sum(1).cpu()


def answer_nll(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    truncated: Sequence[bool] | None = None,
    progress: bool = False,
    desc: str = "answer NLL",
) -> list[tuple[float, int]]:
    """Negative log-likelihood of each answer given its prompt.

    Prompt and answer are encoded by :class:`snap_fast.data.collator.ChatCollator` (chat template
    or plain template; answer tokens followed by EOS; prompt tokens masked), so the probability
    measured is of the exact tokens the model is trained on. ``truncated[i]`` (an answer cut at a
    generation cap): no EOS after answer ``i``.

    Returns:
        one ``(sum_nll, n_tokens)`` per pair: the summed NLL (nats, float) over the answer's
        tokens and their count.
    """
    check_str_list("prompts", prompts)
    check_str_list("answers", answers)
    if len(prompts) != len(answers):
        raise ValueError(f"prompts and answers differ in length ({len(prompts)} != {len(answers)})")
    check_int("batch_size", batch_size, minimum=1)
    collator = ChatCollator(tokenizer, max_length=max_length)
    if truncated is not None and len(truncated) != len(answers):
        raise ValueError(f"truncated must have one flag per answer ({len(truncated)} != {len(answers)})")
    flags = truncated if truncated is not None else [False] * len(answers)
    pairs = [{"prompt": p, "response": a, "truncated": bool(t)} for p, a, t in zip(prompts, answers, flags)]
    # sorting by length wastes less compute on padding; results go back to input order
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]["prompt"]) + len(pairs[i]["response"]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    bar = tqdm(total=len(pairs), desc=desc, unit="sample", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collator([pairs[i] for i in idx])
        sums, counts = _token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        for row, i in enumerate(idx):
            out[i] = (float(sums[row]), int(counts[row]))
        bar.update(len(idx))
    bar.close()
    return out


def answer_probability(sum_nll: float, n_tokens: int) -> float:
    """``exp(-sum_nll / n_tokens)``: the per-token geometric-mean probability of an answer."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens!r}")
    return math.exp(-sum_nll / n_tokens)


def answer_probabilities(model, tokenizer, prompts, answers, **kwargs) -> list[float]:
    """``exp(-mean NLL of the answer tokens given the prompt)`` for each pair (see :func:`answer_nll`)."""
    return [answer_probability(s, n) for s, n in answer_nll(model, tokenizer, prompts, answers, **kwargs)]


def text_nll(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """Per text, ``(sum NLL, predicted tokens)`` of the text under the model.

    The text is tokenised with the tokenizer's usual special tokens (e.g. a BOS) and truncated to
    ``max_length`` tokens; every token after the first is predicted from those before it.
    """
    check_str_list("texts", texts)
    check_int("batch_size", batch_size, minimum=1)
    check_int("max_length", max_length, minimum=1)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    encoded = [list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(texts)
    bar = tqdm(total=len(texts), desc="perplexity", unit="text", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), int(tokenizer.pad_token_id), dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # right padding; padded positions carry no label
            n = len(encoded[i])
            ids[row, :n] = torch.tensor(encoded[i])
            labels[row, :n] = ids[row, :n]
            attention[row, :n] = 1
        sums, counts = _token_nll(model, ids, attention, labels)
        for row, i in enumerate(idx):
            out[i] = (float(sums[row]), int(counts[row]))
        bar.update(len(idx))
    bar.close()
    return out


def perplexity(model, tokenizer, texts: Sequence[str], **kwargs) -> float:
    """Corpus perplexity ``exp(Σ NLL / Σ predicted tokens)`` of ``texts`` (see :func:`text_nll`)."""
    per_text = text_nll(model, tokenizer, texts, **kwargs)
    total = sum(n for _, n in per_text)
    if total == 0:
        raise ValueError("texts hold no predictable token (each needs at least 2 tokens)")
    return math.exp(sum(s for s, _ in per_text) / total)


# Gibberish thresholds. Chosen on the failure modes seen in gradient-ascent unlearning: loops of
# one phrase ("the the the ..."), strings of symbols, and runs of non-words. A fluent English
# answer has few repeated trigrams, is mostly letters, and its words are mostly pronounceable.
FLUENCY_THRESHOLDS = {
    "min_words": 4,  # shorter answers are not judged by the word statistics: too few words
    # ...but this many non-space characters with too few letters is flagged whatever the word
    # count ("SBFS!!!!......" is one "word"; NPO's collapsed answers look like that)
    "min_chars": 20,
    "max_repeated_trigram_ratio": 0.5,  # share of word trigrams that repeat an earlier trigram
    "min_alpha_ratio": 0.6,  # letters / non-space characters
    "max_nonword_ratio": 0.35,  # share of words that are not plausible words
    "min_word_entropy_bits": 1.5,  # Shannon entropy of the word distribution (>= 8 words only)
    # share of words that are English function words (>= 8 words, no code fence). Running English
    # prose has 30-50 %; NPO's collapsed answers ("Roma bastaz JE SAB ...") are made of plausible
    # but meaningless words that pass the checks above and have almost none.
    "min_function_word_ratio": 0.1,
}

# Closed-class English words (articles, pronouns, auxiliaries, prepositions, conjunctions), plus
# the stems left by splitting contractions at the apostrophe ("don't" -> "don").
_FUNCTION_WORDS = frozenset("""
a an the and or but if of to in on at by for with from into onto about as than then so not no nor
is are was were be been being am do does did has have had will would can could should may might
must shall i you he she it we they me him her us them my your his its our their this that these
those there here what which who whom whose when where why how all any some each every one more
most other such only own also just very too up out over after before because while during through
between under again once don doesn didn isn aren wasn weren won couldn shouldn wouldn haven
hasn let
""".split())

_WORD_RE = re.compile(r"\S+")
# a plausible word: letters (with inner ' or -), optionally wrapped in punctuation, with a vowel
# (or y), not over 20 letters, not 4+ identical letters in a row; or a number
_PLAUSIBLE_RE = re.compile(r"^[\W_]*(?:(?=[a-z'-]*[aeiouy])[a-z][a-z'-]{0,19}|\d[\d.,:%/-]*)[\W_]*$")


def fluency_stats(text: str) -> dict:
    """Statistics behind the gibberish flag.

    Returns ``{"n_words", "repeated_trigram_ratio", "alpha_ratio", "nonword_ratio",
    "word_entropy_bits", "function_word_ratio", "gibberish"}``; ``gibberish`` is True when any
    threshold of :data:`FLUENCY_THRESHOLDS` is crossed (word statistics need at least
    ``min_words`` words; the letter ratio also applies to any text of ``min_chars`` non-space
    characters). The function-word check assumes English prose: it is skipped for text with a
    Markdown code fence.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    th = FLUENCY_THRESHOLDS
    words = [w.lower() for w in _WORD_RE.findall(text)]
    letters = [w.strip(".,;:!?\"'()[]{}") for w in words]
    chars = re.sub(r"\s", "", text)
    alpha = sum(c.isalpha() for c in chars) / len(chars) if chars else 1.0
    trigrams = [tuple(letters[i : i + 3]) for i in range(len(letters) - 2)]
    repeated = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    nonword = (
        sum(1 for w in words if not _PLAUSIBLE_RE.match(w) or re.search(r"(.)\1\1\1", w)) / len(words)
        if words
        else 0.0
    )
    bare = [w for w in letters if w]
    function = sum(w.split("'")[0] in _FUNCTION_WORDS for w in bare) / len(bare) if bare else 1.0
    counts = Counter(letters)
    entropy = -sum(c / len(letters) * math.log2(c / len(letters)) for c in counts.values()) if letters else 0.0
    gibberish = (len(words) >= th["min_words"] and (
        repeated > th["max_repeated_trigram_ratio"]
        or alpha < th["min_alpha_ratio"]
        or nonword > th["max_nonword_ratio"]
        or (len(words) >= 8 and entropy < th["min_word_entropy_bits"])
        or (len(words) >= 8 and "```" not in text and function < th["min_function_word_ratio"])
    )) or (len(chars) >= th["min_chars"] and alpha < th["min_alpha_ratio"])
    return {
        "n_words": len(words),
        "repeated_trigram_ratio": repeated,
        "alpha_ratio": alpha,
        "nonword_ratio": nonword,
        "word_entropy_bits": entropy,
        "function_word_ratio": function,
        "gibberish": bool(gibberish),
    }


def is_gibberish(text: str) -> bool:
    """True when :func:`fluency_stats` flags ``text`` as gibberish."""
    return fluency_stats(text)["gibberish"]
