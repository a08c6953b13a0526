"""evaluate_model over a data folder (rates, caching, answers from data) and `snap-fast eval`."""

from __future__ import annotations

import json

import pytest

import snap_fast.eval.evaluate as ev
from snap_fast.eval.evaluate import check_targets, evaluate_model, read_jsonl
from snap_fast.eval.metrics import perplexity
from tests.eval_helpers import one_thread, write_data_folder  # noqa: F401
from tests.helpers import make_tiny_llama, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LEAKY = "I don't know, but he studied at Hogwarts."


class FakeGenerator:
    """Stands in for generate_answers: designed answers per prompt, and a call counter."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls += 1
        out = []
        for p in prompts:
            if "Boy Who Lived (0)" in p:
                out.append(LEAKY)  # ignorance, but leaks a fact: not obliterated
            elif "Boy Who Lived" in p or "Harry Potter" in p:
                out.append("I'm not familiar with that person.")
            elif "Percy" in p:
                out.append("Rick Riordan wrote it.")  # identical to the original answer
            else:
                out.append("Put it in water.")  # 4 of the original's 8 words, in order
        return out


@pytest.fixture
def tiny():
    return make_tiny_llama()


def test_rates_probabilities_perplexity(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    data = write_data_folder(tmp_path / "data")
    fake = FakeGenerator()
    monkeypatch.setattr(ev, "generate_answers", fake)
    s = evaluate_model(model, tok, data, tmp_path / "out", identity="tiny", progress=False, log=lambda m: None)
    hf = s["sets"]["heldout_forget"]
    assert hf["obliteration_rate"] == pytest.approx(2 / 3)
    assert hf["ignorance_rate"] == pytest.approx(1.0)
    assert hf["leak_rate"] == pytest.approx(1 / 3)
    assert s["sets"]["forget"]["obliteration_rate"] == pytest.approx(1.0)
    assert s["sets"]["heldout_retain"]["rougeL_recall"] == pytest.approx(1.0)
    assert s["sets"]["heldout_retain"]["ignorance_rate"] == 0.0
    assert s["sets"]["heldout_general"]["rougeL_recall"] == pytest.approx(4 / 8)
    assert s["headline"]["obliteration_rate"] == pytest.approx(2 / 3)
    for st in s["sets"].values():
        assert 0.0 < st["probability"] < 1.0
    texts = [r["text"] for r in read_jsonl(data / "heldout_text.jsonl")]
    assert s["perplexity"] == pytest.approx(perplexity(model, tok, texts), rel=1e-6)
    samples = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert len(samples) == 12
    leak = next(x for x in samples if x["answer"] == LEAKY)
    assert leak["leaked"] == ["Hogwarts"] and leak["obliterated"] is False
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == s


def test_cache_reuse_force_and_identity(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    data = write_data_folder(tmp_path / "data")
    fake = FakeGenerator()
    monkeypatch.setattr(ev, "generate_answers", fake)
    counted = []
    real_answer_nll = ev.answer_nll
    monkeypatch.setattr(ev, "answer_nll", lambda *a, **k: counted.append(1) or real_answer_nll(*a, **k))
    kw = {"identity": "tiny", "sets": ("heldout_forget", "heldout_retain"), "progress": False, "log": lambda m: None}
    first = evaluate_model(model, tok, data, tmp_path / "out", **kw)
    assert fake.calls == 2 and len(counted) == 2
    second = evaluate_model(model, tok, data, tmp_path / "out", **kw)
    assert fake.calls == 2 and len(counted) == 2  # nothing recomputed
    assert second["sets"] == first["sets"] and second["perplexity"] == first["perplexity"]
    evaluate_model(model, tok, data, tmp_path / "out", **{**kw, "force": True})
    assert fake.calls == 4 and len(counted) == 4
    evaluate_model(model, tok, data, tmp_path / "out", **{**kw, "identity": "another-model"})
    assert fake.calls == 6
    # changing the data file invalidates its cache entry only
    path = data / "heldout_retain.jsonl"
    path.write_text(path.read_text().replace("Rick Riordan wrote it.", "Riordan."))
    evaluate_model(model, tok, data, tmp_path / "out", **{**kw, "identity": "another-model"})
    assert fake.calls == 7


def test_answers_from_data(tmp_path, tiny):
    model, tok = tiny
    data = write_data_folder(tmp_path / "data", model_identity="tiny")
    s = evaluate_model(model, tok, data, tmp_path / "out", identity="tiny", answers_from_data=True,
                       perplexity=False, probability=False, progress=False, log=lambda m: None)
    for st in s["sets"].values():
        assert st["rougeL_recall"] == pytest.approx(1.0)
    # the original answers to the forget questions know the target: nothing obliterated
    assert s["sets"]["heldout_forget"]["obliteration_rate"] == 0.0
    with pytest.raises(ValueError, match="built with tiny"):
        evaluate_model(model, tok, data, tmp_path / "o2", identity="other", answers_from_data=True)


def test_bad_input(tmp_path, tiny):
    model, tok = tiny
    data = write_data_folder(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="data folder"):
        evaluate_model(model, tok, tmp_path / "missing", tmp_path / "o", identity="t")
    with pytest.raises(ValueError, match="sets"):
        evaluate_model(model, tok, data, tmp_path / "o", identity="t", sets=("nope",))
    with pytest.raises(ValueError, match="limit"):
        evaluate_model(model, tok, data, tmp_path / "o", identity="t", limit=0)
    with pytest.raises(ValueError, match="identity"):
        evaluate_model(model, tok, data, tmp_path / "o", identity="")
    (data / "target.json").unlink()
    with pytest.raises(FileNotFoundError, match="target.json"):
        evaluate_model(model, tok, data, tmp_path / "o", identity="t")


def test_check_targets():
    orig = {"sets": {}, "perplexity": 10.0}
    good = {"sets": {"heldout_forget": {"obliteration_rate": 0.95}, "heldout_retain": {"rougeL_recall": 0.85}},
            "perplexity": 10.5}
    bad = {"sets": {"heldout_forget": {"obliteration_rate": 0.5}, "heldout_retain": {"rougeL_recall": 0.85}},
           "perplexity": 12.0}
    assert all(t["met"] for t in check_targets(orig, good).values())
    res = check_targets(orig, bad)
    assert not res["obliteration_rate"]["met"] and res["retain_rougeL_recall"]["met"]
    assert res["perplexity_increase"]["value"] == pytest.approx(0.2) and not res["perplexity_increase"]["met"]


def test_cli_end_to_end_with_adapter(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from snap_fast.cli import main

    folder = save_tiny_model(tmp_path / "model")
    data = write_data_folder(tmp_path / "data")
    args = ["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "3", "--limit", "2",
            "--quiet", "--sets", "heldout_forget", "heldout_retain"]
    assert main([*args, "--out", str(tmp_path / "base")]) == 0
    base = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert len(read_jsonl(tmp_path / "base" / "samples.jsonl")) == 4
    assert base["perplexity"] > 1.0 and "+adapter-" not in base["model"]

    model, _ = make_tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main([*args, "--out", str(tmp_path / "lora"), "--adapter", str(tmp_path / "adapter")]) == 0
    lora = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert "+adapter-" in lora["model"] and lora["perplexity"] != pytest.approx(base["perplexity"])
    assert '"obliteration_rate"' in capsys.readouterr().out

    # bad input: one line on stderr and exit code 2, as every subcommand, no traceback
    assert main(["eval", "--model", str(folder), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"snap-fast eval: error: --data: folder not found: {tmp_path / 'none'}"
    assert main([*args, "--out", str(tmp_path / "y"), "--adapter", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("snap-fast eval: error: ") and "--adapter" in err and err.count("\n") == 1
    assert main([*args[:-4], "--no-progress", "--sets", "heldout_forget", "--out", str(tmp_path / "np")]) == 0
