"""Communication of the sharded regularizer under FSDP2, against the bytes of the weights.

For the SmolLM2-135M and Llama-3.1-8B shapes (models built on the ``meta`` device from their
configs: no weights, no download) and several world sizes W, per optimizer step and per rank:

* what :class:`snap_fast.dist.ShardedSlicedWassersteinRegularizer` sends plus receives
  (:func:`snap_fast.dist.predicted_comm_bytes`: two all-to-alls of n_r × L float32
  projections/targets, L floats per 1-D tensor all-reduced, the value) in ``fixed`` mode (and
  ``refresh`` between redraws) and in ``resample`` mode (the initial projections travel too);
* the alternative the design avoided — every rank all-gathers all n × L projections and sorts
  everything redundantly: it receives (W−1)/W · Σ n·L floats;
* the weight bytes (bf16) of the whole model and of one rank's shard, and FSDP2's own traffic
  per step (all-gather for forward and for backward, reduce-scatter of gradients: about
  3 · (W−1)/W · weight bytes per rank, sent plus received counted once each way as for the
  regularizer).

The formula is checked against the bytes counted during real calls on a tiny Llama in
tests/test_distributed.py. Writes the markdown table to ``benchmarks/results/comm.md``
(atomically) and prints it.

    python benchmarks/bench_comm.py [--n-projections 100] [--world-sizes 2,8,64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from snap_fast.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snap_fast.dist import predicted_comm_bytes

MODELS = {
    # SNAP.md §5: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied
    "SmolLM2-135M": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                         "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                         "tie_word_embeddings": True},
    # Llama-3.1-8B: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256
    "Llama-3.1-8B": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                         "tie_word_embeddings": False},
}


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a model (tied tensors once), built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**MODELS[name]))
    return [tuple(p.shape) for p in model.parameters()]


def _fmt(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError("unreachable")


def rows_for(name: str, shapes: list[tuple[int, ...]], L: int, world: int) -> dict:
    """One table row: per-rank bytes of every contender for rank 0 (the largest shard)."""
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    weights_bf16 = 2 * numel
    fixed = predicted_comm_bytes(shapes, L, world, mode="fixed", rank=0)["total"]
    resample = predicted_comm_bytes(shapes, L, world, mode="resample", rank=0)["total"]
    n_total = sum(s[0] if len(s) >= 2 else 1 for s in shapes)
    all_gather = 2 * 4 * L * n_total * (world - 1) // world  # ring all-gather: sent + received
    fsdp = 3 * 2 * weights_bf16 * (world - 1) // world  # sent + received, 3 collectives
    return {
        "model": name, "W": world, "params": numel, "weights": weights_bf16,
        "shard": weights_bf16 // world, "fixed": fixed, "resample": resample,
        "all_gather": all_gather, "fsdp": fsdp,
    }


def render(rows: list[dict], L: int) -> str:
    head = (
        f"# Sharded regularizer: communication per step and rank (L = {L}, float32 projections)\n\n"
        "Computed from the parameter shapes with `snap_fast.dist.predicted_comm_bytes` "
        "(rank 0, sent + received, own share excluded); the formula equals the bytes counted "
        "during real 2-rank calls (tests/test_distributed.py). Weights in bf16. FSDP2's own "
        "traffic: all-gather for forward and backward plus reduce-scatter of gradients.\n\n"
        "| model | W | weights (bf16) | shard per rank | reg fixed | reg resample | all-gather design "
        "| reg fixed / weights | reg fixed / shard | reg fixed / FSDP2 traffic |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['model']} | {r['W']} | {_fmt(r['weights'])} | {_fmt(r['shard'])} | {_fmt(r['fixed'])} | "
        f"{_fmt(r['resample'])} | {_fmt(r['all_gather'])} | {r['fixed'] / r['weights']:.2%} | "
        f"{r['fixed'] / r['shard']:.2%} | "
        f"{r['fixed'] / r['fsdp']:.2%} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-projections", type=int, default=100, help="L (default 100)")
    parser.add_argument("--world-sizes", default="2,8,64", help="comma-separated W values")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "comm.md")
    args = parser.parse_args(argv)
    if args.n_projections < 1:
        parser.error("--n-projections must be >= 1")
    try:
        worlds = [int(w) for w in args.world_sizes.split(",")]
    except ValueError:
        parser.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    if any(w < 2 for w in worlds):
        parser.error("--world-sizes must all be >= 2")
    rows = []
    for name in MODELS:
        shapes = model_shapes(name)
        rows.extend(rows_for(name, shapes, args.n_projections, w) for w in worlds)
    text = render(rows, args.n_projections)
    print(text)
    atomic_write_text(args.output, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
