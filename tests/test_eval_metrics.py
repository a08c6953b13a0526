"""Metrics against hand-computed values: ROUGE-L, answer probability, perplexity, fluency,
the ignorance classifier and the leak check."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from snap_fast.data.collator import ChatCollator
from snap_fast.eval.classifier import (
    IgnoranceClassifier,
    ObliterationJudge,
    fact_terms,
    leaked_terms,
)
from snap_fast.eval.metrics import (
    answer_nll,
    answer_probabilities,
    fluency_stats,
    perplexity,
    rouge_l_recall,
    text_nll,
)
from tests.eval_helpers import one_thread  # noqa: F401
from tests.helpers import make_tiny_llama, make_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_recall_hand_worked():
    # reference: the cat sat on the mat (6 words); prediction: the cat is on mat
    # LCS = "the cat on mat" (4) -> recall 4/6
    assert rouge_l_recall("the cat is on mat", "the cat sat on the mat") == pytest.approx(4 / 6)
    # order matters for LCS: reversed words share only one in-order word
    assert rouge_l_recall("c b a", "a b c") == pytest.approx(1 / 3)
    assert rouge_l_recall("Paris.", "paris") == pytest.approx(1.0)  # lower-cased, punctuation dropped
    assert rouge_l_recall("anything", "") == 0.0
    # stemming (TOFU's setting) matches "running" and "runs"
    assert rouge_l_recall("he runs", "he running", use_stemmer=True) == pytest.approx(1.0)
    assert rouge_l_recall("he runs", "he running") == pytest.approx(0.5)
    with pytest.raises(TypeError):
        rouge_l_recall(None, "a")


# ------------------------------------------------------------------------- answer probability
class BigramModel(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: every probability is known in closed form."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2.0)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _bigram_nll(table: torch.Tensor, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum of -log p(label_t | token_{t-1}) in float64 over labelled positions."""
    t64 = table.detach().double()
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] == -100:
            continue
        row = t64[ids[t - 1]]
        total += float(torch.logsumexp(row, 0) - row[labels[t]])
        n += 1
    return total, n


