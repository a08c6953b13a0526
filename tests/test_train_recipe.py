"""The unlearning recipe end to end on tiny random models (CPU, a few seconds each)."""

import json
import math
import os
import signal

import pytest
import torch

from snap_fast.train import NonFiniteLossError, UnlearnConfig, unlearn
from snap_fast.train.checkpoint import last_checkpoint, list_checkpoints
from tests.helpers import save_tiny_model, update_relative_error
from tests.train_data import FORGET, RETAIN, write_data_folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "llama": str(save_tiny_model(root / "llama", "llama")),
        "gpt2": str(save_tiny_model(root / "gpt2", "gpt2")),
        "data": str(write_data_folder(root / "data")),
    }


def _config(assets, out, **overrides):
    values = {"model": assets["llama"], "data": assets["data"], "out": str(out), "batch_size": 4, "grad_accum": 1,
                  "n_projections": 16, "reg_backend": "torch", "progress": False}
    values.update(overrides)
    return UnlearnConfig(**values)


def _metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]


# Two runs that do the same computation in a different order (a cached vs recomputed reference,
# the LM head on a window vs every position) differ by fp32 rounding in every gradient; through
# AdamW that gives updates agreeing to ~1e-6 relative, plus the rare element whose gradient is at
# rounding level and takes a step of up to lr in one run only (see update_relative_error). A
# real difference (a dropped or extra loss position) changes the losses at rel >> 1e-4 and the
# update at O(1e-1) or more.
UPDATE_BOUND = 1e-3


def _lora_updates(adapter):
    """{module: B @ A} of a saved PEFT adapter state (the update up to LoRA's constant scale)."""
    return {key.replace(".lora_A.weight", ""): adapter[key.replace("lora_A", "lora_B")].double() @ value.double()
            for key, value in adapter.items() if key.endswith(".lora_A.weight")}


def _set_nll(model, tokenizer, pairs):
    """Mean over examples of the HF model's own loss (token mean of the answer) — independent of
    snap_fast.train.losses; uses the same prompt rendering as training."""
    from snap_fast.data.collator import ChatCollator

    collator = ChatCollator(tokenizer)
    total = 0.0
    with torch.no_grad():
        for prompt, response in pairs:
            batch = collator([{"prompt": prompt, "response": response}])
            total += float(model(**batch).loss)
    return total / len(pairs)


def test_snap_moves_forget_answers_to_obliterated_and_keeps_hard_positives(assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.train_data import OBLITERATED

    result = unlearn(_config(assets, tmp_path / "run", lora=False, lr=1e-2, max_steps=30, lam=0.1))
    assert result.status == "completed" and result.steps == 30
    original = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final" / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    forget_idk = [(p, OBLITERATED[i % len(OBLITERATED)]) for i, (p, _) in enumerate(FORGET)]
    before, after = _set_nll(original, tokenizer, forget_idk), _set_nll(trained, tokenizer, forget_idk)
    # Stated margin: the obliterated responses' NLL falls by at least 1.5 nats (from ~6.0).
    assert after < before - 1.5, (before, after)
    # Stated bound: the hard positives' NLL does not rise by more than 0.1 nats.
    retain_before, retain_after = _set_nll(original, tokenizer, RETAIN), _set_nll(trained, tokenizer, RETAIN)
    assert retain_after <= retain_before + 0.1, (retain_before, retain_after)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("lr", "loss", "loss_forget", "loss_retain", "loss_general", "reg", "reg_weighted", "tokens_per_s"):
        assert rows[-1][key] is not None, key
    assert rows[-1]["reg_weighted"] == pytest.approx(0.1 * rows[-1]["reg"])
    assert rows[0]["lr"] == pytest.approx(1e-2) and rows[-1]["lr"] < rows[0]["lr"]  # linear decay
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30


def _distance_from_init(assets, run_dir):
    from transformers import AutoModelForCausalLM

    original = dict(AutoModelForCausalLM.from_pretrained(assets["llama"]).named_parameters())
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "final" / "merged")
    return sum(float((p - original[n]).square().sum()) for n, p in trained.named_parameters())


