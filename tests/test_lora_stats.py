"""LoRA-delta statistics against dense computations on the materialised ΔW, and the Triton Gram
kernel (under the interpreter) against float64 torch."""

from __future__ import annotations

import math

import pytest
import torch
from lora_models import dense_stats, lora_layers, peft_model
from snap_fast.kernels.lora_gram import MAX_RANK, gram_matrices_triton

from snap_fast.ops.lora_stats import STAT_KEYS, lora_delta_stats


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("arch", "r", "rslora"), [("llama", 1, False), ("gpt2", 4, True), ("llama", 16, True)])
def test_stats_match_dense(arch, r, rslora, backend):
    model = peft_model(arch, r, rslora)
    stats = lora_delta_stats(model, backend=backend)
    layers = lora_layers(model)
    assert set(stats) == {n for n, _ in layers} | {"total"}
    dense = {n: dense_stats(m) for n, m in layers}
    for name, ref in dense.items():
        for key in STAT_KEYS:
            assert stats[name][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (name, key)
    total = stats["total"]
    fro = math.sqrt(sum(d["fro_norm"] ** 2 for d in dense.values()))
    base = math.sqrt(sum(d["base_fro_norm"] ** 2 for d in dense.values()))
    assert total["layers"] == len(layers)
    assert total["fro_norm"] == pytest.approx(fro, rel=1e-5)
    assert total["rel_change"] == pytest.approx(fro / base, rel=1e-5)
    assert total["inner_w0"] == pytest.approx(sum(d["inner_w0"] for d in dense.values()), rel=1e-4, abs=1e-6)
    assert total["spectral_norm"] == pytest.approx(max(d["spectral_norm"] for d in dense.values()), rel=1e-5)
    assert total["row_norm_max"] == pytest.approx(max(d["row_norm_max"] for d in dense.values()), rel=1e-5)
    mean_rows = sum(d["row_norm_mean"] * d["rows"] for d in dense.values()) / sum(d["rows"] for d in dense.values())
    assert total["row_norm_mean"] == pytest.approx(mean_rows, rel=1e-5)
    assert total["effective_rank"] == pytest.approx(
        sum(d["effective_rank"] for d in dense.values()) / len(dense), rel=1e-4
    )
    assert 1.0 - 1e-6 <= min(d["effective_rank"] for d in dense.values()) and total["effective_rank"] <= r + 1e-6


def test_zero_delta_at_peft_init_and_cached_base_norm():
    model = peft_model("llama", 4, False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_A" in n:
                p.zero_()  # PEFT's own init: ΔW = 0, rank-deficient factors
    stats = lora_delta_stats(model, with_base=False)
    for name, s in stats.items():
        assert s["fro_norm"] == 0 and s["spectral_norm"] == 0 and s["effective_rank"] == 0, name
        assert math.isnan(s["inner_w0"])
    # ‖W0‖_F is cached per base weight; an in-place change of the base is noticed.
    name, module = lora_layers(model)[1]
    with torch.no_grad():
        module.get_base_layer().weight.mul_(2.0)
    again = lora_delta_stats(model, with_base=False)
    assert again[name]["base_fro_norm"] == pytest.approx(2 * stats[name]["base_fro_norm"], rel=1e-6)


def test_stats_bad_input():
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora_delta_stats(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="model"):
        lora_delta_stats("not a model")
    with pytest.raises(ValueError, match="backend"):
        lora_delta_stats(peft_model("llama", 2, False), backend="cuda")


@pytest.mark.parametrize("chunk_rows", [32, 4096])
def test_gram_kernel_matches_float64_with_poisoned_partials(chunk_rows):
    g = torch.Generator().manual_seed(1)
    mats = [
        torch.randn(70, 4, generator=g),  # row-major thin factor (U)
        torch.randn(3, 100, generator=g).t(),  # transposed contiguous factor (Vᵀ)
        torch.randn(33, 16, generator=g).to(torch.bfloat16),
        torch.randn(5, 1, generator=g),
        torch.randn(40, 64, generator=g)[::2],  # strided rows, rank at the limit
    ]
    r_pad = 64
    n_chunks = sum(-(-x.shape[0] // chunk_rows) for x in mats)
    partials = torch.full((n_chunks, r_pad, r_pad), float("nan"))
    grams = gram_matrices_triton(mats, chunk_rows=chunk_rows, partials=partials)
    assert not torch.isnan(partials).any()  # every element written, padding included
    for x, gram in zip(mats, grams):
        x64 = x.double()
        assert gram.dtype == torch.float32 and gram.shape == (x.shape[1], x.shape[1])
        torch.testing.assert_close(gram.double(), x64.t() @ x64, rtol=1e-5, atol=1e-4)


def test_gram_kernel_bad_input():
    with pytest.raises(ValueError, match="mats"):
        gram_matrices_triton([])
    with pytest.raises(ValueError, match="rank"):
        gram_matrices_triton([torch.randn(4, MAX_RANK + 1)])
    with pytest.raises(TypeError, match=r"mats\[0\]"):
        gram_matrices_triton([torch.randint(0, 3, (4, 2))])
    with pytest.raises(ValueError, match="chunk_rows"):
        gram_matrices_triton([torch.randn(4, 2)], chunk_rows=33)
    with pytest.raises(ValueError, match="partials"):
        gram_matrices_triton([torch.randn(4, 2)], partials=torch.empty(1, 8, 8))
