"""The C++ fused pass alone (``swd_forward``: sort, value, gradient), one or several versions of it.

The whole-model benchmark (``bench_regularizer.py``) times the fused pass inside calls whose GEMMs
are ten times longer, so a change of a few milliseconds in the pass is lost in the run-to-run
spread of the call. This script times just the pass on SmolLM2-135M-shaped flat buffers
(272 tensors, L directions, 20.5 M projections at L = 100), in the three situations a
regularizer meets:

* ``kept order sorts``: fixed / refresh between redraws, after a small step: the kept
  permutation still sorts almost every segment;
* ``kept order stale``: the first call after a refresh redraw: the kept permutation sorts the
  bf16 ``W0 Θ``, far from sorting ``W Θ``;
* ``unsorted reference``: resample: ``W0 Θ`` handed over unsorted (``ref_sorted=False``).

``--sources A.cpp B.cpp ...`` builds each file (a version of ``csrc/swd_cpu.cpp``, e.g. from
``git show REV:csrc/swd_cpu.cpp``) as its own module and times them interleaved in one process,
in an order shuffled per round; without it the installed extension is timed. Every version must
give the same value (float64, same summation order) as the first::

    git show HEAD~1:csrc/swd_cpu.cpp > /tmp/before.cpp
    python benchmarks/bench_fused_pass.py --threads 2 --sources /tmp/before.cpp csrc/swd_cpu.cpp
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_regularizer import smollm2_shapes

from snap_fast.ops.swd import cpp
from snap_fast.ops.swd.layout import SegmentLayout

CASES = ("kept order sorts", "kept order stale", "unsorted reference")
DRIFT = 1e-3  # W - W0 per entry, against weights of scale 0.02: a few training steps' worth


def load_sources(paths: list[Path]) -> dict[str, object]:
    """One extension module per source file, named by its content hash (built once, cached), with
    the compiler flags of the installed extension."""
    from torch.utils.cpp_extension import load

    cflags, ldflags = cpp._cpu_flags()
    modules: dict[str, object] = {}
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--sources: {path} is not a file")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        build = Path(tempfile.gettempdir()) / f"snap_fast_fused_pass_{digest}"
        build.mkdir(exist_ok=True)
        modules[f"{path.name} ({digest})"] = load(
            f"snap_fast_fused_pass_{digest}", [str(path)], extra_cflags=cflags, extra_ldflags=ldflags,
            build_directory=str(build), verbose=False,
        )
    return modules


def flat_buffers(layers: int, vocab: int, n_projections: int, seed: int) -> dict[str, torch.Tensor]:
    """Flat (L, n)-per-tensor projections of W0 (its bf16 copy) and of W = W0 + drift."""
    g = torch.Generator().manual_seed(seed)
    initial, current, lengths = [], [], []
    for _, shape in smollm2_shapes(layers=layers, vocab=vocab):
        n, d = (1, shape[0]) if len(shape) == 1 else shape
        base = torch.ones(n, d) if len(shape) == 1 else torch.zeros(n, d)
        w0 = base + 0.02 * torch.randn(n, d, generator=g)
        w = w0 + DRIFT * torch.randn(n, d, generator=g)
        theta = torch.randn(d, n_projections, generator=g)
        theta /= theta.norm(dim=0, keepdim=True)
        initial.append((w0.bfloat16().float() @ theta).t().reshape(-1))
        current.append((w @ theta).t().reshape(-1))
        lengths.append(n)
    layout = SegmentLayout.from_blocks([(n_projections, n) for n in lengths])
    return {"w0_theta": torch.cat(initial), "w_theta": torch.cat(current), "offsets": layout.offsets("cpu")}


def case_inputs(module: object, buffers: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Per case: (proj, reference, template permutation or None, reuse, sort_ref)."""
    x, w0x, offsets = buffers["w_theta"], buffers["w0_theta"], buffers["offsets"]
    n = x.numel()
    sorted_ref = module.sort_segments(w0x.bfloat16(), offsets, torch.empty(n, dtype=torch.bfloat16), None)
    own_order = torch.empty(n, dtype=torch.int32)
    module.sort_segments(x, offsets, None, own_order)
    w0_order = torch.empty(n, dtype=torch.int32)
    module.sort_segments(w0x.bfloat16(), offsets, torch.empty(n, dtype=torch.bfloat16), w0_order)
    return {
        "kept order sorts": (x, sorted_ref, own_order, True, False),
        "kept order stale": (x, sorted_ref, w0_order, True, False),
        "unsorted reference": (x, w0x, None, False, True),
    }


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    if args.sources:
        modules = load_sources([Path(s) for s in args.sources])
    else:
        if not cpp.available():
            raise SystemExit(f"the C++ extension is unavailable: {cpp.unavailable_reason()}")
        modules = {"installed": cpp._module()}
    buffers = flat_buffers(args.layers, args.vocab, args.n_projections, args.seed)
    first = next(iter(modules.values()))
    inputs = case_inputs(first, buffers)
    grad = torch.empty_like(buffers["w_theta"])
    scale = 1.0 / args.n_projections
    times = {(case, name): [] for case in CASES for name in modules}
    values: dict[tuple[str, str], float] = {}
    counts: dict[str, list[int]] = {}
    order = random.Random(args.seed)
    for r in range(args.rounds + 1):  # round 0 warms up
        jobs = [(case, name) for case in CASES for name in modules]
        order.shuffle(jobs)
        for case, name in jobs:
            proj, ref, template, reuse, sort_ref = inputs[case]
            perm = None if template is None else template.clone()
            start = time.perf_counter()
            value, _, stats = modules[name].swd_forward(proj, ref, buffers["offsets"], perm, reuse, 2.0, scale,
                                                        None, grad, sort_ref)
            elapsed = time.perf_counter() - start
            if r == 0:
                values[(case, name)] = float(value)
                counts.setdefault(case, stats.tolist())
            else:
                times[(case, name)].append(elapsed)
    names = list(modules)
    for case in CASES:
        for name in names[1:]:
            a, b = values[(case, names[0])], values[(case, name)]
            if abs(a - b) > 1e-12 * max(abs(a), 1e-30):
                raise SystemExit(f"{case}: {name} gives {b!r}, {names[0]} gives {a!r}")
    total = buffers["w_theta"].numel()
    header = ["case", "segments sorted / repaired / resorted"]
    header += [f"{name} ms" for name in names] + [f"{name} vs first" for name in names[1:]]
    lines = [
        (f"# Fused pass alone: {total / 1e6:.1f} M projections, L = {args.n_projections}, "
         f"{args.threads} thread(s), median of {args.rounds} interleaved round(s)"),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for case in CASES:
        med = [statistics.median(times[(case, name)]) * 1e3 for name in names]
        row = [case, " / ".join(str(c) for c in counts[case])]
        row += [f"{m:.1f}" for m in med] + [f"{med[0] / m:.2f}×" for m in med[1:]]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"torch {torch.__version__}, values equal across versions (float64, same summation order)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", help="versions of csrc/swd_cpu.cpp to compare (default: installed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--n-projections", type=int, default=100)
    parser.add_argument("--layers", type=int, default=30, help="fewer layers for smoke tests")
    parser.add_argument("--vocab", type=int, default=49152, help="a smaller vocabulary for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="markdown file to write (default: print only)")
    args = parser.parse_args(argv)
    for name in ("threads", "rounds", "n_projections", "layers", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    table = run(args)
    print(table, end="")
    if args.output:
        out = Path(args.output)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(table)
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