def test_regularizer_keeps_weights_closer_to_init(assets, tmp_path):
    # the objective this property is stated for: α = 1, NLL retain term (with the KL term
    # at α = 20 the same 8 steps measured a ratio of 0.61 here: 8.4 against 13.8)
    common = {"lora": False, "lr": 1e-2, "max_steps": 8, "method": "snap", "reg_mode": "resample",
              "alpha": 1.0, "retain_loss": "nll"}
    unlearn(_config(assets, tmp_path / "free", lam=0.0, **common))
    unlearn(_config(assets, tmp_path / "reg", lam=1000.0, **common))
    free, reg = _distance_from_init(assets, tmp_path / "free"), _distance_from_init(assets, tmp_path / "reg")
    assert reg < 0.5 * free, (reg, free)
    assert _metrics(tmp_path / "free")[-1]["reg"] is None  # λ = 0: no regularizer built


@pytest.mark.parametrize("lora", [True, False])
def test_regularizer_gradient_norm_is_logged_and_scales_with_lambda(assets, tmp_path, lora):
    # At step 1 the weights are the initial ones in both runs, so the regularizer's gradient is
    # the same and ‖λ ∇SWD‖ scales exactly with λ; its share is that norm over the step's norm.
    common = {"lora": lora, "lr": 1e-3, "max_steps": 2, "method": "snap", "reg_mode": "fixed"}
    unlearn(_config(assets, tmp_path / "a", lam=0.5, **common))
    unlearn(_config(assets, tmp_path / "b", lam=2.0, **common))
    first_a, first_b = _metrics(tmp_path / "a")[0], _metrics(tmp_path / "b")[0]
    # SWD(W0, W0) is 0 at step 1 up to rounding; step 2 has moved weights, a real gradient
    second_a = _metrics(tmp_path / "a")[1]
    assert second_a["reg_grad_norm"] > 0
    assert second_a["reg_grad_share"] == pytest.approx(second_a["reg_grad_norm"] / second_a["grad_norm"])
    assert first_b["reg_grad_norm"] == pytest.approx(4 * first_a["reg_grad_norm"], rel=1e-5, abs=1e-12)
    free = _config(assets, tmp_path / "free", lam=0.0, **common)
    unlearn(free)
    assert _metrics(tmp_path / "free")[0]["reg_grad_norm"] is None


