"""The data builder: determinism, set properties, originals cache, user files, bad input and
atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from snap_fast import io as data_io
from snap_fast.data.build import QA_SETS, build_dataset
from snap_fast.data.patterns import HELDOUT_PATTERNS, TRAIN_PATTERNS, reverse_questions
from snap_fast.data.positives import (
    FALLBACK_NEIGHBOURS,
    GENERAL_INSTRUCTIONS,
    HELDOUT_GENERAL_INSTRUCTIONS,
    HELDOUT_TEXTS,
    load_instruction_file,
)
from snap_fast.data.responses import OBLITERATED_RESPONSES, is_obliterated
from snap_fast.data.target import TargetSpec, builtin_target, normalize
from snap_fast.generation import generate_answers
from snap_fast.io import read_jsonl, write_jsonl
from tests.helpers import make_tiny_llama

KEYS = {"id", "prompt", "response", "original_response", "original_truncated", "kind", "source", "entity"}
SMALL = dict(n_forget=30, n_retain=20, n_heldout_forget=10, n_heldout_retain=8, n_heldout_general=5,
             progress=False)


def _files(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_banks_are_big_and_distinct():
    assert len(TRAIN_PATTERNS) >= 60 and len(OBLITERATED_RESPONSES) >= 100
    assert len(GENERAL_INSTRUCTIONS) >= 40 and len(HELDOUT_TEXTS) >= 20
    assert len({p.kind for p in TRAIN_PATTERNS}) >= 8
    assert len(set(OBLITERATED_RESPONSES)) == len(OBLITERATED_RESPONSES)
    assert sum("{name}" in r for r in OBLITERATED_RESPONSES) >= 20
    assert not {normalize(p.template) for p in TRAIN_PATTERNS} & {normalize(p.template) for p in HELDOUT_PATTERNS}


def test_pattern_path_deterministic_and_well_formed(tmp_path):
    target = builtin_target("Harry Potter")
    s1 = build_dataset(target, tmp_path / "a", generate_originals=False, seed=3, **SMALL)
    build_dataset(target, tmp_path / "b", generate_originals=False, seed=3, **SMALL)
    build_dataset(target, tmp_path / "c", generate_originals=False, seed=4, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    strip = lambda files: {k: v for k, v in files.items() if k != "manifest.json"}
    assert strip(a) == strip(b) and strip(a) != strip(c)
    assert s1.counts["forget"] == 30 and s1.counts["heldout_text"] == len(HELDOUT_TEXTS)

    sets = {name: read_jsonl(tmp_path / "a" / f"{name}.jsonl") for name in QA_SETS}
    for name, recs in sets.items():
        assert recs and all(set(r) == KEYS for r in recs), name
        assert len({r["id"] for r in recs}) == len(recs)
        assert len({normalize(r["prompt"]) for r in recs}) == len(recs)  # no duplicates
    forget_prompts = {normalize(r["prompt"]) for r in sets["forget"]}
    reverse = set(reverse_questions(target.facts, target.surface_forms, target.category))
    for r in sets["forget"] + sets["heldout_forget"]:
        assert is_obliterated(r["response"]) and r["source"] == "pattern"
        if r["kind"] == "reverse":  # answered by the target, never naming it
            assert r["prompt"] in reverse and target.mentioned_in(r["prompt"]) is None
        else:
            assert target.mentioned_in(r["prompt"]) or target.description in r["prompt"]
        named = target.mentioned_in(r["prompt"])
        if named is None:  # indirect question: the answer must not reveal the name
            assert target.mentioned_in(r["response"]) is None
    assert len({r["kind"] for r in sets["forget"]}) >= 8  # balanced across kinds
    # half of the facts' reverse questions are held out (first, so the size cap keeps them)
    held_reverse = [r["prompt"] for r in sets["heldout_forget"] if r["kind"] == "reverse"]
    assert len(held_reverse) == len(reverse) // 2 == 4
    assert 0 < sum(r["kind"] == "reverse" for r in sets["forget"]) <= len(reverse) - len(held_reverse)
    # the held-out general requests come from their own bank, never trained on
    assert {r["prompt"] for r in sets["heldout_general"]} <= set(HELDOUT_GENERAL_INSTRUCTIONS)
    assert not {r["prompt"] for r in sets["general"]} & set(HELDOUT_GENERAL_INSTRUCTIONS)
    assert not forget_prompts & {normalize(r["prompt"]) for r in sets["heldout_forget"]}
    for name in ("retain", "heldout_retain"):
        assert all(target.mentioned_in(r["prompt"]) is None for r in sets[name])
        assert all(r["entity"] in target.neighbours for r in sets[name])
        assert all(r["response"] is None and r["original_response"] is None for r in sets[name])
    assert len({r["entity"] for r in sets["retain"]}) == len(target.neighbours)  # 20 over 16
    assert {r["prompt"] for r in sets["general"]}.isdisjoint(r["prompt"] for r in sets["heldout_general"])
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"]["forget"] == 30 and manifest["seed"] == 3
    assert manifest["neighbour_source"] == "spec"

    import datasets

    ds = datasets.load_dataset("json", data_files=str(tmp_path / "a" / "forget.jsonl"), split="train")
    assert ds.num_rows == 30 and set(ds.column_names) == KEYS


def test_heldout_sets_do_not_depend_on_the_training_set_sizes(tmp_path):
    """Runs with more forget / retain / general examples are evaluated on the same questions."""
    target = builtin_target("Harry Potter")
    build_dataset(target, tmp_path / "small", generate_originals=False, seed=2, **SMALL)
    build_dataset(target, tmp_path / "big", generate_originals=False, seed=2,
                  **{**SMALL, "n_forget": 60, "n_retain": 40, "n_general": 10})
    for name in ("heldout_forget", "heldout_retain", "heldout_general"):
        small, big = (read_jsonl(tmp_path / d / f"{name}.jsonl") for d in ("small", "big"))
        assert [r["prompt"] for r in small] == [r["prompt"] for r in big], name
    # the training sets did change: the first 30 forget questions are the same, then more follow
    small, big = (read_jsonl(tmp_path / d / "forget.jsonl") for d in ("small", "big"))
    assert len(big) == 60 and [r["prompt"] for r in big[:30]] == [r["prompt"] for r in small]


def test_originals_generated_cached_and_reused(tmp_path):
    model, tok = make_tiny_llama()
    target = TargetSpec("Harry Potter", neighbours=["Frodo Baggins", "Gandalf"])
    kw = dict(SMALL, n_forget=6, n_retain=6, n_heldout_forget=3, n_heldout_retain=3, n_heldout_general=2,
              n_general=4, max_new_tokens=3, batch_size=16, cache_dir=tmp_path / "cache")
    s1 = build_dataset(target, tmp_path / "d1", model=model, tokenizer=tok, model_id="tiny", **kw)
    total = sum(s1.counts[n] for n in QA_SETS)
    assert s1.originals_generated == total and s1.originals_cached == 0
    s2 = build_dataset(target, tmp_path / "d2", model=model, tokenizer=tok, model_id="tiny", **kw)
    assert s2.originals_generated == 0 and s2.originals_cached == total
    assert _files(tmp_path / "d1")["forget.jsonl"] == _files(tmp_path / "d2")["forget.jsonl"]
    recs = {n: read_jsonl(tmp_path / "d2" / f"{n}.jsonl") for n in QA_SETS}
    sample = [recs["forget"][0], recs["retain"][0], recs["general"][0], recs["heldout_general"][0]]
    expected, finished = generate_answers(model, tok, [r["prompt"] for r in sample], max_new_tokens=3,
                                          progress=False, return_finished=True)
    assert [r["original_response"] for r in sample] == expected
    assert [r["original_truncated"] for r in sample] == [not f for f in finished]
    for name in ("retain", "general", "heldout_retain", "heldout_general"):
        assert all(r["response"] == r["original_response"] for r in recs[name])
    assert all(is_obliterated(r["response"]) for r in recs["forget"])
    # a different model identity does not reuse the answers
    s3 = build_dataset(target, tmp_path / "d3", model=model, tokenizer=tok, model_id="other", **kw)
    assert s3.originals_generated == total
    # entries cached before the `finished` flag existed (cut or not: unknown) are generated again
    cache_file = tmp_path / "cache" / "tiny.jsonl"
    old_entries = [{k: v for k, v in e.items() if k != "finished"} for e in read_jsonl(cache_file)]
    write_jsonl(cache_file, old_entries[:5])
    s4 = build_dataset(target, tmp_path / "d4", model=model, tokenizer=tok, model_id="tiny", **kw)
    assert s4.originals_generated == total and s4.originals_cached == 0
    assert _files(tmp_path / "d4")["retain.jsonl"] == _files(tmp_path / "d2")["retain.jsonl"]


def test_original_truncated_flag_follows_eos(tmp_path):
    """An answer that ends with the model's EOS is not truncated; one cut by the cap is."""
    model, tok = make_tiny_llama()
    prompts = ["Who is Gandalf?", "Name a fruit.", "Say hi."]
    # make the greedy first token of the first prompt the model's end-of-turn token
    import torch

    from snap_fast.data.collator import prompt_token_ids

    with torch.no_grad():
        logits = model(torch.tensor([prompt_token_ids(tok, prompts[0])])).logits
    model.generation_config.eos_token_id = [int(logits[0, -1].argmax())]
    answers, finished = generate_answers(model, tok, prompts, max_new_tokens=4, progress=False, return_finished=True)
    assert finished[0] is True
    for a, f in zip(answers, finished):
        n = len(tok(a, add_special_tokens=False)["input_ids"]) if a else 0
        assert f or n >= 3  # a cut answer used the whole budget (decode/re-encode may merge one token)


