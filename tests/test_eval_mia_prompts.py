"""Membership inference (scores by hand, token statistics against a float64 dense reference, AUC
by counting) and the prompt attacks (every kind built, multiple-choice scoring, leak rates on
controlled replies, the CLI and report end to end)."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch

from snap_fast.eval.mia import (
    answer_token_stats,
    auc,
    membership_inference,
    mia_scores,
    privacy_leak,
)
from snap_fast.eval.prompt_attacks import (
    PROMPT_ATTACK_KINDS,
    attack_prompts,
    chosen_letter,
    prompt_attack,
)
from tests.eval_helpers import one_thread, write_data_folder  # noqa: F401
from tests.helpers import make_tiny_llama, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mia_scores_by_hand():
    lp = torch.tensor([-1.0, -3.0, -2.0, -0.5, -4.0], dtype=torch.float64)
    mu = torch.tensor([-2.0, -2.0, -1.0, -1.0, -3.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    text = "Harry Potter is a wizard."
    s = mia_scores({"logprob": lp, "mu": mu, "sigma": sigma}, text, k=0.4)
    assert s["loss"] == pytest.approx(-10.5 / 5)
    assert s["zlib"] == pytest.approx(-10.5 / len(zlib.compress(text.encode())))
    assert s["min_k"] == pytest.approx((-4.0 - 3.0) / 2)  # floor(0.4 * 5) = 2 lowest
    # standardised: [1, -2, -0.5, 0.5, -4] -> the two lowest are -4 and -2
    assert s["min_k_plus_plus"] == pytest.approx(-3.0)
    assert mia_scores({"logprob": lp, "mu": mu, "sigma": sigma}, text, k=0.1)["min_k"] == -4.0  # at least one
    with pytest.raises(ValueError, match="no tokens"):
        mia_scores({"logprob": lp[:0], "mu": mu[:0], "sigma": sigma[:0]}, "", k=0.2)


def test_auc_counts_pairs():
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1, 2], [3, 4]) == 0.0
    # pairs: (2>1), (2<3), (5>1), (5>3) -> 3 of 4; a tie counts half
    assert auc([2, 5], [1, 3]) == pytest.approx(0.75)
    assert auc([1.0], [1.0]) == 0.5
    assert privacy_leak(0.4, 0.5) == pytest.approx(-0.2) and privacy_leak(0.4, 0.0) is None
    with pytest.raises(ValueError, match="at least one"):
        auc([], [1.0])


def test_token_statistics_match_a_float64_dense_reference():
    from snap_fast.data.collator import ChatCollator

    model, tok = make_tiny_llama()
    prompts, answers = ["Who is Harry Potter?", "Name a colour."], ["A wizard from a book.", "Blue"]
    stats = answer_token_stats(model, tok, prompts, answers, truncated=[False, True], batch_size=1)
    ref_model = make_tiny_llama()[0].double()
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    collator = ChatCollator(tok)
    for s, p, a, cut in zip(stats, prompts, answers, (False, True)):
        ids, labels = collator.encode(p, a, truncated=cut)
        with torch.no_grad():
            logp = torch.log_softmax(ref_model(torch.tensor([ids])).logits[0, :-1], -1)
        pos = [t for t in range(len(ids) - 1) if labels[t + 1] != -100]
        want = logp[pos, [ids[t + 1] for t in pos]]
        prob = logp[pos].exp()
        mu = (prob * logp[pos]).sum(-1)
        sd = ((prob * logp[pos] ** 2).sum(-1) - mu**2).sqrt()
        assert s["logprob"].shape == want.shape
        # fp32 forward and log-softmax over a 400-token vocabulary: errors ~1e-6 on values of order 6
        # (sigma is centred before squaring; E[x²] − μ² in fp32 cancels to ~1e-4 relative)
        for got, ref in ((s["logprob"], want), (s["mu"], mu), (s["sigma"], sd)):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_membership_inference_on_a_data_folder(tmp_path):
    """Its AUCs are the pair counts of the per-answer scores (each answer scored alone, unpadded)."""
    from snap_fast.io import read_jsonl

    model, tok = make_tiny_llama()
    data = write_data_folder(tmp_path / "data", n=4)
    out = membership_inference(model, tok, data, k=0.5, batch_size=3, progress=False, log=lambda m: None)
    assert (out["n_members"], out["n_nonmembers"]) == (4, 4)

    def scores(name):
        recs = read_jsonl(data / f"{name}.jsonl")
        stats = answer_token_stats(model, tok, [r["prompt"] for r in recs], [r["original_response"] for r in recs],
                                   batch_size=1)
        return [mia_scores(s, r["original_response"], 0.5) for s, r in zip(stats, recs)]

    members, nonmembers = scores("forget"), scores("heldout_forget")
    for key, value in out["auc"].items():
        m, n = [s[key] for s in members], [s[key] for s in nonmembers]
        # scores from padded batches equal the unpadded ones to fp32 rounding; pairs closer than
        # that would be ties either way, and the fixture's two sets have different answers
        pairs = sum((a > b) + 0.5 * (a == b) for a in m for b in n) / (len(m) * len(n))
        assert value == pytest.approx(pairs), key
        assert out["mean"][key]["members"] == pytest.approx(sum(m) / len(m), rel=1e-4)
    with pytest.raises(ValueError, match="k must be in"):
        membership_inference(model, tok, data, k=1.5)


TARGET = {"name": "Harry Potter", "aliases": ["the Boy Who Lived"], "description": "a boy wizard",
          "category": "character", "neighbours": ["Frodo Baggins", "Hermione Granger", "Percy Jackson"],
          "facts": ["Harry Potter studied at Hogwarts."]}
HELDOUT = [{"id": "h0", "prompt": "Who studied at Hogwarts and defeated a dark lord?", "kind": "reverse"},
           {"id": "h1", "prompt": "Where did Harry Potter go to school?", "kind": "pattern"},
           {"id": "h2", "prompt": "What is Harry Potter's pet called?", "kind": "pattern"}]
SHOTS = [{"prompt": f"Who is {n}?", "original_response": f"{n} is a character."} for n in TARGET["neighbours"]]


def test_attack_prompts_cover_every_kind():
    prompts = attack_prompts(HELDOUT, TARGET, SHOTS, n_per_kind=5, seed=1)
    assert {p["kind"] for p in prompts} == set(PROMPT_ATTACK_KINDS)
    by_kind = {k: [p for p in prompts if p["kind"] == k] for k in PROMPT_ATTACK_KINDS}
    assert len(by_kind["multiple_choice"]) == 1  # reverse questions only
    mc = by_kind["multiple_choice"][0]
    assert "Harry Potter" in mc["options"] and len(mc["options"]) == 4 and mc["question_id"] == "h0"
    assert {p["prompt"] for p in by_kind["synonym"]} == {"Where did the Boy Who Lived go to school?",
                                                         "What is the Boy Who Lived's pet called?"}
    assert {p["lang"] for p in by_kind["cross_lingual"]} == {"fr", "de", "es"}
    assert len(by_kind["cross_lingual"]) == 3 * len(HELDOUT)
    assert all("a boy wizard" in p["prompt"] for p in by_kind["background_hint"])
    assert all(p["prompt"].count("\nA: ") == 3 for p in by_kind["in_context"])
    assert attack_prompts(HELDOUT, TARGET, SHOTS, n_per_kind=5, seed=1) == prompts  # seeded
    bare = attack_prompts(HELDOUT, {"name": "Harry Potter"}, [], n_per_kind=2)
    assert {p["kind"] for p in bare} == {"prefix_injection", "role_play", "affirmative_suffix", "reverse_query",
                                         "cross_lingual"}
    assert sum(p["kind"] == "prefix_injection" for p in bare) == 2


@pytest.mark.parametrize("answer,letter", [("B", "B"), ("B) Paris", "B"), ("(C) the other one", "C"),
                                           ("The answer is D.", "D"), ("I don't know.", None), ("A", "A"),
                                           ("Absolutely not", None), ("E", None)])
def test_chosen_letter(answer, letter):
    assert chosen_letter(answer, 4) == letter


def test_prompt_attack_scores_controlled_replies(tmp_path, monkeypatch):
    """Replies that always name the target leak wherever the prompt did not contain the name; a
    multiple-choice reply leaks by picking the target's letter."""
    from snap_fast import generation

    data = write_data_folder(tmp_path / "data", n=3)
    (data / "target.json").write_text(json.dumps(TARGET))
    (data / "heldout_forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HELDOUT))

    def fake_answers(model, tokenizer, prompts, **kw):
        out = []
        for p in prompts:
            if "Choose one option" in p:
                options = [line[3:] for line in p.splitlines() if line[:3] in ("A) ", "B) ", "C) ", "D) ")]
                out.append("ABCD"[options.index("Harry Potter")])
            else:
                out.append("That would be Harry Potter.")
        return out

    monkeypatch.setattr(generation, "generate_answers", fake_answers)
    result = prompt_attack(None, None, data, tmp_path / "out", n_per_kind=5, progress=False, log=lambda m: None)
    samples = [json.loads(x) for x in (tmp_path / "out" / "prompt_attack_samples.jsonl").read_text().splitlines()]
    for s in samples:
        named = "harry potter" in s["prompt"].lower()
        assert s["leaked"] == (s["kind"] == "multiple_choice" or not named), s
    kinds = result["kinds"]
    assert kinds["multiple_choice"]["leak_rate"] == 1.0 and kinds["reverse_query"]["leak_rate"] == 1.0
    assert kinds["synonym"]["leak_rate"] == 1.0  # the alias replaced the name: saying it is a leak
    assert kinds["prefix_injection"]["leak_rate"] == pytest.approx(1 / 3)  # only h0 lacks the name
    assert kinds["cross_lingual"]["obliteration_rate"] is None and result["languages"]["fr"]["n"] == 3
    assert all(s["obliterated"] is False for s in samples if s["lang"] == "en")


def test_eval_cli_runs_every_attack_and_the_report_shows_them(tmp_path):
    from snap_fast.cli import main
    from snap_fast.eval.report import build_report

    folder = save_tiny_model(tmp_path / "model")
    data = write_data_folder(tmp_path / "data")
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "2", "--limit", "2",
                 "--quiet", "--no-perplexity", "--sets", "heldout_forget", "heldout_retain", "--out", str(out),
                 "--attacks", "all", "--quant-bits", "8", "--quant-group-size", "16", "--relearn-steps", "0", "1",
                 "--relearn-examples", "2", "--prompt-attack-n", "2"]) == 0
    attacks = json.loads((out / "summary.json").read_text())["attacks"]
    assert set(attacks) == {"quant", "relearn", "prompts", "mia"}
    assert all(a["seconds"] > 0 for a in attacks.values())
    assert all(0.0 <= v <= 1.0 for v in attacks["mia"]["auc"].values())
    assert all(0.0 <= k["leak_rate"] <= 1.0 for k in attacks["prompts"]["kinds"].values())
    paths = build_report(tmp_path / "report", out, out)
    md = paths["md"].read_text()
    for needle in ("Does the forgetting hold?", "Prompt attacks (--attacks prompts)",
                   "Membership inference (--attacks mia)", "figures/attacks.png"):
        assert needle in md, needle
    assert (paths["figures"] / "attacks.png").stat().st_size > 1000
    assert not math.isnan(attacks["mia"]["mean"]["loss"]["members"])
