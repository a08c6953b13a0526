"""benchmarks/bench_train.py: the measurement logic on tiny shapes (CPU)."""

import pytest
import torch

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_train")


def _llama_params(c: dict) -> int:
    h, inter, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    kv_width = kv * h // heads
    layer = 2 * h * h + 2 * h * kv_width + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; 2 norms
    embeddings = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    return c["num_hidden_layers"] * layer + embeddings + h


def test_shapes_match_the_published_models(bench):
    assert round(_llama_params(bench.SHAPES["smollm2-135m"]) / 1e6, 1) == 134.5  # SNAP.md §5
    assert round(_llama_params(bench.SHAPES["llama-3.1-8b"]) / 1e9, 2) == 8.03
    model = bench.build_lora_model("tiny", r=2, device="cpu", dtype=torch.float32)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert base == _llama_params(bench.SHAPES["tiny"])


def test_measure_overhead_rows(bench):
    model = bench.build_lora_model("tiny", r=4, device="cpu", dtype=torch.float32)
    batch = bench.make_batch(256, 2, 8, "cpu")
    assert (batch["labels"][:, :4] == -100).all() and (batch["labels"][:, 4:] >= 0).all()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = bench.measure_overhead(model, batch, modes=["resample", "fixed"], steps=2, warmup=1,
                                  n_projections=8, backend="torch")
    assert [r["variant"] for r in rows] == ["no regularizer", "λ·SWD resample", "λ·SWD fixed"]
    plain = rows[0]
    assert plain["overhead_pct"] == 0.0
    for r in rows:
        assert r["median_ms"] > 0 and r["peak_mib"] > 0
        assert r["tokens_per_s"] == pytest.approx(16 / (r["median_ms"] / 1e3))
        assert r["overhead_pct"] == pytest.approx(100 * (r["median_ms"] / plain["median_ms"] - 1))
    # LoRA training only: the base weights never change.
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    table = bench.to_markdown(rows, 15.0)
    assert table.count("\n") == 4 and "λ·SWD fixed" in table
    with pytest.raises(ValueError, match="steps"):
        bench.measure_overhead(model, batch, modes=[], steps=0)


def test_gpu_section_runs_on_cpu_tiny(bench):
    text = bench.gpu_section("cpu", tiny=True, steps=1, warmup=0)
    assert "Target: overhead ≤ 5 %" in text and "λ·SWD refresh" in text