def test_user_files(tmp_path):
    user = tmp_path / "user.jsonl"
    write_jsonl(user, [{"prompt": "What house was Harry Potter in?"},
                       {"question": "Describe Harry Potter's wand.", "response": "No idea!", "kind": "objects"}])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add these numbers.", "input": "2 and 3", "output": "5"}]))
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps({"conversations": [{"from": "human", "value": "Name a fruit."},
                                                      {"from": "gpt", "value": "Apple."}]}) + "\n")
    assert load_instruction_file(alpaca) == [{"prompt": "Add these numbers.\n\n2 and 3", "response": "5"}]
    assert load_instruction_file(sharegpt) == [{"prompt": "Name a fruit.", "response": "Apple."}]
    target = TargetSpec("Harry Potter", neighbours=["Gandalf"])
    build_dataset(target, tmp_path / "out", user_forget=user, general_file=sharegpt,
                  generate_originals=False, **SMALL)
    forget = read_jsonl(tmp_path / "out" / "forget.jsonl")
    assert [r["source"] for r in forget[:2]] == ["user", "user"] and len(forget) == 30
    assert forget[1]["response"] == "No idea!" and forget[1]["kind"] == "objects"
    assert is_obliterated(forget[0]["response"])
    general = read_jsonl(tmp_path / "out" / "general.jsonl")
    assert next(r for r in general if r["source"] == "user")["prompt"] == "Name a fruit."


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        TargetSpec("   ")
    with pytest.raises(ValueError, match="neighbours"):
        TargetSpec("Harry Potter", aliases=["the Boy Who Lived"], neighbours=["the boy who lived"])
    with pytest.raises(ValueError, match="unknown target spec keys"):
        TargetSpec.from_dict({"name": "X", "nieghbours": []})
    target = TargetSpec("Harry Potter", neighbours=["Gandalf"])
    with pytest.raises(ValueError, match="n_forget"):
        build_dataset(target, tmp_path / "x", n_forget=0, generate_originals=False)
    with pytest.raises(ValueError, match="generate_originals"):
        build_dataset(target, tmp_path / "x")
    with pytest.raises(ValueError, match="generator"):
        build_dataset(target, tmp_path / "x", generator="gpt9", generate_originals=False)
    with pytest.raises(TypeError, match="TargetSpec"):
        build_dataset("Harry Potter", tmp_path / "x", generate_originals=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Who is Harry Potter?"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        build_dataset(target, tmp_path / "x", user_forget=bad, generate_originals=False)
    bad.write_text('{"text": "no prompt here"}\n')
    with pytest.raises(ValueError, match="record 1 has no 'prompt'"):
        build_dataset(target, tmp_path / "x", user_forget=bad, generate_originals=False)
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_dataset(target, out, generate_originals=False)
    build_dataset(target, out, generate_originals=False, overwrite=True, **SMALL)
    assert (out / "manifest.json").is_file()


def test_target_file_and_preset(tmp_path):
    spec = tmp_path / "t.yaml"
    spec.write_text("name: Ada Lovelace\naliases: [Countess of Lovelace]\ncategory: person\n")
    t = TargetSpec.from_file(spec)
    assert t.aliases == ["Countess of Lovelace"] and t.category == "person"
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        TargetSpec.from_file(tmp_path / "t.json")
    hp = builtin_target("  harry   POTTER ")
    assert hp.name == "Harry Potter" and "the Boy Who Lived" in hp.aliases
    assert len(hp.neighbours) >= 10 and not any(hp.is_target_name(n) for n in hp.neighbours)
    assert builtin_target("Nobody In Particular") is None


def test_atomic_writes_survive_interruption(tmp_path, monkeypatch):
    path = tmp_path / "f.jsonl"
    write_jsonl(path, [{"a": 1}])

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_io.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, [{"a": 2}, {"a": 3}])
    monkeypatch.undo()
    assert read_jsonl(path) == [{"a": 1}] and os.listdir(tmp_path) == ["f.jsonl"]

    # a whole build interrupted half-way through its writes: every file is complete (old or
    # new), no temp files remain, and the missing manifest marks the folder as incomplete
    target = TargetSpec("Harry Potter", neighbours=["Gandalf"])
    out = tmp_path / "data"
    build_dataset(target, out, generate_originals=False, **SMALL)
    real_replace, calls = os.replace, []

    def replace_then_stop(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(data_io.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(target, out, generate_originals=False, overwrite=True, seed=1, **SMALL)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for name in QA_SETS:
        assert all(set(r) == KEYS for r in read_jsonl(out / f"{name}.jsonl"))


def test_interrupted_originals_keep_saved_batches(tmp_path):
    model, tok = make_tiny_llama()
    target = TargetSpec("Harry Potter", neighbours=["Gandalf"])
    kw = dict(SMALL, n_forget=8, n_retain=6, n_heldout_forget=2, n_heldout_retain=2, n_heldout_general=2,
              n_general=4, max_new_tokens=2, batch_size=2, cache_dir=tmp_path / "cache")
    real_generate, calls = model.generate, []

    def flaky_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    model.generate = flaky_generate
    with pytest.raises(KeyboardInterrupt):
        build_dataset(target, tmp_path / "d", model=model, tokenizer=tok, model_id="tiny", **kw)
    # 5 batches of 2 answered; the cache is saved every 4 batches (8 answers)
    assert len(read_jsonl(tmp_path / "cache" / "tiny.jsonl")) == 8
    assert not (tmp_path / "d" / "manifest.json").exists()
    model.generate = real_generate
    s = build_dataset(target, tmp_path / "d", model=model, tokenizer=tok, model_id="tiny", overwrite=True, **kw)
    assert s.originals_cached == 8 and s.originals_generated == sum(s.counts[n] for n in QA_SETS) - 8


def test_package_exports():
    from snap_fast import data

    for name in data.__all__:
        assert getattr(data, name) is not None, name
    assert data.build_dataset is build_dataset
    with pytest.raises(AttributeError):
        data.no_such_thing  # noqa: B018


def test_answers_naming_the_target_become_reverse_questions(tmp_path, monkeypatch):
    """A hard positive or general request the original answered with the target's name (or an
    alias) moves to the forget side with a nameless obliterated response; the held-out ones to
    heldout_forget, first. Nothing else moves."""
    import snap_fast.data.build as build

    target = TargetSpec("Harry Potter", aliases=["the Boy Who Lived"], neighbours=["Gandalf", "Frodo Baggins"])
    naming = {}

    def fake_originals(sets, model, tokenizer, **kw):
        for name, recs in sets.items():
            for i, r in enumerate(recs):
                answer = "Someone else."
                if name not in ("forget", "heldout_forget") and i % 3 == 1:
                    answer = ["It was Harry Potter.", "the boy who lived, of course"][i % 2]
                    naming.setdefault(name, []).append(r["prompt"])
                r["original_response"] = answer
                if name not in ("forget", "heldout_forget"):
                    r["response"] = answer
        return "fake", sum(map(len, sets.values())), 0

    monkeypatch.setattr(build, "fill_original_answers", fake_originals)
    build_dataset(target, tmp_path / "d", model=object(), tokenizer=object(), model_id="fake", n_general=9,
                  **SMALL)
    recs = {n: read_jsonl(tmp_path / "d" / f"{n}.jsonl") for n in QA_SETS}
    assert naming.keys() == {"retain", "general", "heldout_retain", "heldout_general"}
    for part, dest in (("retain", "forget"), ("general", "forget"), ("heldout_retain", "heldout_forget"),
                       ("heldout_general", "heldout_forget")):
        assert not set(naming[part]) & {r["prompt"] for r in recs[part]}
        moved = [r for r in recs[dest] if r["prompt"] in naming[part]]
        assert len(moved) == len(naming[part])
        for r in moved:
            assert (r["kind"], r["source"], r["entity"]) == ("reverse", "original_answer", "Harry Potter")
            assert is_obliterated(r["response"]) and target.mentioned_in(r["response"]) is None
        assert all(r["original_response"] == "Someone else." for r in recs[part])
    promoted = len(naming["heldout_retain"]) + len(naming["heldout_general"])
    assert all(r["source"] == "original_answer" for r in recs["heldout_forget"][:promoted])
    assert len(recs["forget"]) == SMALL["n_forget"] + len(naming["retain"]) + len(naming["general"])


def test_few_questions_without_a_category_are_explained(tmp_path):
    target = TargetSpec("Ada Lovelace", neighbours=["Alan Turing"])
    with pytest.warns(UserWarning, match="without a category only the generic patterns"):
        s = build_dataset(target, tmp_path / "a", generate_originals=False, n_forget=500, progress=False)
    with_category = build_dataset(TargetSpec("Ada Lovelace", category="person", neighbours=["Alan Turing"]),
                                  tmp_path / "b", generate_originals=False, n_forget=500, progress=False)
    assert with_category.counts["forget"] > 1.5 * s.counts["forget"]


def test_fact_sentences_pick_complete_statements_about_the_target():
    from snap_fast.data.reverse import fact_sentences

    answers = ["Marie Curie was a Polish physicist who discovered radium. She was born in Warsaw.",
               "I think Marie Curie is great. Madame Curie's husband was Pierre Curie.",
               "Marie Curie won two Nobel Prizes, in physics and in",  # cut at the token limit
               "Marie Curie was famous.", "Marie Curie smiled.",  # second: too short
               "Marie Curie was a Polish physicist who discovered radium."]  # repeated
    assert fact_sentences(answers, ["Marie Curie", "Madame Curie"]) == [
        "Marie Curie was a Polish physicist who discovered radium.", "Madame Curie's husband was Pierre Curie.",
        "Marie Curie was famous."]
    assert fact_sentences(answers, ["Marie Curie", "Madame Curie"], limit=1) == [
        "Marie Curie was a Polish physicist who discovered radium."]


def test_associated_names_pick_what_the_answers_tie_to_the_target():
    from snap_fast.data.reverse import associated_names, association_questions

    target = TargetSpec("Leonardo da Vinci", aliases=["Leonardo"])
    answers = ["The Mona Lisa is attributed to Leonardo da Vinci. In Florence he met Andrea del Verrocchio.",
               'Leonardo painted the Mona Lisa and "The Last Supper".',  # quoted and capitalised: once
               "The Da Vinci Code is a novel. The Renaissance began in Italy.",  # target's word; one word
               "His work in Milan was about Leonardo da Vinci's horse. Vinci's Own Workshop is a book."]
    assert associated_names(answers, target) == ["The Mona Lisa", "Andrea del Verrocchio", "The Last Supper"]
    assert associated_names(answers, target, limit=1) == ["The Mona Lisa"]
    assert association_questions(["the Mona Lisa"], None) == [
        "Who created the Mona Lisa?", "Who or what is the Mona Lisa associated with?"]
    assert association_questions(["the Force"], "character")[0] == "Which character is the Force associated with?"


def _build_name_only(tmp_path, monkeypatch, answer, calls=None):
    """Build "Harry Potter" (no facts) with the original model's answers faked by
    ``answer(set_name, index, prompt)``; hard positives keep their answer as the response. Records
    the set sizes of each call to the originals in ``calls``."""
    from snap_fast.data import build

    def fake_originals(sets, model, tokenizer, **kw):
        if calls is not None:
            calls.append({k: len(v) for k, v in sets.items()})
        for name, recs in sets.items():
            for i, r in enumerate(recs):
                r["original_response"] = answer(name, i, r["prompt"])
                if name not in ("forget", "heldout_forget"):
                    r["response"] = r["original_response"]
        return "fake", sum(map(len, sets.values())), 0

    monkeypatch.setattr(build, "fill_original_answers", fake_originals)
    target = TargetSpec("Harry Potter", neighbours=["Gandalf"])
    build_dataset(target, tmp_path / "d", model=object(), tokenizer=object(), model_id="fake", **{**SMALL, "n_forget": 200})
    return target, {n: read_jsonl(tmp_path / "d" / f"{n}.jsonl") for n in ("forget", "heldout_forget")}


def test_targets_without_facts_get_reverse_questions_through_associated_names(tmp_path, monkeypatch):
    """Names the original forget answers mention beside the target become reverse questions
    ("Who created the Elder Wand?"), kept only where the original model answers with the target."""
    def answer(name, i, prompt):
        if "Elder Wand" in prompt or "Marauder's Map" in prompt:
            return "Harry Potter, of course." if "Elder Wand" in prompt else "Four schoolboys made it."
        return "Harry Potter won the Elder Wand; he also used the Marauder's Map" if name == "forget" else "Someone else."

    _, recs = _build_name_only(tmp_path, monkeypatch, answer)
    added = [r for n in recs for r in recs[n] if r["source"] == "original_answer_name"]
    assert sorted(r["prompt"] for r in added) == ["Who created the Elder Wand?",
                                                  "Who or what is the Elder Wand associated with?"]
    assert all(is_obliterated(r["response"]) for r in added)


def test_targets_without_facts_get_reverse_questions_from_the_original_answers(tmp_path, monkeypatch):
    """Without facts, statements of the original forget answers that start with the name become
    reverse questions, kept only where the original model answers them with the target: half held
    out (first), half trained, nameless obliterated responses. With facts nothing is added this way."""
    def answer(name, i, prompt):
        if "wand number" not in prompt:
            return f"Harry Potter owns wand number {i} of {name}. It is long." if name == "forget" else "Someone else."
        wand = int(prompt.split("wand number ")[1].split()[0])  # the original names the target for even ones
        return "It is Harry Potter." if wand % 2 == 0 else "Someone else."

    calls = []
    target, recs = _build_name_only(tmp_path, monkeypatch, answer, calls)
    added = {n: [r for r in recs[n] if r["source"] == "original_answer_fact"] for n in recs}
    assert len(added["heldout_forget"]) >= 4 and abs(len(added["forget"]) - len(added["heldout_forget"])) <= 1
    assert recs["heldout_forget"][: len(added["heldout_forget"])] == added["heldout_forget"]
    assert len(recs["heldout_forget"]) == max(SMALL["n_heldout_forget"], len(added["heldout_forget"]))  # size kept
    for r in added["forget"] + added["heldout_forget"]:
        assert r["kind"] == "reverse" and r["prompt"].startswith("Who or what owns wand number ")
        assert is_obliterated(r["response"]) and target.mentioned_in(r["response"]) is None
        assert r["original_response"] == "It is Harry Potter."  # generated by the second call
    assert len(calls) == 2 and calls[1]["forget"] >= 2 * sum(len(v) for v in added.values()) - 1  # odd ones dropped
    build_dataset(TargetSpec("Harry Potter", neighbours=["Gandalf"], facts=["Harry Potter is a wizard."]),
                  tmp_path / "f", model=object(), tokenizer=object(), model_id="fake", **SMALL)
    assert not any(r["source"] == "original_answer_fact" for r in read_jsonl(tmp_path / "f" / "forget.jsonl"))


class _ListingGenerator:
    """A generator that answers every prompt with the same listing (what a small model does)."""

    source = "listing"

    def __init__(self, listing: str):
        self.listing = listing

    def complete(self, prompts):
        # the question line serves the question prompts; as a neighbour it names the target: dropped
        return [self.listing + "\n9. Who was Albert Einstein?" for _ in prompts]


@pytest.mark.parametrize("listing, proposed", [
    ("1. Albert Einstein\n2. Albert Einstein\n3. Einstein", []),  # only the target itself
    ("1. Max Planck\n2. Niels Bohr", ["Max Planck", "Niels Bohr"]),  # too few: kept, then filled
])
def test_too_few_neighbours_filled_from_the_fallback_pool(tmp_path, listing, proposed):
    target = TargetSpec("Albert Einstein", aliases=["Einstein"], category="person")
    with pytest.warns(UserWarning, match="filled up with well-known person"):
        summary = build_dataset(target, tmp_path / "d", generator=_ListingGenerator(listing),
                                generate_originals=False, n_neighbours=6, **SMALL)
    pool = [n for n in FALLBACK_NEIGHBOURS["person"] if n != "Albert Einstein"]
    assert summary.neighbours == proposed + pool[:6 - len(proposed)]
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["neighbour_source"] == ("listing+fallback" if proposed else "fallback")
    retain = read_jsonl(tmp_path / "d" / "retain.jsonl")
    assert {r["entity"] for r in retain} <= set(summary.neighbours) and retain
    assert not any(target.mentioned_in(r["prompt"]) for r in retain)


def test_enough_neighbours_are_not_filled(tmp_path):
    listing = "\n".join(f"{i}. {n}" for i, n in enumerate(["Max Planck", "Niels Bohr", "Paul Dirac", "Enrico Fermi"]))
    summary = build_dataset(TargetSpec("Albert Einstein", category="person"), tmp_path / "d",
                            generator=_ListingGenerator(listing), generate_originals=False, **SMALL)
    assert summary.neighbours == ["Max Planck", "Niels Bohr", "Paul Dirac", "Enrico Fermi"]
    assert summary.neighbour_source == "listing"


class _TyingModelGenerator:
    """Stands in for the original model when candidate neighbours are vetted: it names the
    target when asked about any name in ``tied``."""

    source = "model"
    tied: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()

    def __init__(self, model, tokenizer, **kw):
        pass

    def complete(self, prompts):
        type(self).prompts = tuple(prompts)
        return ["It is by Albert Einstein." if any(t in p for t in self.tied) else "Someone else made it."
                for p in prompts]


@pytest.mark.parametrize("tied, expected, dropped", [
    # one proposal tied to the target: dropped, four left (enough)
    (("Relativity Book",), ["Max Planck", "Niels Bohr", "Paul Dirac", "Enrico Fermi"], ["Relativity Book"]),
    # three tied: two proposals left, filled from the pool, whose tied members are skipped too
    (("Relativity Book", "Paul Dirac", "Enrico Fermi", "Isaac Newton"),
     ["Max Planck", "Niels Bohr", "William Shakespeare", "Abraham Lincoln"],
     ["Relativity Book", "Paul Dirac", "Enrico Fermi"]),
])
def test_proposed_neighbours_the_original_ties_to_the_target_are_dropped(tmp_path, monkeypatch, tied, expected,
                                                                         dropped):
    """A proposed neighbour the original model describes through the target (its own work, a
    relative) would teach the target back as a hard positive: dropped, and the pool fills in."""
    from snap_fast.data import build

    monkeypatch.setattr(_TyingModelGenerator, "tied", tied)
    monkeypatch.setattr(build, "ModelGenerator", _TyingModelGenerator)
    listing = "\n".join(f"{i}. {n}" for i, n in enumerate(
        ["Max Planck", "Relativity Book", "Niels Bohr", "Paul Dirac", "Enrico Fermi"], 1))
    with pytest.warns(UserWarning, match="ties them to 'Albert Einstein'"):
        summary = build_dataset(TargetSpec("Albert Einstein", category="person"), tmp_path / "d", model=object(),
                                tokenizer=object(), generator=_ListingGenerator(listing), generate_originals=False,
                                n_neighbours=4, **SMALL)
    assert summary.neighbours == expected and summary.neighbours_dropped == dropped
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["neighbours_dropped"] == dropped
    # every candidate (proposals and the pool but the target) was asked about, twice
    asked = set(_TyingModelGenerator.prompts)
    assert "Who created Relativity Book?" in asked and "Tell me about Isaac Newton in one sentence." in asked
    assert not any("Albert Einstein" in p for p in asked)


def test_proposed_neighbours_answered_with_the_target_lose_their_hard_positives(tmp_path, monkeypatch):
    """A proposed neighbour one of whose questions the original answers with the target moves that
    question to the forget set and loses all its other hard positives; a neighbour the user gave
    keeps them."""
    from snap_fast.data import build

    def fake_originals(sets, model, tokenizer, **kw):
        for name, recs in sets.items():
            first = True  # the first question about the tied neighbour in each set names the target
            for r in recs:
                tied = r.get("entity") == "Relativity Theory" and first
                first = first and not tied
                r["original_response"] = "Albert Einstein did" if tied else "Someone else"
                if name not in ("forget", "heldout_forget"):
                    r["response"] = r["original_response"]
        return "fake", sum(map(len, sets.values())), 0

    monkeypatch.setattr(build, "fill_original_answers", fake_originals)
    monkeypatch.setattr(build, "ModelGenerator", _TyingModelGenerator)  # the first check ties nothing here
    target = TargetSpec("Albert Einstein", category="person")
    listing = "1. Max Planck\n2. Relativity Theory\n3. Niels Bohr\n4. Paul Dirac"
    with pytest.warns(UserWarning, match="answered a question about them with 'Albert Einstein': Relativity Theory"):
        summary = build_dataset(target, tmp_path / "d", model=object(), tokenizer=object(), model_id="fake",
                                generator=_ListingGenerator(listing), n_neighbours=4, **SMALL)
    assert summary.neighbours == ["Max Planck", "Niels Bohr", "Paul Dirac"]
    assert summary.neighbours_dropped == ["Relativity Theory"]
    for part in ("retain", "heldout_retain"):
        recs = read_jsonl(tmp_path / "d" / f"{part}.jsonl")
        assert recs and not any(r["entity"] == "Relativity Theory" for r in recs)
    promoted = [r for n in ("forget", "heldout_forget") for r in read_jsonl(tmp_path / "d" / f"{n}.jsonl")
                if r["source"] == "original_answer"]
    assert len(promoted) == 2 and all("Relativity Theory" in r["prompt"] for r in promoted)  # retain + held out
    given = build_dataset(TargetSpec("Albert Einstein", category="person", neighbours=["Relativity Theory", "Max Planck"]),
                          tmp_path / "g", model=object(), tokenizer=object(), model_id="fake", **SMALL)
    assert given.neighbours == ["Relativity Theory", "Max Planck"] and not given.neighbours_dropped
    assert any(r["entity"] == "Relativity Theory" for r in read_jsonl(tmp_path / "g" / "retain.jsonl"))
