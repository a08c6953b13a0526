"""CPU micro-benchmark of the sorting step alone: torch.sort against the C++ extension.

The segments are those of a SmolLM2-135M-shaped model with L directions (default 100): 272
tensors, segment lengths 49152 (embedding), 1536, 576, 192 and 1 (norms), 20.5 M values. The
projected values are random with the spread of real projections (std 0.02). Timed, medians over
repeats after a warm-up, all in one run:

* ``torch.sort`` per run of equal-length segments (the PyTorch backend's sort),
* the extension's keys-only sort (``cpp.sort_segments``: the sorted initial projections),
* matched targets with a full sort (``cpp.match_sorted`` without state: ``resample`` mode),
* matched targets with permutation reuse after a drift of the projections by N(0, σ²) per step
  (``fixed`` mode, and ``refresh`` between redraws), for several σ; each timed call sees the next
  step of one drifting sequence, as in training. The share of segments still sorted / repaired /
  fully re-sorted is reported,
* the regularizer's reduction on the projections: PyTorch's generic path (match, difference,
  power, sum, backward) against the extension's fused forward (value and gradient in the sort
  pass) plus its backward (one scaling of the kept gradient).

    python benchmarks/bench_sort.py                 # full size, about a minute on 2 cores
    python benchmarks/bench_sort.py --quick         # 2 layers, 4096-row embedding

Prints a markdown table; ``--output FILE`` also writes it (atomically).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from snap_fast.io import atomic_write_text
from snap_fast.ops.backends import match_sorted, sort_segments
from snap_fast.ops.swd import cpp
from snap_fast.ops.swd.function import swd_from_projections
from snap_fast.ops.swd.layout import SegmentLayout

PROJ_STD = 0.02  # std of W θ for weights of std 0.02 and unit directions


def smollm2_rows(layers: int = 30, hidden: int = 576, intermediate: int = 1536, kv: int = 192,
                 vocab: int = 49152) -> list[int]:
    """Rows n of every regularized tensor of a SmolLM2-135M-shaped Llama, in model order."""
    per_layer = [hidden, kv, kv, hidden, intermediate, intermediate, hidden, 1, 1]
    return [vocab] + per_layer * layers + [1]


CLOCK: Callable[[], float] = time.perf_counter


def median_time(fn: Callable[[], object], repeats: int, before: Callable[[], None] | None = None) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up; ``before`` untimed.

    Wall time by default; process CPU time (all threads) with ``--cpu-time``, which is steadier
    than wall time on a machine shared with other jobs.
    """
    times = []
    for r in range(repeats + 1):
        if before is not None:
            before()
        t0 = CLOCK()
        fn()
        dt = CLOCK() - t0
        if r > 0:
            times.append(dt)
    return statistics.median(times)


def run(args: argparse.Namespace) -> str:
    rows = smollm2_rows(layers=2, vocab=4096) if args.quick else smollm2_rows()
    layout = SegmentLayout.from_blocks([(args.n_projections, n) for n in rows])
    gen = torch.Generator().manual_seed(0)
    x = PROJ_STD * torch.randn(layout.total, generator=gen)
    ref = sort_segments(PROJ_STD * torch.randn(layout.total, generator=gen), layout, "torch")
    reps = args.repeats
    lines = [
        (
            f"Sort step, {len(rows)} tensors, L = {args.n_projections}, {layout.num_segments} segments, "
            f"{layout.total / 1e6:.1f} M values; {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}; {'process CPU' if args.cpu_time else 'wall'} seconds"
        ),
        "",
        "| operation | median s | vs torch.sort | segments sorted / repaired / re-sorted |",
        "|---|---|---|---|",
    ]
    t_torch = median_time(lambda: sort_segments(x, layout, "torch"), reps)
    lines.append(f"| torch.sort (PyTorch backend) | {t_torch:.3f} | 1.0× | |")
    t = median_time(lambda: cpp.sort_segments(x, layout), reps)
    lines.append(f"| C++ sort, keys only | {t:.3f} | {t_torch / t:.1f}× | |")
    t = median_time(lambda: match_sorted(x, ref, layout, "torch"), reps)
    lines.append(f"| torch match (argsort + scatter) | {t:.3f} | {t_torch / t:.1f}× | |")
    t = median_time(lambda: cpp.match_sorted(x, ref, layout), reps)
    lines.append(f"| C++ match, full sort | {t:.3f} | {t_torch / t:.1f}× | |")

    for sigma in args.sigmas:
        state: dict = {}
        current = [x.clone()]
        cpp.match_sorted(current[0], ref, layout, state)
        counts = {"already_sorted": 0, "repaired": 0, "resorted": 0}

        def drift(sigma=sigma, current=current):
            current[0] = current[0] + sigma * torch.randn(layout.total, generator=gen)

        def call(state=state, current=current, counts=counts):
            cpp.match_sorted(current[0], ref, layout, state)
            for k in counts:
                counts[k] += state["cpp_stats"][k]

        t = median_time(call, reps, before=drift)
        total = sum(counts.values())
        shares = " / ".join(f"{100 * counts[k] / total:.0f}%" for k in ("already_sorted", "repaired", "resorted"))
        lines.append(f"| C++ match, reuse, drift σ = {sigma:g} | {t:.3f} | {t_torch / t:.1f}× | {shares} |")

    # reduction: value + gradient w.r.t. the projections, generic torch path vs fused C++
    def reduce(backend: str, state: dict | None) -> None:
        proj = x.clone().requires_grad_(True)
        value = swd_from_projections(proj, ref, layout, n_projections=args.n_projections, p=2.0,
                                     backend=backend, state=state)
        value.backward()

    t_generic = median_time(lambda: reduce("torch", None), reps)
    lines.append(f"| torch path: match + reduce + backward | {t_generic:.3f} | | |")
    t = median_time(lambda: reduce("cpp", None), reps)
    lines.append(f"| C++ fused: sort + reduce + gradient + backward | {t:.3f} | {t_generic / t:.1f}× vs torch path | |")
    kept: dict = {}
    reduce("cpp", kept)
    t = median_time(lambda: reduce("cpp", kept), reps)
    lines.append(f"| C++ fused, reuse (unchanged order) | {t:.3f} | {t_generic / t:.1f}× vs torch path | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers and a 4096-row embedding")
    parser.add_argument("--n-projections", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3],
                        help="per-step drift of the projections (std), for permutation reuse")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true", help="time process CPU seconds, not wall seconds")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if args.n_projections < 1 or args.repeats < 1:
        parser.error("--n-projections and --repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    if not cpp.available():
        print(f"the C++ extension is unavailable: {cpp.unavailable_reason()}", file=sys.stderr)
        return 1
    table = run(args)
    print(table)
    if args.output is not None:
        atomic_write_text(args.output, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
