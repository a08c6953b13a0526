"""TOFU metrics: truth ratio, its scores, the KS forget quality and model utility against hand
computations; then the whole TOFU evaluation on the real files (the full release where found, else the
package's sample)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from snap_fast.data.tofu import resolve_tofu_root
from snap_fast.eval.tofu_metrics import (
    UTILITY_SPLITS,
    evaluate_tofu,
    forget_quality,
    load_tofu_split,
    model_utility,
    truth_ratio_score,
    truth_ratios,
)
from tests.eval_helpers import one_thread  # noqa: F401
from tests.helpers import make_tiny_llama

with warnings.catch_warnings():  # on a bare clone: the package's sample, which warns that it is one
    warnings.simplefilter("ignore")
    TOFU = resolve_tofu_root(hub=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_truth_ratio_hand_computed():
    # paraphrase mean NLL 1.0; perturbed mean NLLs 2.0 and 0.5
    geo = truth_ratios([1.0], [[2.0, 0.5]])
    # geometric mean of e^-2 and e^-0.5 is e^-1.25; divided by e^-1 -> e^-0.25
    assert geo[0] == pytest.approx(math.exp(-0.25))
    ari = truth_ratios([1.0], [[2.0, 0.5]], perturbed_mean="arithmetic")
    assert ari[0] == pytest.approx((math.exp(-2.0) + math.exp(-0.5)) / 2 / math.exp(-1.0))
    assert ari[0] >= geo[0]  # AM >= GM
    with pytest.raises(ValueError, match="perturbed_mean"):
        truth_ratios([1.0], [[1.0]], perturbed_mean="median")
    with pytest.raises(ValueError, match="perturbed_nll"):
        truth_ratios([1.0, 2.0], [[1.0]])


def test_truth_ratio_scores():
    r = [0.5, 2.0, 1.0]
    assert truth_ratio_score(r, forget=True) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert truth_ratio_score(r, forget=False) == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    with pytest.raises(ValueError):
        truth_ratio_score([], forget=True)


def test_forget_quality_is_ks_pvalue():
    # fully separated samples of 3 and 3: D = 1, exact two-sided p = 2 / C(6, 3) = 0.1
    fq = forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert fq["ks_statistic"] == pytest.approx(1.0)
    assert fq["forget_quality"] == pytest.approx(2 / math.comb(6, 3))
    same = forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["ks_statistic"] == 0.0 and same["forget_quality"] == pytest.approx(1.0)


def test_model_utility_harmonic_mean():
    scores = {s: {"probability": 0.5, "rougeL_recall": 0.25, "truth_ratio_score": 1.0} for s in UTILITY_SPLITS}
    # harmonic mean of three copies of (0.5, 0.25, 1.0) = 3 / (2 + 4 + 1)
    assert model_utility(scores) == pytest.approx(3 / 7)
    scores["retain"]["rougeL_recall"] = 0.0
    assert model_utility(scores) == 0.0
    with pytest.raises(ValueError, match="world_facts"):
        model_utility({"retain": scores["retain"], "real_authors": scores["retain"]})


def test_tofu_on_real_files_tiny_model():
    model, tok = make_tiny_llama()
    recs = load_tofu_split(TOFU, "forget01", limit=3)
    assert len(recs) == 3 and all(len(r["perturbed_answer"]) >= 2 for r in recs)
    samples, summary = evaluate_tofu(model, tok, TOFU, forget_split="forget01", limit=3, max_new_tokens=4,
                                     retain_ratios=[0.5, 1.0, 2.0], progress=False)
    assert set(samples) == {"forget01", *UTILITY_SPLITS}
    for split, recs in samples.items():
        assert len(recs) == 3
        sc = summary["splits"][split]
        for key in ("probability", "truth_ratio_score", "rougeL_recall"):
            assert 0.0 <= sc[key] <= 1.0, (split, key, sc[key])
    assert 0.0 <= summary["model_utility"] <= 1.0
    assert 0.0 <= summary["forget_quality"] <= 1.0

    # the first forget question's truth ratio, computed directly from the model's logits
    from snap_fast.data.collator import ChatCollator

    coll = ChatCollator(tok)

    def mean_nll(q, a):
        ids, labels = coll.encode(q, a)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        pos = [t for t in range(1, len(ids)) if labels[t] != -100]
        return -float(sum(logp[t - 1, labels[t]] for t in pos)) / len(pos)

    r0 = load_tofu_split(TOFU, "forget01", limit=1)[0]
    para = mean_nll(r0["question"], r0["paraphrased_answer"])
    pert = [mean_nll(r0["question"], a) for a in r0["perturbed_answer"]]
    expected = math.exp(-np.mean(pert)) / math.exp(-para)
    assert samples["forget01"][0]["truth_ratio"] == pytest.approx(expected, rel=1e-4)
    # world_facts probability is the true answer's share among the options
    w0 = samples["world_facts"][0]
    share = math.exp(-w0["answer_nll"]) / (math.exp(-w0["answer_nll"]) + sum(math.exp(-x) for x in w0["perturbed_nll"]))
    assert w0["probability"] == pytest.approx(share)


def test_load_tofu_split_bad_input(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_tofu_split(tmp_path, "forget02")
    with pytest.raises(FileNotFoundError):
        load_tofu_split(tmp_path, "forget01")
    (tmp_path / "forget01_perturbed.json").write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError, match="perturbed_answer"):
        load_tofu_split(tmp_path, "forget01")
