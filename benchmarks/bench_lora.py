"""LoRA mode of the regularizer (issue 3): how cheap is it next to a LoRA training step?

CPU run (SmolLM2-135M shapes from a LlamaConfig, random init, no download; LoRA r = 8 on every
linear layer q, k, v, o, gate, up, down; L = 100, p = 2, float32), all in one process::

    python3 benchmarks/bench_lora.py [--repeats 3] [--backend torch|cpp]

For each direction mode (resample, refresh K = 10 amortised over 10 calls, fixed) it times

  (a) the LoRA-aware regularizer forward + backward (and its stages),
  (b) the peer loop of SNAP.md §2 (benchmarks/peer.py) on the materialised weights
      W0 + s·B A of every adapted layer (materialisation included: that is what a LoRA user of
      the peer code pays),
  (c) one LoRA training step (forward + backward + AdamW) on a 4×64-token batch,

and the LoRA-delta statistics (:func:`snap_fast.ops.lora_stats.lora_delta_stats`) against the same
statistics from the materialised ΔW (with and without the SVD). Medians; the table goes to
``benchmarks/results/lora_<machine>.md`` (written atomically).

:func:`gpu_section` is the hook of ``benchmarks/gpu_check.py``: Llama-3.1-8B shapes in bfloat16
on CUDA, LoRA r = 16 on all linear layers, the regularizer forward + backward against one LoRA
training step (batch 1, 512 tokens, gradient checkpointing); ``gpu_section("cpu", tiny=True)``
runs the same code on tiny shapes (tests/test_lora.py checks the logic that way).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from snap_fast.io import atomic_write_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_regularizer import (
    STAGES,
    machine_description,
    machine_name,
    time_calls,
    time_interleaved,
    time_stages,
)
from peer import draw_directions_cpu, peer_swd

from snap_fast import SlicedWassersteinRegularizer
from snap_fast.ops.backends import CppBackend
from snap_fast.ops.lora_stats import lora_delta_stats

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
L_DIRECTIONS = 100
MODES = (("resample", 1), ("refresh", 10), ("fixed", 1))  # (mode, calls per timing window)


# ----------------------------------------------------------------------------- models
def llama_config(shape: str):
    """``smollm2`` (135M), ``llama8b`` (Llama-3.1-8B) or ``tiny`` decoder shapes."""
    from transformers import LlamaConfig

    shapes = {
        "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
        "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
        "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True),
    }
    return LlamaConfig(max_position_embeddings=2048, **shapes[shape])


def lora_llama(shape: str, r: int, *, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised Llama of ``shape`` built directly on ``device`` in ``dtype``, with
    PEFT LoRA (rank ``r``, alpha 2r) on every linear layer; B drawn small and non-zero so ΔW ≠ 0
    (the situation mid-training, not PEFT's B = 0 start)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no float32 8B detour
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(previous)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=LINEAR_TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    return model


def lora_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- baselines
class PeerOnMaterialised:
    """The peer loop (benchmarks/peer.py) over W0 + ΔW of every LoRA layer, ΔW from PEFT's own
    differentiable ``get_delta_weight``; bf16 copies of W0 kept as the peer does."""

    def __init__(self, model, n_projections: int = L_DIRECTIONS, seed: int = 0):
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.initial = [m.get_base_layer().weight.detach().to(torch.bfloat16, copy=True) for m in self.layers]
        self.n_projections = n_projections
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.initial[0].device)
        for module, w0 in zip(self.layers, self.initial):
            w = module.get_base_layer().weight + module.get_delta_weight(module.active_adapters[0])
            theta = draw_directions_cpu(w.shape[1], self.n_projections, self.generator, w.device)
            total = total + peer_swd(w0, w, theta)
        return total


def dense_stats(model, with_svd: bool) -> float:
    """The delta statistics of lora_delta_stats computed from the materialised ΔW; returns a
    checksum so nothing is optimised away."""
    from peft.tuners.lora import LoraLayer

    acc = 0.0
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, LoraLayer):
                continue
            delta = m.get_delta_weight(m.active_adapters[0]).float()
            w0 = m.get_base_layer().weight.float()
            rows = delta.norm(dim=1)
            acc += float(delta.norm() / w0.norm() + rows.max() + rows.mean() + (w0 * delta).sum())
            if with_svd:
                sv = torch.linalg.svdvals(delta)
                probs = sv / sv.sum()
                acc += float(sv.max() + torch.exp(-(probs * probs.clamp_min(1e-30).log()).sum()))
    return acc


# ----------------------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_train_step(model, batch: int, seq: int, device: torch.device):
    """One LoRA step: forward + backward + AdamW over the trainable (adapter) parameters."""
    opt = torch.optim.AdamW(lora_params(model), lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class WithoutLoraKernel:
    """A regularizer called with the C++ backend's LoRA kernel switched off: its flat path (a GEMM
    writing every projection, ``swd_forward``, GEMMs reading the gradient back), the
    before-column of the kernel's before/after rows. The factor gradients of an all-LoRA call are
    computed in its forward, so the switch need not outlive the call."""

    def __init__(self, reg: SlicedWassersteinRegularizer):
        self.reg = reg

    def __call__(self) -> torch.Tensor:
        CppBackend.lora_fused = False
        try:
            return self.reg()
        finally:
            CppBackend.lora_fused = True


@torch.no_grad()
def _restore(params, values) -> None:
    for w, v in zip(params, values):
        w.copy_(v)


def reg_call(reg, params):
    def call() -> None:
        for p in params:
            p.grad = None
        reg().backward()

    return call


# ----------------------------------------------------------------------------- CPU benchmark
def run_cpu(repeats: int, backend: str | None, shape: str = "smollm2", batch: int = 4, seq: int = 64) -> str:
    device = torch.device("cpu")
    t0 = time.perf_counter()
    model = lora_llama(shape, 8)
    params = lora_params(model)
    n_layers = sum(1 for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)
    print(f"built model + LoRA in {time.perf_counter() - t0:.1f}s ({n_layers} adapted layers)", flush=True)

    train = median_seconds(make_train_step(model, batch, seq, device), repeats, device)
    print(f"(c) train step {train:.3f}s", flush=True)
    peer = PeerOnMaterialised(model)
    peer_s = median_seconds(reg_call(peer, params), repeats, device)
    print(f"(b) peer on materialised {peer_s:.3f}s", flush=True)

    rows, stage_rows = [], []
    for mode, window in MODES:
        reg = SlicedWassersteinRegularizer(model, n_projections=L_DIRECTIONS, mode=mode, refresh_every=10, backend=backend)
        label = f"{mode}{' (K=10, amortised)' if mode == 'refresh' else ''}"
        timed = {label: time_calls(reg, params, repeats, window)[0]}
        if reg.backend == "cpp" and mode != "resample":
            # the LoRA kernel against the flat path it replaces, in interleaved rounds, each with
            # its own weight trajectory from the same start
            flat = f"{label}, flat path (LoRA kernel off)"
            start = [w.detach().clone() for w in params]
            weights = {name: [w.clone() for w in start] for name in (label, flat)}
            jobs = [(label, reg, window), (flat, WithoutLoraKernel(reg), window)]
            timed = {name: t for name, (t, _) in time_interleaved(jobs, params, weights, repeats).items()}
            _restore(params, start)
        stages = time_stages(reg, params, repeats, window)  # white-box steps of the flat path
        print(f"(a) {mode}: {timed} {stages}", flush=True)
        for name, reg_s in timed.items():
            rows.append(
                f"| {name} | {reg.backend} | {reg_s * 1e3:.1f} | "
                f"{peer_s * 1e3:.0f} | {train * 1e3:.0f} | {100 * reg_s / train:.1f} % | {peer_s / reg_s:.1f}× | "
                f"{reg.cache_nbytes() / 2**20:.1f} |"
            )
        # A NaN stage was not timed on its own: the backend fuses it into the sort/match pass.
        stage_rows.append(f"| {mode} | " + " | ".join(
            "fused" if stages[s] != stages[s] else f"{stages[s] * 1e3:.1f}" for s in STAGES) + " |")
        del reg

    fast = median_seconds(lambda: lora_delta_stats(model), repeats, device)
    fast_nobase = median_seconds(lambda: lora_delta_stats(model, with_base=False), repeats, device)
    dense_nosvd = median_seconds(lambda: dense_stats(model, False), repeats, device)
    dense_svd = median_seconds(lambda: dense_stats(model, True), 1, device, warmup=0)
    print(f"stats {fast:.3f}s / {fast_nobase:.3f}s; dense {dense_nosvd:.3f}s / {dense_svd:.3f}s", flush=True)

    rows_total = sum(m.get_base_layer().weight.shape[0] for m in peer.layers)
    return "\n".join([
        f"# LoRA mode on the CPU ({machine_name()})",
        "",
        f"Machine: {machine_description()}.",
        f"Model: SmolLM2-135M shapes (LlamaConfig, random init), LoRA r = 8, alpha 16 on "
        f"{', '.join(LINEAR_TARGETS)} ({n_layers} adapted layers, {rows_total} rows to sort per direction); "
        f"L = {L_DIRECTIONS}, p = 2, float32. Medians of {repeats} runs after a warm-up; refresh: mean per call over "
        "windows of 10 calls (one redraw each).",
        "",
        "(a) LoRA-aware regularizer forward + backward; (b) peer loop of SNAP.md §2 on the materialised "
        "weights W0 + s·B A (materialisation included); (c) one LoRA training step (forward + backward + "
        f"AdamW, batch {batch}×{seq} tokens). Targets for fixed and refresh: (a) ≤ 5 % of (c), (b)/(a) ≥ 40.",
        "",
        "| mode | sort backend | (a) ms | (b) ms | (c) ms | (a)/(c) | (b)/(a) | cache MiB |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Where the time of (a) goes on the flat path (ms per call; the stages run one by one). With the C++ "
        "backend, fixed and refresh run the LoRA kernel instead, which does the projection GEMM, sort/match, "
        "reduction and backward of each layer in one pass over cache-resident buffers:",
        "",
        "| mode | " + " | ".join(STAGES) + " |",
        "|---|" + "---|" * len(STAGES),
        *stage_rows,
        "",
        "LoRA-delta statistics (all layers, target ≥ 5× faster than dense):",
        "",
        "| statistics | ms | speed-up |",
        "|---|---|---|",
        f"| `lora_delta_stats(model)` (Grams + r×r cores + ⟨W0, ΔW⟩) | {fast * 1e3:.1f} | |",
        f"| `lora_delta_stats(model, with_base=False)` | {fast_nobase * 1e3:.1f} | |",
        f"| dense ΔW: norms, row norms, ⟨W0, ΔW⟩, no SVD | {dense_nosvd * 1e3:.1f} | "
        f"{dense_nosvd / fast:.1f}× (vs with_base) |",
        f"| dense ΔW with SVD (spectral norm, effective rank), 1 run | {dense_svd * 1e3:.0f} | {dense_svd / fast:.0f}× |",
        "",
    ])


# ----------------------------------------------------------------------------- GPU hook
def gpu_section(device: str = "cuda", tiny: bool = False, repeats: int = 5) -> str:
    """Markdown rows: LoRA-mode regularizer forward + backward vs one LoRA training step.

    Args:
        device: ``"cuda"`` for the real check; ``"cpu"`` with ``tiny=True`` tests the logic.
        tiny: tiny Llama shapes instead of Llama-3.1-8B.
        repeats: timed runs per measurement (medians).

    Llama-3.1-8B shapes, bfloat16 weights (LoRA factors as PEFT makes them), LoRA r = 16 on all
    linear layers, L = 100; training step: batch 1 × 512 tokens, gradient checkpointing, AdamW.
    Target: regularizer ≤ 1 % of the step.
    """
    dev = torch.device(device)
    shape, seq = ("tiny", 16) if tiny else ("llama8b", 512)
    model = lora_llama(shape, 16, device=device, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = lora_params(model)
    step_s = median_seconds(make_train_step(model, 1, seq, dev), repeats, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    lines = [
        f"LoRA mode, {'tiny' if tiny else 'Llama-3.1-8B'} shapes, bf16, r = 16 on {len(LINEAR_TARGETS)} linear "
        f"kinds, L = {L_DIRECTIONS}; training step batch 1 × {seq}, gradient checkpointing, AdamW: "
        f"{step_s * 1e3:.1f} ms (median of {repeats}). Target: regularizer ≤ 1 % of the step.",
        "",
        "| mode | regularizer fwd+bwd ms | % of train step | ≤ 1 % | cache MiB |",
        "|---|---|---|---|---|",
    ]
    for mode, window in MODES:
        reg = SlicedWassersteinRegularizer(model, n_projections=L_DIRECTIONS, mode=mode, refresh_every=10)
        call = reg_call(reg, params)

        def windowed(call=call, window=window) -> None:
            for _ in range(window):
                call()

        reg_s = median_seconds(windowed, repeats, dev) / window
        pct = 100 * reg_s / step_s
        lines.append(
            f"| {mode}{' (K=10, amortised)' if mode == 'refresh' else ''} | {reg_s * 1e3:.2f} | {pct:.2f} % | "
            f"{'yes' if pct <= 1 else 'no'} | {reg.cache_nbytes() / 2**20:.0f} |"
        )
        del reg, call
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    parser.add_argument("--backend", choices=["torch", "cpp", "triton"], default=None, help="sort backend (default auto)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: check the script, not the machine")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default benchmarks/results/lora_<machine>_<threads>threads.md)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    text = run_cpu(args.repeats, args.backend, shape="tiny" if args.tiny else "smollm2")
    name = f"lora_{machine_name()}_{torch.get_num_threads()}threads{'_tiny' if args.tiny else ''}.md"
    out = args.out or HERE / "results" / name
    atomic_write_text(out, text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
