"""What does λ·SWD cost a LoRA training step? Tokens/s and peak memory with and without it.

CPU run (SmolLM2-135M shapes from a LlamaConfig, random init, no download; LoRA r = 8 on all
linear layers; batch 4 × 64 tokens; float32; L = 100, p = 2)::

    python3 benchmarks/bench_train.py [--steps 5] [--modes resample,fixed] [--tiny]

One training step is what :func:`snap_fast.train.unlearn` does per micro-batch: forward, the
answer-token NLL (:func:`snap_fast.train.losses.nll`), ``+ λ·reg()`` when regularized, backward,
AdamW. The plain step and the regularized steps run on the same model and optimizer,
interleaved (the order rotates every round) so machine noise hits all variants alike; medians
are reported. Peak memory: on CUDA ``max_memory_allocated`` per step; on the CPU the process's
resident-set high-water mark (``ru_maxrss``) after the plain warm-up and after each regularized
warm-up (a high-water mark only grows, so it bounds what each variant added), plus the bytes
the regularizer keeps (``cache_nbytes``). Target: overhead ≤ 15 % on CPU.

:func:`gpu_section` is the hook of ``benchmarks/gpu_check.py``: Llama-3.1-8B shapes, bfloat16,
LoRA r = 16, same batch; target overhead ≤ 5 %. ``gpu_section("cpu", tiny=True)`` runs the same
code on tiny shapes (tests/test_train_bench.py checks the logic that way). The CPU table goes
to ``benchmarks/results/train_<machine>.md`` (written atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from snap_fast.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
L_DIRECTIONS = 100
LAMBDA = 0.1

SHAPES = {
    # SNAP.md §5: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied.
    "smollm2-135m": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0,
    },
    "tiny": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True,
    },
}


def build_lora_model(shape: str, *, r: int, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-init Llama of ``SHAPES[shape]`` with PEFT LoRA (rank ``r``, alpha 2r) on every
    linear layer, in ``dtype`` on ``device``, in training mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048)
    torch.manual_seed(seed)
    # Built directly in ``dtype`` on ``device``: an 8B model never exists as a float32 copy.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    return model.train()


def make_batch(vocab: int, batch: int, seq: int, device: str | torch.device, seed: int = 0) -> dict:
    """Random token ids; the first half of every row is "prompt" (labels -100), as in SNAP data."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure_overhead(model, batch: dict, *, modes: list[str], steps: int = 5, warmup: int = 2,
                     lam: float = LAMBDA, n_projections: int = L_DIRECTIONS, backend: str | None = None) -> list[dict]:
    """Time plain vs regularized training steps on one model; one row per variant.

    Args:
        model: a PEFT LoRA model in training mode.
        batch: ``input_ids``/``attention_mask``/``labels`` on the model's device.
        modes: regularizer direction modes to compare with the plain step.
        steps: timed rounds (each round times every variant once); warmup: untimed steps each.
        lam, n_projections, backend: regularizer settings.

    Returns rows with ``variant``, ``median_ms``, ``tokens_per_s``, ``overhead_pct`` (vs plain),
    ``peak_mib`` and ``reg_cache_mib``.
    """
    from snap_fast.regularizer import SlicedWassersteinRegularizer
    from snap_fast.train.losses import nll

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = int(batch["attention_mask"].sum())

    def make_step(reg):
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = nll(logits, batch["labels"])
            if reg is not None:
                loss = loss + lam * reg()
            loss.backward()
            optimizer.step()
        return step

    variants: dict[str, dict] = {"plain": {"step": make_step(None), "reg": None}}
    for mode in modes:
        reg = SlicedWassersteinRegularizer(model, n_projections=n_projections, mode=mode, refresh_every=10,
                                           backend=backend)
        variants[mode] = {"step": make_step(reg), "reg": reg}
    for v in variants.values():  # warm-up, plain first: the CPU high-water mark then grows in order
        for _ in range(warmup):
            v["step"]()
        _sync(device)
        v["peak"] = _rss_peak_mib() if device.type == "cpu" else 0.0
        v["times"] = []

    names = list(variants)
    for i in range(steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            v = variants[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            v["step"]()
            _sync(device)
            v["times"].append(time.perf_counter() - start)
            if device.type == "cuda":
                v["peak"] = max(v["peak"], torch.cuda.max_memory_allocated(device) / 2**20)

    base = statistics.median(variants["plain"]["times"])
    rows = []
    for name, v in variants.items():
        med = statistics.median(v["times"])
        rows.append({
            "variant": "no regularizer" if name == "plain" else f"λ·SWD {name}",
            "median_ms": med * 1e3,
            "tokens_per_s": tokens / med,
            "overhead_pct": 100 * (med / base - 1),
            "peak_mib": v["peak"],
            "reg_cache_mib": v["reg"].cache_nbytes() / 2**20 if v["reg"] is not None else 0.0,
        })
    return rows


def to_markdown(rows: list[dict], target_pct: float) -> str:
    lines = ["| variant | step ms (median) | tokens/s | overhead | ≤ target | peak MiB | reg cache MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r["variant"] == "no regularizer" else ("yes" if r["overhead_pct"] <= target_pct else "NO")
        lines.append(f"| {r['variant']} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['overhead_pct']:+.1f} % | {ok} | {r['peak_mib']:.0f} | {r['reg_cache_mib']:.2f} |")
    return "\n".join(lines)


def gpu_section(device: str = "cuda", tiny: bool = False, steps: int = 10, warmup: int = 3) -> str:
    """Markdown: LoRA training step with / without λ·SWD, Llama-3.1-8B shapes, bf16, r = 16.

    Batch 4 × 64 tokens, AdamW, L = 100; target overhead ≤ 5 %. ``device="cpu", tiny=True``
    runs the same code on tiny shapes.
    """
    shape = "tiny" if tiny else "llama-3.1-8b"
    model = build_lora_model(shape, r=16, device=device, dtype=torch.bfloat16)
    batch = make_batch(SHAPES[shape]["vocab_size"], 4, 64, device)
    rows = measure_overhead(model, batch, modes=["resample", "refresh", "fixed"], steps=steps, warmup=warmup)
    head = (f"LoRA training step with and without λ·SWD: {shape} shapes, bf16 base weights (LoRA factors "
            f"float32, PEFT's default), LoRA r = 16 on all linear "
            f"layers, batch 4 × 64, AdamW, L = {L_DIRECTIONS}, λ = {LAMBDA}; medians of {steps} interleaved "
            f"rounds; peak = max_memory_allocated. Target: overhead ≤ 5 %.\n\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return head + to_markdown(rows, 5.0)


def cpu_section(*, tiny: bool = False, steps: int = 5, warmup: int = 2, modes: list[str] | None = None,
                backend: str | None = None) -> str:
    """Markdown: the CPU benchmark (SmolLM2-135M shapes, float32, LoRA r = 8, batch 4 × 64)."""
    shape = "tiny" if tiny else "smollm2-135m"
    modes = modes or ["resample", "refresh", "fixed"]
    model = build_lora_model(shape, r=8, device="cpu", dtype=torch.float32)
    batch = make_batch(SHAPES[shape]["vocab_size"], 4, 64, "cpu")
    rows = measure_overhead(model, batch, modes=modes, steps=steps, warmup=warmup, backend=backend)
    head = (f"LoRA training step with and without λ·SWD: {shape} shapes, float32, LoRA r = 8 on all linear "
            f"layers, batch 4 × 64, AdamW, L = {L_DIRECTIONS}, λ = {LAMBDA}; medians of {steps} interleaved "
            f"rounds on {torch.get_num_threads()} thread(s); peak = process RSS high-water mark after each "
            f"variant's warm-up. Target: overhead ≤ 15 %.\n\n")
    return head + to_markdown(rows, 15.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    parser.add_argument("--modes", default="resample,refresh,fixed", help="regularizer modes to time")
    parser.add_argument("--backend", default=None, help="force the sort backend (torch, cpp)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (checks the script)")
    parser.add_argument("--gpu", action="store_true", help="run gpu_section() on CUDA instead")
    parser.add_argument("--out", type=Path, default=None, help="markdown output file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        text = gpu_section("cuda", tiny=args.tiny)
    else:
        text = cpu_section(tiny=args.tiny, steps=args.steps, warmup=args.warmup,
                           modes=[m for m in args.modes.split(",") if m], backend=args.backend)
    machine = f"{platform.machine()}-{os.cpu_count()}cpu" if not args.gpu else torch.cuda.get_device_name()
    text = f"# Training-step overhead of the regularizer ({machine})\n\n{text}\n"
    print(text)
    out = args.out or (None if args.tiny else RESULTS / f"train_{machine.replace(' ', '_')}.md")
    if out is not None:
        atomic_write_text(out, text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
