"""CPU benchmark: whole-model regularizer forward + backward (SNAP.md §5).

Builds the SmolLM2-135M-shaped parameter set (272 tensors, 134.5 M parameters; random weights,
current = initial + a small perturbation) and times, in one run, from the same weights:

* the peer loop (``peer.PeerRegularizer``: the authors' per-tensor loop, SNAP.md §2),
* POT per tensor (``peer.PotRegularizer``, same kind of fresh per-tensor directions),
* snap_fast's :class:`~snap_fast.SlicedWassersteinRegularizer` in each direction mode
  (``resample``; ``refresh`` with K = 10, amortised: 10 consecutive calls timed, divided by 10;
  ``fixed``) for each available CPU backend (``torch``; ``cpp`` when the extension builds),

* the GEMM floor (:class:`GemmFloor`): only the two projection products any exact implementation
  does per call for every tensor, ``W Θ`` forward and ``G Θᵀ`` backward, with cached directions;
  every other row also reads against it (``× floor``),
* the resample floor (:class:`ResampleFloor`): the GEMM floor plus what fresh directions cost
  (the draw and the ``W0 Θ`` product): the limit of any exact ``resample`` implementation,
* the refresh floor (:class:`RefreshFloor`): the GEMM floor plus, every K calls, the draw and a
  bf16 ``W0 Θ``; each snap_fast mode also reads against its own floor (``× own floor``),

timed in interleaved rounds (every implementation once per round, in a shuffled order, each on its
own weight trajectory), so slow drifts of a shared machine hit all of them alike; plus a per-stage breakdown
of the snap_fast modes (directions and sorted W0 projections,
projection GEMM, sort/match, reduction, backward; each stage timed on its own). Between timed
calls every implementation takes the same small SGD step on its own gradient (outside the timer),
so the weights drift as in training and permutation caches see realistic, not frozen, inputs.

Medians over repeats after a warm-up call; ratios are speedups (baseline time / time). Prints a
markdown table (with the thread count and whether the CPU has bf16 dot-product instructions:
without them the peer loop's bf16 GEMMs are emulated, 5-150x slower) and writes it atomically to
``benchmarks/results/cpu_<machine>_<threads>threads.md`` (full size) or to ``--output``. ``--quick`` runs a 2-layer model with a 4096-token vocabulary (9.4 M parameters);
``--layers``/``--vocab`` shrink it further for smoke tests (CI adds ``--layers 1 --vocab 512
--skip-pot --n-projections 8``).

    python benchmarks/bench_regularizer.py            # full size, a few minutes on 2 cores
    python benchmarks/bench_regularizer.py --quick
    snap-fast bench [--quick]                         # the same, from the CLI
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import os
import platform
import random
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from snap_fast.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import peer` when loaded by path

from peer import PeerRegularizer, PotRegularizer

import snap_fast
from snap_fast.ops.backends import match_sorted
from snap_fast.ops.swd.cpp import available as _cpp_available
from snap_fast.ops.swd.function import swd_from_projections
from snap_fast.ops.swd.naive import as_matrix, copy_projections_t
from snap_fast.regularizer.terms import converted_projections_t

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOLLM2_TENSORS = 272
SMOLLM2_PARAMS = 134_515_008
REFRESH_K = 10
QUICK_LAYERS, QUICK_VOCAB = 2, 4096
SGD_LR = 1e-4  # the drift between timed calls: small against weights of scale 0.02


# ----------------------------------------------------------------- the model


def smollm2_shapes(
    layers: int = 30, hidden: int = 576, intermediate: int = 1536, kv_dim: int = 192, vocab: int = 49152
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every trainable tensor of a SmolLM2-135M-shaped Llama (tied embedding)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        prefix = f"layers.{i}."
        shapes += [
            (prefix + "self_attn.q_proj.weight", (hidden, hidden)),
            (prefix + "self_attn.k_proj.weight", (kv_dim, hidden)),
            (prefix + "self_attn.v_proj.weight", (kv_dim, hidden)),
            (prefix + "self_attn.o_proj.weight", (hidden, hidden)),
            (prefix + "mlp.gate_proj.weight", (intermediate, hidden)),
            (prefix + "mlp.up_proj.weight", (intermediate, hidden)),
            (prefix + "mlp.down_proj.weight", (hidden, intermediate)),
            (prefix + "input_layernorm.weight", (hidden,)),
            (prefix + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("norm.weight", (hidden,)))
    return shapes


class ShapedModel(torch.nn.Module):
    """A bag of parameters with given shapes: random weights (std 0.02; norms near 1)."""

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes:
            base = torch.ones(shape) if len(shape) == 1 else torch.zeros(shape)
            value = base + 0.02 * torch.randn(shape, generator=g)
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(value))

    @torch.no_grad()
    def perturb(self, scale: float = 1e-3, seed: int = 1) -> None:
        """current = initial + scale · N(0, 1): what some training steps would have done."""
        g = torch.Generator().manual_seed(seed)
        for param in self.parameters():
            param.add_(torch.randn(param.shape, generator=g), alpha=scale)


# ----------------------------------------------------------------- timing


class _TwoGemms(torch.autograd.Function):
    """Forward ``Wᵢ Θᵢ`` and backward ``dWᵢ = Gᵢ Θᵢᵀ`` for every tensor, nothing else, each in the
    operand order MKL runs fastest on these shapes (measured: ``W Θ`` 0.36 s against 0.58 s for
    ``(Θᵀ Wᵀ)`` over SmolLM2-135M's tensors at 2 threads)."""

    @staticmethod
    def forward(ctx, floor, *params):  # type: ignore[override]
        for theta, w, out in zip(floor.thetas, params, floor.outs):
            torch.mm(w.reshape(w.shape[0], -1), theta, out=out)
        ctx.floor = floor
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        floor = ctx.floor
        grads = [torch.mm(g, theta_t).view(shape) for g, theta_t, shape in
                 zip(floor.outs, floor.thetas_t, floor.shapes)]
        return (None, *grads)


class GemmFloor:
    """The machine's floor for one exact call: the two projection GEMMs per tensor (L directions,
    drawn once and cached), no sort, no reduction, no direction draw; called like a regularizer."""

    def __init__(self, params: list[torch.nn.Parameter], n_projections: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.params = params
        self.shapes = [p.shape if p.dim() > 1 else (1, p.numel()) for p in params]  # as passed to the GEMMs
        mats = [as_matrix(p.detach()) for p in params]
        self.thetas_t = [torch.randn(n_projections, m.shape[1], generator=g) for m in mats]
        self.thetas = [t.t().contiguous() for t in self.thetas_t]
        # the forward writes here; the backward reads it back as the incoming (n, L) gradient
        self.outs = [torch.empty(m.shape[0], n_projections) for m in mats]

    def __call__(self) -> torch.Tensor:
        return _TwoGemms.apply(self, *[p if p.dim() > 1 else p.reshape(1, -1) for p in self.params])

    def _redraw(self, i: int, generator: torch.Generator, bf16_values: bool = False) -> None:
        """Fresh unit directions for tensor ``i`` (the floors that redraw), rounded to bf16 values
        when a bf16 GEMM will read them."""
        # in place, as snap_fast's resample draws: fresh buffers cost a page fault per 4 KiB
        theta_t = self.thetas_t[i].normal_(generator=generator)
        theta_t.div_(theta_t.norm(dim=1, keepdim=True))
        if bf16_values:
            theta_t.copy_(theta_t.bfloat16())
        self.thetas[i].copy_(theta_t.t())


class ResampleFloor(GemmFloor):
    """The floor of one exact ``resample`` call: :class:`GemmFloor` plus what fresh directions add
    and no exact implementation can skip: the draw (one ``randn`` and a normalisation per tensor)
    and the third product, ``W0 Θ``, from the kept bfloat16 copy of W0 in float32 (the
    projections must be float32-exact, and this CPU build has no bf16 GEMM with a float32 output),
    converted a block of rows at a time into kept output buffers as snap_fast does
    (:func:`snap_fast.regularizer.terms.converted_projections_t`), the cheapest way known here.
    No sort, no reduction."""

    def __init__(self, params: list[torch.nn.Parameter], n_projections: int, seed: int):
        super().__init__(params, n_projections, seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.initial = [as_matrix(p.detach()).to(torch.bfloat16) for p in params]
        self.outs0 = [torch.empty(o.shape[1], o.shape[0]) for o in self.outs]  # (L, n)

    def __call__(self) -> torch.Tensor:
        for i, w0 in enumerate(self.initial):
            self._redraw(i, self.generator)
            converted_projections_t(self.thetas[i], w0, out=self.outs0[i])
        return super().__call__()


class RefreshFloor(GemmFloor):
    """The floor of exact ``refresh`` calls, K at a time: :class:`GemmFloor` every call, plus at
    every K-th call what a redraw needs and no exact implementation can skip: the draw and
    ``W0 Θ`` from the kept bfloat16 copy, with the directions rounded to bf16 and one bf16 GEMM
    into kept bf16 buffers, as snap_fast's refresh does (``copy_projections_t``: its cache is
    bf16). No sort."""

    def __init__(self, params: list[torch.nn.Parameter], n_projections: int, seed: int, refresh_every: int):
        super().__init__(params, n_projections, seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.initial = [as_matrix(p.detach()).to(torch.bfloat16) for p in params]
        self.outs0 = [torch.empty(o.shape[1], o.shape[0], dtype=torch.bfloat16) for o in self.outs]  # (L, n)
        self.refresh_every = refresh_every
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        if self.calls % self.refresh_every == 0:
            for i, w0 in enumerate(self.initial):
                self._redraw(i, self.generator, bf16_values=True)
                copy_projections_t(self.thetas[i], w0, out=self.outs0[i])
        self.calls += 1
        return super().__call__()


def _clear_grads(params: list[torch.nn.Parameter]) -> None:
    for param in params:
        param.grad = None


@torch.no_grad()
def _sgd_step(params: list[torch.nn.Parameter]) -> None:
    for param in params:
        if param.grad is not None:
            param.add_(param.grad, alpha=-SGD_LR)


def timed_window(reg: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], window: int) -> tuple[float, float]:
    """Seconds of ``window`` consecutive forward + backward calls (each followed by the SGD step,
    outside the timer), divided by ``window``; and the first call's value."""
    elapsed, first = 0.0, None
    for _ in range(window):
        _clear_grads(params)
        start = time.perf_counter()
        value = reg()
        value.backward()
        elapsed += time.perf_counter() - start
        if first is None:
            first = value.item()
        _sgd_step(params)
    return elapsed / window, first


def time_calls(
    reg: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], repeats: int, window: int = 1
) -> tuple[float, float]:
    """One implementation alone: median seconds per call over ``repeats`` windows after a
    warm-up window, and the first value (see :func:`time_interleaved` to compare several)."""
    first = None
    times = []
    for r in range(repeats + 1):
        seconds, value = timed_window(reg, params, window)
        first = value if first is None else first
        if r > 0:
            times.append(seconds)
    return statistics.median(times), first


def time_interleaved(
    jobs: list[tuple[str, Callable[[], torch.Tensor], int]], params: list[torch.nn.Parameter],
    weights: dict[str, list[torch.Tensor]], repeats: int,
) -> dict[str, tuple[float, float]]:
    """Median seconds per call and first value of every job, timed in interleaved rounds.

    Round 0 is every job's warm-up, in the given order; then each round times one window of every
    job, in an order shuffled per round (seeded), so drifts of the machine (other tenants,
    thermal state) hit all jobs alike, and no job always runs after the same neighbour (whose
    frees shape the allocator state, hence the page faults, the next job meets). Every job keeps
    its own weight trajectory in ``weights[label]``, copied into ``params`` for its turn.
    """
    times: dict[str, list[float]] = {label: [] for label, _, _ in jobs}
    first: dict[str, float] = {}
    order = random.Random(0)
    for r in range(repeats + 1):
        round_jobs = list(jobs)
        if r > 0:
            order.shuffle(round_jobs)
        for label, reg, window in round_jobs:
            _load(params, weights[label])
            seconds, value = timed_window(reg, params, window)
            _store(params, weights[label])
            first.setdefault(label, value)
            if r > 0:
                times[label].append(seconds)
    return {label: (statistics.median(times[label]), first[label]) for label, _, _ in jobs}


@torch.no_grad()
def _load(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    for w, v in zip(params, values):
        w.copy_(v)


@torch.no_grad()
def _store(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    for w, v in zip(params, values):
        v.copy_(w)


STAGES = ("directions + sorted W0", "projection GEMM", "sort/match", "reduction", "backward")
# backends whose swd_from_projections fuses sort/match and reduction into one pass (and computes the
# gradient there): their "sort/match" column holds the fused time and "reduction" shows "fused"
FUSED_BACKENDS = ("cpp",)


def time_stages(
    reg: snap_fast.SlicedWassersteinRegularizer, params: list[torch.nn.Parameter], repeats: int, window: int = 1
) -> dict[str, float]:
    """Median seconds per stage of one call, each stage timed on its own.

    The stages are those of ``SlicedWassersteinRegularizer.__call__`` run one by one (white-box:
    the same private steps, so the sum matches a call up to timer overhead). For a fused backend
    the reduction is part of "sort/match" and its own entry is NaN.
    """
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    state = reg._call_state()
    for r in range(repeats + 1):
        sums = dict.fromkeys(STAGES, 0.0)
        for _ in range(window):
            _clear_grads(params)
            t0 = time.perf_counter()
            theta, sorted_ref = reg._directions_and_reference()
            t1 = time.perf_counter()
            proj = reg._project(theta)
            offset = reg._projection_offset()
            t2 = time.perf_counter()
            if reg.backend in FUSED_BACKENDS:  # one fused pass: sort/match and reduction together
                value = swd_from_projections(
                    proj, sorted_ref, reg.layout, n_projections=reg.n_projections, p=reg.p,
                    backend=reg.backend, state=state, offset=offset, ref_sorted=not reg._kernel_sorts_reference,
                )
                t3 = t4 = time.perf_counter()
            else:
                if offset is not None:  # the cached LoRA W0 Θ (see SlicedWassersteinRegularizer._pin)
                    proj = proj.float() + offset
                with torch.no_grad():
                    targets = match_sorted(proj.detach(), sorted_ref.float(), reg.layout, reg.backend, state)
                t3 = time.perf_counter()
                diff = proj.float() - targets
                value = (diff.square() if reg.p == 2 else diff.abs().pow(reg.p)).sum() / reg.n_projections
                t4 = time.perf_counter()
            value.backward()
            t5 = time.perf_counter()
            for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                sums[stage] += dt
            _sgd_step(params)
        if r > 0:
            for stage in STAGES:
                per_stage[stage].append(sums[stage] / window)
    medians = {s: statistics.median(v) for s, v in per_stage.items()}
    if reg.backend in FUSED_BACKENDS:
        medians["reduction"] = float("nan")
    return medians


# ----------------------------------------------------------------- the run


# glibc's mallopt parameters (malloc.h) and the values the benchmark pins them to
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
PINNED_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit: smaller blocks come from the heap
PINNED_TRIM_THRESHOLD = 2**30


def pin_allocator() -> str:
    """Fix glibc malloc's mmap and trim thresholds for the whole run; returns what was done.

    By default glibc moves both thresholds as blocks are freed, so whether a fresh gradient
    comes from pages already mapped or from new ones the kernel must fault in and zero depends
    on what ran before: interleaved with each other, the implementations met allocator states
    that moved one and the same call (the GEMM floor) from 0.31 s to 0.45 s on this machine.
    Pinned, every block under 32 MiB is reused from the heap, for every implementation alike;
    larger ones (SmolLM2's embedding gradient) are still mapped per call, as for any program.
    """
    if platform.system() != "Linux":
        return "the platform's malloc, as configured"
    try:
        libc = ctypes.CDLL("libc.so.6")
        pinned = (libc.mallopt(_M_MMAP_THRESHOLD, PINNED_MMAP_THRESHOLD) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, PINNED_TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):
        pinned = False
    if not pinned:
        return "malloc left as configured (glibc's mallopt unavailable)"
    return ("glibc malloc pinned (mmap threshold 32 MiB, heap never trimmed: blocks under 32 MiB are reused, "
            "not faulted in afresh)")


def machine_name() -> str:
    """The host name, or ``<cores>core`` when the host name is a container id."""
    host = socket.gethostname().split(".")[0]
    if not host or re.fullmatch(r"[0-9a-f]{8,}", host) or len(host) > 32:
        return f"{os.cpu_count()}core"
    return host


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return set()


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    bf16 = "yes" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "no (bf16 GEMMs are emulated: the peer loop is far slower)"
    return (
        f"{cpu}; bf16 dot-product instructions: {bf16}; {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}; snap_fast {snap_fast.__version__}; "
        f"Python {platform.python_version()}; load average {load}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the benchmark (shared by the script and ``snap-fast bench``)."""
    parser.add_argument("--quick", action="store_true", help="2-layer model, vocab 4096: seconds, for CI")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up (default 3; quick 1)")
    parser.add_argument("--n-projections", type=int, default=100, help="L (default 100)")
    parser.add_argument("--p", type=float, default=2.0, help="exponent (default 2)")
    parser.add_argument(
        "--backends", default=None, help="comma-separated CPU backends to time (default: torch, plus cpp if it builds)"
    )
    parser.add_argument("--skip-pot", action="store_true", help="do not time POT (the slowest baseline)")
    parser.add_argument("--output", type=Path, default=None, help="markdown file to write (default: "
                        "benchmarks/results/cpu_<machine>.md for the full size, nothing otherwise)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (smoke tests)")
    parser.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc malloc's thresholds as they are (default: pinned, see pin_allocator)")


def _validate(args: argparse.Namespace) -> list[str]:
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    for name in ("layers", "vocab"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.n_projections < 1:
        raise ValueError(f"--n-projections must be >= 1, got {args.n_projections}")
    if not args.p > 0:
        raise ValueError(f"--p must be > 0, got {args.p}")
    available = ["torch"] + (["cpp"] if _cpp_available() else [])
    if args.backends is None:
        return available
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in available]
    if unknown or not backends:
        raise ValueError(f"--backends: {unknown or backends} not available here (available: {available})")
    return backends


Spec = tuple[str, str, Callable[[], Callable[[], torch.Tensor]], int]  # label, backend, factory, window
RESAMPLE_FLOOR = "resample floor (draw Θ, W0 Θ + W Θ + G Θᵀ)"
REFRESH_FLOOR = f"refresh floor (K={REFRESH_K}: GEMM floor, draw Θ and bf16 W0 Θ every K calls)"


def _specs(args: argparse.Namespace, model: ShapedModel, backends: list[str]) -> list[Spec]:
    """What to time: (label, backend, factory building the callable from the *initial* weights,
    calls per timed window)."""
    params = list(model.parameters())
    L, p = args.n_projections, args.p
    specs: list[Spec] = [
        ("peer loop", "torch", lambda: PeerRegularizer(params, L, p, args.seed), 1),
        ("GEMM floor (W Θ + G Θᵀ)", "torch", lambda: GemmFloor(params, L, args.seed), 1),
        (RESAMPLE_FLOOR, "torch", lambda: ResampleFloor(params, L, args.seed), 1),
        (REFRESH_FLOOR, "torch", lambda: RefreshFloor(params, L, args.seed, REFRESH_K), REFRESH_K),
    ]
    if not args.skip_pot:
        specs.append(("POT per tensor", "torch", lambda: PotRegularizer(params, L, p, args.seed), 1))
    for backend in backends:
        for mode in snap_fast.MODES:
            label = f"snap_fast {mode}" + (f" (K={REFRESH_K}, amortised)" if mode == "refresh" else "")
            window = REFRESH_K if mode == "refresh" else 1

            def factory(mode=mode, backend=backend):
                return snap_fast.SlicedWassersteinRegularizer(
                    model, n_projections=L, p=p, mode=mode, refresh_every=REFRESH_K, seed=args.seed, backend=backend
                )

            specs.append((label, backend, factory, window))
    return specs


def _measure(specs: list[Spec], model: ShapedModel, repeats: int, seed: int) -> tuple[list, list]:
    """Table rows ``(label, backend, seconds, first value, cache bytes)`` from interleaved rounds,
    and the per-stage breakdown ``(label, backend, stage times, call seconds)`` of snap_fast's."""
    from tqdm import tqdm

    params = list(model.parameters())
    initial = [w.detach().clone() for w in params]
    model.perturb(seed=seed + 1)
    current = [w.detach().clone() for w in params]
    # Every implementation snapshots the same W0, then starts from the same perturbed weights and
    # follows its own trajectory (its own SGD steps), kept in `weights` between its turns.
    regs: dict[str, Callable[[], torch.Tensor]] = {}
    weights: dict[str, list[torch.Tensor]] = {}
    for label, backend, factory, _ in tqdm(specs, desc="building", unit="impl", file=sys.stderr):
        _load(params, initial)
        regs[label + backend] = factory()
        weights[label + backend] = [c.clone() for c in current]
    del initial
    jobs = [(label + backend, regs[label + backend], window) for label, backend, _, window in specs]
    print(f"timing {len(jobs)} implementations in {repeats + 1} interleaved rounds "
          f"({torch.get_num_threads()} threads)...", file=sys.stderr)
    timed = time_interleaved(jobs, params, weights, repeats)
    rows = []
    for label, backend, _, _ in specs:
        reg = regs[label + backend]
        cache = reg.cache_nbytes() if hasattr(reg, "cache_nbytes") else None
        rows.append((label, backend, *timed[label + backend], cache))
    stages: list[tuple[str, str, dict[str, float], float]] = []
    for label, backend, _, window in tqdm(specs, desc="per-stage breakdown", unit="impl", file=sys.stderr):
        reg = regs.pop(label + backend)
        if isinstance(reg, snap_fast.SlicedWassersteinRegularizer):
            _load(params, weights[label + backend])
            stages.append((label, backend, time_stages(reg, params, repeats, window), timed[label + backend][0]))
        del reg
    _clear_grads(params)
    return rows, stages


def _render(rows: list, stages: list, header: list[str]) -> str:
    """The markdown: the header lines, the main table (vs peer, vs POT, × floor), the stages."""
    peer_s, floor_s = rows[0][2], rows[1][2]
    pot_s = next((r[2] for r in rows if r[0] == "POT per tensor"), None)
    own_floor = {mode: next((r[2] for r in rows if r[0] == name), None)
                 for mode, name in (("resample", RESAMPLE_FLOOR), ("refresh", REFRESH_FLOOR), ("fixed", rows[1][0]))}
    columns = "implementation | backend | median s | vs peer | vs POT | × floor | × own floor | first value | cache MB"
    lines = [*header, "", f"| {columns} |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, backend, seconds, value, cache in rows:
        vs_pot = f"{pot_s / seconds:.2f}×" if pot_s else "—"
        cache_mb = f"{cache / 2**20:.1f}" if cache is not None else "—"
        shown = "—" if "floor" in label else f"{value:.4g}"
        mode = next((m for m in own_floor if label.startswith(f"snap_fast {m}")), None)
        own = f"{seconds / own_floor[mode]:.2f}" if mode and own_floor[mode] else "—"
        lines.append(f"| {label} | {backend} | {seconds:.3f} | {peer_s / seconds:.2f}× | {vs_pot} | "
                     f"{seconds / floor_s:.2f} | {own} | {shown} | {cache_mb} |")
    resample_floor_s = next((r[2] for r in rows if r[0] == RESAMPLE_FLOOR), None)
    if resample_floor_s is not None:
        limit = peer_s / resample_floor_s
        lines += ["", (f"A resample call 3× faster than the peer loop would take {peer_s / 3:.3f} s; the resample "
                       f"floor alone (no sort, no reduction) takes {resample_floor_s:.3f} s, so a resample "
                       "implementation built on these products (torch's randn, the bf16 W0 copy converted to "
                       f"float32 block-wise) {'can reach at most' if limit >= 3 else 'cannot pass'} "
                       f"{limit:.2f}× the peer here.")]
    lines += [
        "",
        "Per-stage breakdown of the snap_fast calls (median seconds per call, each stage timed on its own):",
        "",
        "| mode | backend | " + " | ".join(STAGES) + " | sum | call |",
        "|---|---|" + "---:|" * (len(STAGES) + 2),
    ]
    for label, backend, times, seconds in stages:
        cells = " | ".join("fused" if math.isnan(times[s]) else f"{times[s]:.3f}" for s in STAGES)
        total = sum(t for t in times.values() if not math.isnan(t))
        lines.append(f"| {label} | {backend} | {cells} | {total:.3f} | {seconds:.3f} |")
    if any(label.startswith("snap_fast resample") and backend in FUSED_BACKENDS for label, backend, *_ in stages):
        lines += ["", ("On a fused backend, resample sorts W0 Θ inside the fused sort/match pass: its first column "
                       "holds the draw and the W0 Θ product only.")]
    if any(backend == "cpp" for _, backend, *_ in stages):
        lines += ["", ("The C++ call of a model of plain weights forms each weight's projections inside its fused "
                       "kernel and sorts them while they are in cache; its stages above are the same work done "
                       "step by step (projections into a flat buffer, then the fused pass), so their sum can "
                       "exceed the call.")]
    lines += [
        "",
        ("The peer loop rounds W0 and the projections to bfloat16, so its value differs from the float32 "
        "implementations by that rounding; different random directions also change the value by a few %."),
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the tables; write them; return 0."""
    backends = _validate(args)
    repeats = args.repeats or (1 if args.quick else 3)
    layers = args.layers or (QUICK_LAYERS if args.quick else 30)
    vocab = args.vocab or (QUICK_VOCAB if args.quick else 49152)
    shapes = smollm2_shapes(layers=layers, vocab=vocab)
    n_params = sum(torch.Size(s).numel() for _, s in shapes)
    full_size = (layers, vocab) == (30, 49152)
    if full_size:  # the model of SNAP.md §5, exactly
        assert len(shapes) == SMOLLM2_TENSORS and n_params == SMOLLM2_PARAMS, (len(shapes), n_params)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    allocator = "malloc left as configured (--default-malloc)" if args.default_malloc else pin_allocator()
    model = ShapedModel(shapes, seed=args.seed)
    rows, stages = _measure(_specs(args, model, backends), model, repeats, args.seed)
    size = "SmolLM2-135M-shaped" if full_size else f"small ({layers} layers, vocab {vocab})"
    header = [
        f"# Regularizer forward + backward, CPU, {size}",
        "",
        (f"{len(shapes)} tensors, {n_params / 1e6:.1f} M parameters, float32 weights, L = {args.n_projections}, "
        f"p = {args.p:g}, {torch.get_num_threads()} torch thread(s); median of {repeats} interleaved round(s) "
        "after a warm-up round (each round times every implementation once, in an order shuffled per round); ratios are speedups "
        "(baseline time / time); × floor is time / GEMM floor."),
        f"Machine: {machine_description()}.",
        f"Allocator: {allocator}.",
        f"Run: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}.",
    ]
    table = _render(rows, stages, header)
    print(table)
    output = args.output
    if output is None and full_size:
        output = RESULTS_DIR / f"cpu_{machine_name()}_{torch.get_num_threads()}threads.md"
    if output is not None:
        atomic_write_text(Path(output), table)
        print(f"wrote {output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