def test_resume_gives_identical_losses(assets, tmp_path):
    # GPT-2 has dropout, so identical losses also need the restored RNG states; 2 micro-batches
    # per step and 2 steps per epoch cover accumulation and epoch boundaries.
    common = {"model": assets["gpt2"], "max_steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "lam": 0.1}
    straight = unlearn(_config(assets, tmp_path / "straight", **common))
    assert straight.status == "completed"

    def interrupt_at_3(step, metrics, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag

    first = unlearn(_config(assets, tmp_path / "resumed", **common), on_step=interrupt_at_3)
    assert (first.status, first.steps, first.signal, first.exit_code) == ("interrupted", 3, "SIGINT", 130)
    assert first.checkpoint.name == "step-3"
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["status"] == "interrupted"
    with pytest.raises(ValueError, match="already exists"):
        unlearn(_config(assets, tmp_path / "resumed", **common))
    second = unlearn(_config(assets, tmp_path / "resumed", resume=True, **common))
    assert second.status == "completed" and second.steps == 6
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_forget", "loss_retain", "reg", "lr", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    with pytest.raises(ValueError, match="differs"):
        unlearn(_config(assets, tmp_path / "resumed", resume=True, **{**common, "lam": 0.5}))


def test_sigint_checkpoint_loads_with_peft(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def interrupt(step, metrics, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    result = unlearn(_config(assets, tmp_path / "run", max_steps=50, save_every=1, keep_checkpoints=1),
                     on_step=interrupt)
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    assert (result.status, result.steps, result.exit_code) == ("interrupted", 2, 143)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]  # keep_checkpoints=1
    base = AutoModelForCausalLM.from_pretrained(assets["llama"])
    model = PeftModel.from_pretrained(base, result.checkpoint / "adapter")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
    def poison(step, metrics, model):
        if step == 2:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        unlearn(_config(assets, tmp_path / "run", max_steps=10, save_every=1, keep_checkpoints=0),
                on_step=poison)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step 3" in summary["error"]


@pytest.mark.parametrize("method, extra", [
    ("snap-npo", {"lora": False, "lam": 0.1}), ("npo", {"lora": False}), ("ga", {}), ("grad-diff", {"precision": "bf16"}),
    ("idk", {}), ("snap", {}),
])
def test_every_method_runs_and_logs_its_terms(assets, tmp_path, method, extra):
    result = unlearn(_config(assets, tmp_path / method, method=method, max_steps=2, lr=1e-3, **extra))
    rows = _metrics(tmp_path / method)
    assert result.status == "completed" and len(rows) == 2
    assert all(r["loss"] == r["loss"] for r in rows)  # finite (not NaN)
    if extra.get("lora", True):
        assert rows[-1]["lora/fro_norm"] > 0  # LoRA-delta statistics at the last step
        # ... and per layer: the total Frobenius norm is the per-layer ones in quadrature.
        per_layer = [v for k, v in rows[-1].items() if k.startswith("lora/") and k.count("/") >= 2 and k.endswith("/fro_norm")]
        assert len(per_layer) == rows[-1]["lora/layers"] > 0
        assert sum(v * v for v in per_layer) ** 0.5 == pytest.approx(rows[-1]["lora/fro_norm"], rel=1e-6)
    else:
        assert not any(k.startswith("lora/") for k in rows[-1])
    if method in ("npo", "snap-npo"):
        # At step 1 the model is still the reference: NPO = (2/β)·log 2.
        assert rows[0]["loss_forget"] == pytest.approx(20 * 0.6931471805599453, rel=1e-4)
    if method == "snap-npo":  # alternating forget / retain steps; λ = 0.1 given, so the regularizer is built
        assert rows[1]["loss_forget"] is None and rows[1]["loss_retain"] is not None
        assert rows[0]["reg"] is not None
    if method in ("ga", "grad-diff"):
        assert rows[0]["loss_forget"] < 0
    if method in ("ga", "npo"):
        assert rows[0]["loss_retain"] is None
    if method in ("idk", "snap"):  # every method's default λ is 0: no regularizer is built
        assert rows[0]["reg"] is None


def test_merged_model_and_adapter_load_back(assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    unlearn(_config(assets, tmp_path / "run", max_steps=3, lr=5e-2, merge=True, gradient_checkpointing=True))
    final = tmp_path / "run" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["llama"]), final / "adapter").eval()
    ids = torch.tensor([[5, 9, 17, 30]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()
        assert not torch.allclose(base(input_ids=ids).logits, merged(input_ids=ids).logits)
    assert (final / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_layers_adapt_only_the_chosen_decoder_layers(assets, tmp_path, kind):
    """``lora_layers="1"`` on a 2-layer model: adapters (every linear module "all-linear" would
    adapt) only in layer 1, and they train; an index past the last layer is refused by name."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    layer_of = {"llama": "layers.{}.", "gpt2": "h.{}."}[kind]
    everywhere = tmp_path / "all"
    unlearn(_config(assets, everywhere, model=assets[kind], max_steps=2, lr=5e-2))
    result = unlearn(_config(assets, tmp_path / "run", model=assets[kind], max_steps=2, lr=5e-2, lora_layers="1"))
    assert result.status == "completed"
    # a fraction counts from the top: the upper half of 2 layers is layer 1
    unlearn(_config(assets, tmp_path / "half", model=assets[kind], max_steps=2, lr=5e-2, lora_layers=0.5))

    def adapted_modules(run):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets[kind]), run / "final" / "adapter")
        return {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}, model

    all_modules, _ = adapted_modules(everywhere)
    modules, model = adapted_modules(tmp_path / "run")
    assert adapted_modules(tmp_path / "half")[0] == modules
    assert modules and all(layer_of.format(1) in n for n in modules)
    assert modules == {n for n in all_modules if layer_of.format(1) in n}  # the same module kinds
    moved = {n for n, p in model.named_parameters() if "lora_B" in n and p.abs().max() > 0}
    assert moved and all(layer_of.format(1) in n for n in moved)
    with pytest.raises(ValueError, match=r"lora_layers: \[2\] out of range; the model has 2 decoder layers \(0-1\)"):
        unlearn(_config(assets, tmp_path / "bad", model=assets[kind], max_steps=1, lora_layers=[1, 2]))
    assert not (tmp_path / "bad").exists()  # refused before the run folder: the corrected rerun may use it
    assert unlearn(_config(assets, tmp_path / "bad", model=assets[kind], max_steps=1, lora_layers=[1])).status == "completed"


def test_tokenizer_without_pad_token_is_handled(assets, tmp_path):
    folder = save_tiny_model(tmp_path / "nopad", "gpt2", pad_token=False)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    result = unlearn(_config(assets, tmp_path / "run", model=str(folder), max_steps=1))
    assert result.status == "completed"
    assert last_checkpoint(tmp_path / "run").name == "step-1"


def _toy_sets() -> tuple[list[dict], list[dict], list[dict]]:
    """10 forget, 7 retain and 3 general examples, named by set and index."""
    forget = [{"prompt": f"f{i}", "response": "no"} for i in range(10)]
    retain = [{"prompt": f"r{i}", "response": "yes"} for i in range(7)]
    general = [{"prompt": f"g{i}", "response": "ok"} for i in range(3)]
    return forget, retain, general


def test_retain_batch_size_draws_more_hard_positives_per_step():
    from snap_fast.train.batches import UnlearnData

    forget, retain, general = _toy_sets()

    def data(rbs):
        return UnlearnData(forget, retain, general, forget_key="response", batch_size=4, grad_accum=1, seed=0,
                           retain_batch_size=rbs)

    wide = data(8)
    micro = [mb for step in range(3) for mb in wide.micro_batches(step)]
    # forget 4, 4, 2 per micro-batch; retain and general twice as many (20 drawn per epoch)
    assert [(len(m["forget"]), len(m["retain"]), len(m["general"])) for m in micro] == [(4, 8, 8), (4, 8, 8), (2, 4, 4)]
    drawn = [r["prompt"] for m in micro for r in m["retain"]]
    for start in (0, 7):  # cycles through the retain set: every pass is a permutation
        assert sorted(drawn[start:start + 7]) == sorted(r["prompt"] for r in retain)
    assert sorted(r["prompt"] for m in micro for r in m["forget"]) == sorted(r["prompt"] for r in forget)
    # None means the forget batch size, with the very same order
    def prompts(d):
        return [[r["prompt"] for name in ("forget", "retain", "general") for r in mb[name]]
                for step in range(3) for mb in d.micro_batches(step)]

    assert prompts(data(None)) == prompts(data(4))


def test_general_batch_size_is_independent_of_the_retain_batch_size():
    from snap_fast.train.batches import UnlearnData

    forget, retain, general = _toy_sets()

    def data(gbs):
        return UnlearnData(forget, retain, general, forget_key="response", batch_size=4, grad_accum=1, seed=0,
                           retain_batch_size=8, general_batch_size=gbs)

    narrow = data(2)
    micro = [mb for step in range(3) for mb in narrow.micro_batches(step)]
    assert [(len(m["forget"]), len(m["retain"]), len(m["general"])) for m in micro] == [(4, 8, 2), (4, 8, 2), (2, 4, 1)]
    # 5 general examples per epoch (10 forget × 2/4): the first pass is a permutation of all 3
    drawn = [r["prompt"] for m in micro for r in m["general"]]
    assert len(drawn) == 5 and sorted(drawn[:3]) == sorted(r["prompt"] for r in general)
    # indices match the examples, and the retain draw is the one of the default (general = retain)
    for m in micro:
        assert [general[i]["prompt"] for i in m["general_idx"]] == [r["prompt"] for r in m["general"]]
    default = [mb for step in range(3) for mb in data(None).micro_batches(step)]
    assert [len(m["general"]) for m in default] == [8, 8, 4]
    assert [[r["prompt"] for r in m["retain"]] for m in micro] == [[r["prompt"] for r in m["retain"]] for m in default]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_retain_term_starts_at_zero_and_holds_the_original_distribution(assets, tmp_path, lora):
    """retain_loss="kl": 0 at the first step (the model is the original: adapter at B = 0, or
    the frozen copy), then positive (so the reference really is the original model, not the
    adapted one); with α = 10 the retain answers' distributions stay closer to the original
    model's than with α = 0 (measured independently with the HF models). The tiny LoRA model
    moves too little in 6 steps for the second check to be meaningful, so it runs on full FT."""
    from transformers import AutoModelForCausalLM

    from snap_fast.data.collator import ChatCollator
    from tests.train_data import GENERAL

    common = {"lora": lora, "lr": 5e-2 if lora else 1e-2, "max_steps": 6, "retain_loss": "kl",
              "retain_batch_size": 6, "lam": 0.0, "merge": lora}
    kept = unlearn(_config(assets, tmp_path / "kept", alpha=10.0, **common))
    assert kept.status == "completed"
    steps = _metrics(tmp_path / "kept")
    assert steps[0]["loss_retain"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["loss_general"] == pytest.approx(0.0, abs=1e-6)
    assert max(m["loss_retain"] for m in steps[1:]) > 0

    original = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()

    def kl_to_original(run):
        model = AutoModelForCausalLM.from_pretrained(run / "final" / "merged").eval()
        from transformers import AutoTokenizer

        collator = ChatCollator(AutoTokenizer.from_pretrained(run / "final"))
        batch = collator([{"prompt": p, "response": r} for p, r in RETAIN + GENERAL])
        with torch.no_grad():
            log_q = torch.log_softmax(original(**batch).logits.double(), -1)
            log_p = torch.log_softmax(model(**batch).logits.double(), -1)
        mask = batch["labels"][:, 1:] != -100
        per_pos = (log_q.exp() * (log_q - log_p)).sum(-1)[:, :-1]
        return float(per_pos[mask].mean())

    if not lora:
        unlearn(_config(assets, tmp_path / "free", alpha=0.0, use_general=False, **common))
        assert kl_to_original(tmp_path / "kept") < 0.5 * kl_to_original(tmp_path / "free")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_reference_cache_matches_the_per_step_original_forward(assets, tmp_path, lora):
    """The original's answer log-probabilities cached before training (default) and the
    original model run on every batch (``reference_cache_gib=0``: adapter disabled, or a frozen
    copy for full FT) give the same losses at every step and the same trained weights."""
    from safetensors.torch import load_file

    common = {"lora": lora, "lr": 5e-2 if lora else 1e-2, "max_steps": 4, "retain_loss": "kl",
              "retain_batch_size": 6, "alpha": 10.0, "lam": 0.0}
    for name, gib in (("cached", 2.0), ("per_step", 0.0)):
        assert unlearn(_config(assets, tmp_path / name, reference_cache_gib=gib, **common)).status == "completed"
    cached, per_step = _metrics(tmp_path / "cached"), _metrics(tmp_path / "per_step")
    assert max(m["loss_retain"] for m in cached[1:]) > 1e-4  # the term is live, not trivially equal
    for a, b in zip(cached, per_step, strict=True):
        for key in ("loss_forget", "loss_retain", "loss_general"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)
    weights = "adapter/adapter_model.safetensors" if lora else "merged/model.safetensors"
    wa, wb = (load_file(tmp_path / run / "final" / weights) for run in ("cached", "per_step"))
    if lora:  # the adapters' initial A is not saved: compare the weight updates B·A (B starts at 0)
        wa, wb = _lora_updates(wa), _lora_updates(wb)
        initial = {key: torch.zeros_like(value) for key, value in wa.items()}
    else:
        initial = load_file(os.path.join(assets["llama"], "model.safetensors"))
    assert update_relative_error(wa, wb, initial) < UPDATE_BOUND


def test_answer_window_keeps_every_position_a_loss_reads():
    from snap_fast.train.original import answer_window

    labels = torch.full((2, 9), -100)
    labels[0, 5:8] = 7  # answer tokens at 5..7, predicted from positions 4..6
    labels[1, 3:5] = 7  # the earliest answer token: position 3, predicted from position 2
    assert answer_window(labels) == 9 - 2
    assert answer_window(torch.full((2, 4), -100)) == 4  # no answer: keep everything


@pytest.mark.parametrize("cache_gib", [0.0, 2.0], ids=["per_step", "cached"])
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_logits_on_the_answer_window_give_the_whole_sequence_results(assets, tmp_path, monkeypatch, model,
                                                                      cache_gib):
    """The LM head on the answer window only (``logits_to_keep``) vs on every position: the same
    losses at every step and the same trained weights (NLL forget; KL retain against the
    original run per step, or against its log-probabilities cached before training)."""
    from safetensors.torch import load_file

    from snap_fast.train import original

    common = {"model": assets[model], "lora": False, "lr": 1e-2, "max_steps": 3, "retain_loss": "kl",
              "reference_cache_gib": cache_gib, "alpha": 5.0, "lam": 0.1}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from snap_fast.data.collator import ChatCollator

    assert original.accepts_logits_to_keep(AutoModelForCausalLM.from_pretrained(assets[model]))
    labels = ChatCollator(AutoTokenizer.from_pretrained(assets[model]))(
        [{"prompt": p, "response": r} for p, r in RETAIN])["labels"]
    assert original.answer_window(labels) < labels.shape[1] - 3  # the window really drops positions
    unlearn(_config(assets, tmp_path / "window", **common))
    monkeypatch.setattr(original, "accepts_logits_to_keep", lambda model: False)
    unlearn(_config(assets, tmp_path / "whole", **common))
    for a, b in zip(_metrics(tmp_path / "window"), _metrics(tmp_path / "whole"), strict=True):
        for key in ("loss_forget", "loss_retain", "loss_general", "reg"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)
    wa, wb = (load_file(tmp_path / run / "final" / "merged" / "model.safetensors") for run in ("window", "whole"))
    assert update_relative_error(wa, wb, load_file(os.path.join(assets[model], "model.safetensors"))) < UPDATE_BOUND


def test_l2sp_regularizer_kind_runs_and_is_refused_under_fsdp(assets, tmp_path):
    unlearn(_config(assets, tmp_path / "l2sp", lora=True, max_steps=2, lam=10.0, reg_kind="l2sp"))
    metrics = _metrics(tmp_path / "l2sp")
    assert metrics[0]["reg"] == 0.0 and metrics[1]["reg"] > 0  # B = 0 at init: ΔW = 0, then it moves
    with pytest.raises(ValueError, match="l2sp"):
        _config(assets, tmp_path / "x", reg_kind="l2sp", parallel="fsdp").validate(run_folder=False)


def test_steps_follow_the_data_with_a_floor(assets, tmp_path):
    """epochs x steps per epoch, raised to min_steps; max_steps overrides both."""
    from snap_fast.train.recipe import UnlearnRecipe

    def total(name, **kw):
        return UnlearnRecipe(_config(assets, tmp_path / name, **kw)).setup().total_steps

    from_data = total("a", min_steps=0, epochs=2.0)
    per_epoch = UnlearnRecipe(_config(assets, tmp_path / "b", min_steps=0)).setup().data.steps_per_epoch
    assert from_data == math.ceil(2.0 * per_epoch) and from_data < 60
    assert total("c", epochs=2.0) == 60  # the default floor
    assert total("d", min_steps=from_data - 1, epochs=2.0) == from_data  # a floor below the rule: no effect
    assert total("e", max_steps=3) == 3
    with pytest.raises(ValueError, match="min_steps"):
        _config(assets, tmp_path / "f", min_steps=-1).validate()
