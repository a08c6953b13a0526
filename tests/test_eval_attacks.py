"""Attacks on an unlearned model (snap_fast.eval.attacks): the quantizer against hand-computed
values and its guarantees, and ``snap-fast eval --attacks quant`` end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from snap_fast.eval.attacks import parse_attacks, quantize_linear_weights_
from tests.eval_helpers import one_thread, write_data_folder  # noqa: F401
from tests.helpers import make_tiny_llama, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_round_to_nearest_per_group_by_hand():
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.7, 0.26, -0.3, 0.35], [0.0, 0.0, 1.4, -0.05]]))
    assert quantize_linear_weights_(layer, bits=4, group_size=2) == 1
    # 4 bits: levels ±7; group scales max|w|/7 = 0.1, 0.05, 0 (a zero group stays 0), 0.2
    # 0.26/0.1 = 2.6 -> 3; -0.3/0.05 = -6; 0.35/0.05 = 7; -0.05/0.2 = -0.25 -> 0
    want = torch.tensor([[0.7, 0.3, -0.3, 0.35], [0.0, 0.0, 1.4, 0.0]])
    torch.testing.assert_close(layer.weight.detach(), want, rtol=0, atol=1e-6)
    before = layer.weight.detach().clone()
    quantize_linear_weights_(layer, bits=4, group_size=2)  # idempotent: already on the grid
    torch.testing.assert_close(layer.weight.detach(), before, rtol=0, atol=1e-6)


def test_error_within_half_a_step_and_smaller_with_more_bits():
    torch.manual_seed(0)
    weights = torch.randn(8, 64)
    errors = {}
    for bits in (8, 4, 2):
        layer = torch.nn.Linear(64, 8, bias=False)
        with torch.no_grad():
            layer.weight.copy_(weights)
        quantize_linear_weights_(layer, bits=bits, group_size=16)
        step = weights.reshape(8, 4, 16).abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        err = (layer.weight.detach() - weights).reshape(8, 4, 16).abs()
        assert (err <= step / 2 + 1e-7).all(), bits
        errors[bits] = float(err.max())
    assert errors[8] < errors[4] < errors[2]


def test_quantizer_refuses_bad_settings_before_changing_anything():
    model, _ = make_tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    hidden = model.config.hidden_size
    for kwargs, exc, pattern in [
        ({"bits": 1, "group_size": 8}, ValueError, "bits"),
        ({"bits": 9, "group_size": 8}, ValueError, "bits"),
        ({"bits": 4, "group_size": 0}, ValueError, "group_size"),
        ({"bits": 4, "group_size": hidden + 1}, ValueError, "does not divide"),
        ({"bits": 4.5, "group_size": 8}, TypeError, "bits"),
    ]:
        with pytest.raises(exc, match=pattern):
            quantize_linear_weights_(model, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge"):
        quantize_linear_weights_(peft_model, bits=4, group_size=8)
    assert parse_attacks("all") == ["quant", "relearn", "prompts", "mia"] and parse_attacks(None) == []
    assert parse_attacks("mia, quant,mia") == ["mia", "quant"]
    with pytest.raises(ValueError, match="--attacks"):
        parse_attacks("quant,jailbreak")


def test_eval_cli_runs_the_quantization_attack(tmp_path, capsys):
    from snap_fast.cli import main
    from snap_fast.eval.report import build_report

    folder = save_tiny_model(tmp_path / "model")
    data = write_data_folder(tmp_path / "data")
    args = ["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "3", "--limit", "2", "--quiet",
            "--sets", "heldout_forget", "heldout_retain"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "attacked"), "--attacks", "quant", "--quant-bits", "8", "2",
                 "--quant-group-size", "16"]) == 0
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    attacked = json.loads((tmp_path / "attacked" / "summary.json").read_text())
    assert attacked["headline"] == plain["headline"]  # the attack evaluates a copy, after the model itself
    quant = attacked["attacks"]["quant"]
    assert quant["group_size"] == 16 and set(quant["settings"]) == {"8bit", "2bit"}
    for setting in quant["settings"].values():
        assert setting["quantized_tensors"] > 0 and 0.0 <= setting["retain_rougeL_recall"] <= 1.0
    assert (tmp_path / "attacked" / "quant_2bit_g16" / "samples.jsonl").is_file()
    paths = build_report(tmp_path / "report", tmp_path / "attacked", tmp_path / "attacked")
    assert "Quantization (--attacks quant)" in paths["md"].read_text() and "2bit, groups of 16" in paths["md"].read_text()
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--attacks", "quant", "--quant-group-size", "7"]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "bad"), "--attacks", "quant,bogus"]) == 2
    assert "unknown attack(s) ['bogus']" in capsys.readouterr().err


def test_relearning_attack_recovers_the_original_answers_on_a_tiny_model(tmp_path):
    # A tiny model relearns its training examples quickly: the fine-tuned copy's answers to the
    # relearned questions move towards the original answers, the model itself is unchanged.
    from snap_fast.eval.attacks import relearning_attack
    from snap_fast.io import read_jsonl

    model, tokenizer = make_tiny_llama()
    data = write_data_folder(tmp_path / "data")
    before = [p.detach().clone() for p in model.parameters()]
    forget = [r for r in read_jsonl(data / "forget.jsonl") if isinstance(r.get("original_response"), str)]
    result = relearning_attack(model, tokenizer, data, tmp_path / "out", identity="tiny", steps=[40, 0],
                               n_examples=2, lr=1e-2, evaluate_kwargs={"max_new_tokens": 6, "progress": False},
                               log=lambda _: None)
    assert list(result["steps"]) == ["0", "40"] and result["n_examples"] == min(2, len(forget))
    # the relearned answer ("Harry Potter is a wizard at Hogwarts.") now comes out for the
    # held-out questions too (which never name the target): pieces of it, some naming the target
    answers = [r["answer"].strip() for r in read_jsonl(tmp_path / "out" / "relearn_40steps" / "samples.jsonl")]
    assert answers and all(a and a in "Harry Potter is a wizard at Hogwarts." for a in answers), answers
    assert result["steps"]["0"]["leak_rate"] == 0.0 < result["steps"]["40"]["leak_rate"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="steps"):
        relearning_attack(model, tokenizer, data, tmp_path / "x", identity="tiny", steps=[-1])
    with pytest.raises(ValueError, match="lr"):
        relearning_attack(model, tokenizer, data, tmp_path / "x", identity="tiny", lr=0.0)


def test_library_quantizer_is_per_channel_int8_and_checked_first(tmp_path):
    pytest.importorskip("torchao")
    from snap_fast.eval.attacks import check_library_quantizer, quantize_with_library_

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False))
    weights = model[0].weight.detach().clone()
    x = torch.randn(5, 32)
    assert quantize_with_library_(model, "torchao-int8") == 1
    # symmetric int8 per output channel: the quantized layer computes x (scale_i * round(w_ij / scale_i))^T
    # with scale_i = max_j |w_ij| / 127 (torchao's choice; its scale may differ by rounding of the
    # divisor, so the product is compared within one quantization step's effect)
    scale = weights.abs().amax(dim=1, keepdim=True) / 127
    want = x @ (torch.round(weights / scale).clamp(-127, 127) * scale).T
    got = model(x)
    step_effect = (x.abs() @ (scale.expand_as(weights) / 2).T)  # bound on a half-step error per weight
    assert ((got - want).abs() <= step_effect + 1e-5).all()
    assert (got - x @ weights.T).abs().max() > 0  # it did quantize
    with pytest.raises(ValueError, match="--quant-library"):
        check_library_quantizer("bitsandbytes-nf4")
    from peft import LoraConfig, get_peft_model

    tiny, _ = make_tiny_llama()
    with pytest.raises(ValueError, match="merge"):
        quantize_with_library_(get_peft_model(tiny, LoraConfig(r=2, target_modules=["q_proj"])), "torchao-int8")


def test_eval_cli_adds_the_library_quantizer(tmp_path, capsys):
    pytest.importorskip("torchao")
    from snap_fast.cli import main

    folder = save_tiny_model(tmp_path / "model")
    data = write_data_folder(tmp_path / "data")
    args = ["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "3", "--limit", "2", "--quiet",
            "--sets", "heldout_forget", "heldout_retain", "--attacks", "quant", "--quant-bits", "8",
            "--quant-group-size", "16"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--quant-library", "gptq"]) == 2
    assert "--quant-library: unknown quantizer 'gptq'" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "summary.json").exists()  # refused before any evaluation
    assert main([*args, "--out", str(tmp_path / "attacked"), "--quant-library", "torchao-int8"]) == 0
    quant = json.loads((tmp_path / "attacked" / "summary.json").read_text())["attacks"]["quant"]
    assert list(quant["settings"]) == ["8bit", "torchao-int8"]
    assert quant["settings"]["torchao-int8"]["quantized_tensors"] > 0
    assert "torchao" in quant["settings"]["torchao-int8"]["scheme"]
    assert (tmp_path / "attacked" / "quant_torchao-int8" / "samples.jsonl").is_file()