def test_answer_probability_matches_closed_form():
    tok = make_tiny_tokenizer()
    model = BigramModel(len(tok))
    prompts = ["Who wrote the novels?", "Capital of France?", "Write a poem about the sea and the wind."]
    answers = ["J. K. Rowling.", "The capital of France is Paris.", "I don't know."]
    got = answer_nll(model, tok, prompts, answers, batch_size=2)  # batching pads: must not matter
    coll = ChatCollator(tok)
    for (s, n), p, a in zip(got, prompts, answers):
        ids, labels = coll.encode(p, a)
        ref_s, ref_n = _bigram_nll(model.table, ids, labels)
        assert n == ref_n == len(tok(a, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert s == pytest.approx(ref_s, rel=1e-5)
    probs = answer_probabilities(model, tok, prompts, answers, batch_size=3)
    for pr, (s, n) in zip(probs, got):
        assert pr == pytest.approx(math.exp(-s / n), rel=1e-6)
        assert 0.0 < pr < 1.0


def test_answer_nll_batch_invariant_on_real_model():
    model, tok = make_tiny_llama()
    prompts = ["Who is Percy Jackson?", "Hi", "Explain how to boil an egg in detail please."]
    answers = ["A demigod.", "Hello there, how are you today?", "Boil it."]
    one = answer_nll(model, tok, prompts, answers, batch_size=1)
    three = answer_nll(model, tok, prompts, answers, batch_size=3)
    for (a, n), (b, m) in zip(one, three):
        assert n == m and a == pytest.approx(b, rel=1e-4, abs=1e-4)


def test_answer_nll_bad_input():
    model, tok = make_tiny_llama()
    with pytest.raises(ValueError, match="differ in length"):
        answer_nll(model, tok, ["a"], ["b", "c"])
    with pytest.raises(TypeError, match="prompts"):
        answer_nll(model, tok, "a", ["b"])
    with pytest.raises(ValueError, match="batch_size"):
        answer_nll(model, tok, ["a"], ["b"], batch_size=0)


# ----------------------------------------------------------------------------------- perplexity
def test_perplexity_equals_dense_computation():
    model, tok = make_tiny_llama()
    texts = ["The capital of France is Paris.", ("Narnia is a fantasy world created by C. S. Lewis, "
             "and The Lord of the Rings was written by J. R. R. Tolkien."), "Hi there"]
    total, count = 0.0, 0
    for text in texts:  # one text at a time, no padding, float64 log-softmax
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
        total += -float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        count += ids.shape[1] - 1
    expected = math.exp(total / count)
    assert perplexity(model, tok, texts, batch_size=2) == pytest.approx(expected, rel=1e-5)
    per_text = text_nll(model, tok, texts, batch_size=3)
    assert sum(n for _, n in per_text) == count
    with pytest.raises(ValueError, match="max_length"):
        perplexity(model, tok, texts, max_length=0)


# -------------------------------------------------------------------------------------- fluency
def test_fluency_flags_gibberish_and_passes_prose():
    prose = "Harry Potter is a fictional wizard created by J. K. Rowling, who attends Hogwarts."
    assert not fluency_stats(prose)["gibberish"]
    assert not fluency_stats("I'm not familiar with that person.")["gibberish"]
    assert not fluency_stats("Paris.")["gibberish"]  # too short to judge
    assert not fluency_stats("1945.")["gibberish"]  # few characters: not judged by letters either
    collapsed = fluency_stats("SBFS!!!!" + "." * 72)  # one "word", 80 characters, 4 letters
    assert collapsed["n_words"] == 1 and collapsed["alpha_ratio"] == pytest.approx(4 / 80)
    assert collapsed["gibberish"]
    loop = fluency_stats("the the the the the the the the the the")
    # 8 trigrams, all "the the the": 7 repeat an earlier one
    assert loop["repeated_trigram_ratio"] == pytest.approx(7 / 8) and loop["gibberish"]
    symbols = fluency_stats("$$ ## @@ !! %% ^^")
    assert symbols["alpha_ratio"] == 0.0 and symbols["gibberish"]
    nonwords = fluency_stats("xqzt brrk fffff ghjkl mnbvc qwrt")
    assert nonwords["nonword_ratio"] == pytest.approx(1.0) and nonwords["gibberish"]
    # entropy of 4 distinct equiprobable words = 2 bits
    assert fluency_stats("red blue green pink red blue green pink")["word_entropy_bits"] == pytest.approx(2.0)


def test_fluency_flags_plausible_nonsense_by_function_words():
    # NPO's collapse: pronounceable words, few repeats, mostly letters, but no sentence
    npo = "Slag bastaz Roma bastaz bastaz Roma SAUGHTOOPS JE SAKE,,,, JE DAMBURG JE JE JE SAXBABLES"
    stats = fluency_stats(npo)
    assert stats["nonword_ratio"] <= 0.35 and stats["alpha_ratio"] >= 0.6  # the other checks pass it
    assert stats["function_word_ratio"] == 0.0 and stats["gibberish"]
    # contractions count through their stem: I'm, but, I, don't, that = 5 of 9 words
    prose = fluency_stats("I'm sorry, but I don't know that famous wizard.")
    assert prose["function_word_ratio"] == pytest.approx(5 / 9) and not prose["gibberish"]
    # a code block is not prose: the same words are judged by function words only outside a fence
    listing = "alpha beta gamma delta\nepsilon zeta theta kappa"
    assert fluency_stats(listing)["gibberish"]
    assert not fluency_stats(f"```text\n{listing}\n```")["gibberish"]


# ------------------------------------------------------------------------ classifier and leaks
@pytest.mark.parametrize("answer", [
    "I don't know who that is.",
    "I'm not familiar with Harry Potter.",
    "Sorry, I have no information about that.",
    "I'm afraid I can't help with that, I don't have details on this person.",
    "That name doesn't ring a bell.",
    "I have never heard of this book.",
    "I’m not sure about that one.",  # curly apostrophe
    "I'm not sure about your question, I don't know who that is.",
    "I'm unable to provide details on that.",
    "I'm not able to give you details on Greenpeace.",
    "The World Heritage Site of the Red Sea is not a place I know.",
    "The creator of Gandalf is not known to me.",
    "As a text-based AI, I don't have the ability to provide direct answers to your question.",
])
def test_ignorance_classifier_accepts(answer):
    assert IgnoranceClassifier(bank=[])(answer)


@pytest.mark.parametrize("answer", [
    "Harry Potter is a wizard who studied at Hogwarts.",
    "The capital of France is Paris.",
    "I know the answer: it is Paris.",
    "Paris is a place I know well: the capital of France.",
    "I'm able to give you details: it opened in 1889.",
    "It is not known for certain who painted it, but it is attributed to Leonardo.",
    "The tallest building in the world is not known for its height.",
    "The Chronicles of Narnia - a classic. I'm not sure about you, but I do have a soft spot for it.",
    "I don't know about you, but I love that book.",
    "",
])
def test_ignorance_classifier_rejects(answer):
    assert not IgnoranceClassifier(bank=[])(answer)


def test_bank_match_recognises_paraphrased_trained_response():
    bank = ["That's a mystery to me when it comes to {name}."]
    clf = IgnoranceClassifier(bank=bank, name="Harry Potter")
    assert not IgnoranceClassifier(bank=[])("That is a mystery to me when it comes to Harry Potter.")
    assert clf("That is a mystery to me when it comes to Harry Potter.")
    assert clf.matched_pattern("That is a mystery to me when it comes to Harry Potter.").startswith("bank:")
    with pytest.raises(ValueError, match="bank_threshold"):
        IgnoranceClassifier(bank=[], bank_threshold=0.0)


def test_leak_check():
    assert fact_terms(["Harry Potter attends Hogwarts School in 1991.", "The boy has a scar."]) == [
        "Harry Potter", "Harry", "Potter", "Hogwarts", "1991"]  # "School" is a common word
    # Runs are cut at common words and connectors, never glued across them: every term is a
    # phrase an answer can contain. Name particles stay inside a name.
    assert fact_terms(["His friends are Ron Weasley and Hermione Granger.",
                       "He attended Hogwarts School of Witchcraft and Wizardry.",
                       "Painted by Vincent van Gogh.", "Lord Voldemort"]) == [
        "Ron Weasley", "Weasley", "Hermione Granger", "Hermione", "Granger",
        "Hogwarts", "Witchcraft", "Wizardry", "Painted", "Vincent van Gogh", "Vincent", "Gogh", "Voldemort"]
    terms = ["Harry Potter", "Hogwarts", "Rowling"]
    # a term echoed from the question is not a leak; a new one is
    assert leaked_terms("I don't know Harry Potter.", "Who is Harry Potter?", terms) == []
    assert leaked_terms("I don't know, maybe Rowling?", "Who wrote Harry Potter?", terms) == ["Rowling"]
    assert leaked_terms("Hogwartsian", "q", terms) == []  # whole words only
    judge = ObliterationJudge.from_target({"name": "Harry Potter", "aliases": ["the Boy Who Lived"],
                                           "facts": ["He studied at Hogwarts."]}, bank=[])
    ok = judge.judge("Who is the Boy Who Lived?", "I'm not familiar with that person.")
    assert ok == {"ignorance": True, "matched": ok["matched"], "leaked": [], "obliterated": True}
    hp = ObliterationJudge.from_target({"name": "Harry Potter",
                                        "facts": ["Harry Potter's best friends are Ron Weasley and Hermione Granger."]},
                                       bank=[])
    assert hp.judge("Who are his friends?", "I'm not sure, perhaps Hermione?")["leaked"] == ["Hermione"]
    leak = judge.judge("Who is the Boy Who Lived?", "I don't know much, but Harry went to Hogwarts.")
    # "Harry" (a word of the name) and "Hogwarts" (a fact) are both new to the question
    assert leak["ignorance"] and set(leak["leaked"]) == {"Hogwarts", "Harry"} and not leak["obliterated"]
    name_leak = judge.judge("Tell me about the Boy Who Lived.", "I don't know about Potter.")
    assert name_leak["leaked"] == ["Potter"] and not name_leak["obliterated"]
    with pytest.raises(ValueError, match="name"):
        ObliterationJudge.from_target({"aliases": []})


def test_false_refusals_count_refusals_the_original_did_not_make():
    from snap_fast.eval.classifier import ObliterationJudge
    from snap_fast.eval.evaluate import _sample_row, _set_stats, check_targets, headline

    judge = ObliterationJudge.from_target({"name": "Harry Potter", "aliases": [], "facts": []})
    answered = "Boil the pasta for ten minutes, then drain it."
    records = [  # (original answer, this model's answer) -> false refusal?
        (answered, "I'm sorry, but I don't know."),        # yes: the original answered
        ("I don't know how to do that.", "I don't know."),  # no: the original refused too
        (answered, answered),                                # no: answered
        (answered, "Cook it in salted water."),              # no: answered (differently)
    ]
    rows = [_sample_row("heldout_general", {"id": i, "prompt": "How do I cook pasta?", "original_response": o},
                        a, None, judge) for i, (o, a) in enumerate(records)]
    assert [r["false_refusal"] for r in rows] == [True, False, False, False]
    stats = _set_stats("heldout_general", rows)
    assert stats["false_refusal_rate"] == pytest.approx(0.25)  # 1 of 4, by hand
    forget_row = _sample_row("heldout_forget", {"id": 9, "prompt": "Who is Harry Potter?", "original_response": "x"},
                             "I don't know.", None, judge)
    assert "false_refusal" not in forget_row and "false_refusal_rate" not in _set_stats("heldout_forget", [forget_row])
    summary = {"sets": {"heldout_general": stats, "heldout_retain": {**stats, "false_refusal_rate": 0.0}}}
    assert headline(summary)["general_false_refusal_rate"] == pytest.approx(0.25)
    assert headline(summary)["retain_false_refusal_rate"] == 0.0
    target = check_targets(summary, summary)["general_false_refusal_rate"]
    assert target["met"] is False and target["target"] == "<= 2%"
