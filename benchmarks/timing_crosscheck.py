"""A second, independent timing of the whole-model regularizer, to check bench_regularizer.py.

Shares no code with ``bench_regularizer.py`` or ``peer.py``: its own SmolLM2-135M tensor list, its
own peer loop written from SNAP.md §2 (fresh CPU directions per tensor and call, a bf16 W0 copy,
bf16 projections, ``torch.sort``), its own GEMM floor (``W Θ`` forward, ``G Θᵀ`` backward, nothing
else), and snap_fast's three modes on the C++ backend. Differences from the benchmark, on purpose:
every implementation owns its model (no weights copied in and out between turns), and the
current weights start at ``W0 + N(0, 1e-3)`` from another generator.

Each round times every implementation once (forward + backward; ``refresh`` over K = 10 calls,
amortised), in an order shuffled per round, each followed by an SGD step (lr 1e-4) outside the
timer; medians over rounds after a warm-up round. ``--pin-malloc`` fixes glibc malloc's thresholds
as the benchmark does by default. Prints one markdown table::

    python benchmarks/timing_crosscheck.py --threads 2 --rounds 7 --pin-malloc
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import sys
import time

import torch

import snap_fast

L = 100
SGD_LR = 1e-4
REFRESH_K = 10


def tensor_shapes(layers: int = 30, vocab: int = 49152) -> list[tuple[int, ...]]:
    """SmolLM2-135M's trainable tensors (hidden 576, MLP 1536, 3 KV heads of 64, tied embedding)."""
    hidden, mlp, kv = 576, 1536, 192
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                   (mlp, hidden), (mlp, hidden), (hidden, mlp), (hidden,), (hidden,)]
    return [*shapes, (hidden,)]


def _matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(1, -1) if w.dim() == 1 else w


class PeerLoop:
    """SNAP.md §2's loop: per tensor, fresh unit directions on the CPU, ``W0 Θ`` from a bf16 copy,
    ``W Θ`` in bf16, two sorts, the squared differences summed (p = 2), divided by L."""

    def __init__(self, params: list[torch.nn.Parameter], seed: int):
        self.params = params
        self.initial = [_matrix(p.detach()).to(torch.bfloat16) for p in params]
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        total = torch.zeros(())
        for param, w0 in zip(self.params, self.initial):
            w = _matrix(param)
            theta = torch.randn(w.shape[1], L, generator=self.generator)
            theta = (theta / theta.norm(dim=0, keepdim=True)).to(torch.bfloat16)
            target = torch.sort(w0 @ theta, dim=0).values
            current = torch.sort(w.to(torch.bfloat16) @ theta, dim=0).values
            total = total + (current - target).float().square().sum() / L
        return total


class _Products(torch.autograd.Function):
    @staticmethod
    def forward(ctx, thetas, *params):  # type: ignore[override]
        ctx.thetas = thetas
        ctx.products = [_matrix(w) @ theta for w, theta in zip(params, thetas)]
        ctx.shapes = [w.shape for w in params]
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        # G := W Θ stands in for the (n, L) gradient of the projections
        grads = [(g @ theta.t()).view(shape) for g, theta, shape in zip(ctx.products, ctx.thetas, ctx.shapes)]
        return (None, *grads)


class ProductFloor:
    """The two products of every tensor an exact implementation must do, and nothing else."""

    def __init__(self, params: list[torch.nn.Parameter], seed: int):
        g = torch.Generator().manual_seed(seed)
        self.params = params
        self.thetas = [torch.randn(_matrix(p).shape[1], L, generator=g) for p in params]

    def __call__(self) -> torch.Tensor:
        return _Products.apply(self.thetas, *self.params)


def pin_malloc() -> None:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 * 2**20) != 1 or libc.mallopt(m_trim_threshold, 2**30) != 1:
        raise RuntimeError("glibc mallopt refused the thresholds")


def run(threads: int, rounds: int, layers: int, vocab: int, pin: bool) -> str:
    torch.set_num_threads(threads)
    if pin:
        pin_malloc()
    gen = torch.Generator().manual_seed(0)
    initial = [torch.randn(s, generator=gen) * 0.02 for s in tensor_shapes(layers, vocab)]
    names = ["peer loop", "GEMM floor", "fixed", "refresh", "resample"]
    models, impls = {}, {}
    for name in names:
        model = torch.nn.ParameterList([torch.nn.Parameter(w + 1e-3 * torch.randn(w.shape, generator=gen))
                                        for w in initial])
        params = list(model.parameters())
        if name == "peer loop":
            impl = PeerLoop(params, seed=1)
            with torch.no_grad():  # W0 is the unperturbed initial value, as for snap_fast
                impl.initial = [_matrix(w).to(torch.bfloat16) for w in initial]
        elif name == "GEMM floor":
            impl = ProductFloor(params, seed=1)
        else:
            holder = torch.nn.Module()
            holder.weights = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in initial])
            impl = snap_fast.SlicedWassersteinRegularizer(holder, n_projections=L, mode=name, refresh_every=REFRESH_K,
                                                          backend="cpp")
            with torch.no_grad():  # built from W0, then handed the perturbed current weights
                for mine, theirs in zip(holder.weights, params):
                    mine.copy_(theirs)
            params = list(holder.weights.parameters())
        models[name], impls[name] = params, impl
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(1)
    for r in range(rounds + 1):
        turn = list(names)
        order.shuffle(turn)
        for name in turn:
            params, calls = models[name], REFRESH_K if name == "refresh" else 1
            elapsed = 0.0
            for _ in range(calls):
                for p in params:
                    p.grad = None
                start = time.perf_counter()
                impls[name]().backward()
                elapsed += time.perf_counter() - start
                with torch.no_grad():
                    for p in params:
                        p.add_(p.grad, alpha=-SGD_LR)
            if r > 0:
                times[name].append(elapsed / calls)
    med = {name: statistics.median(v) for name, v in times.items()}
    lines = [f"Independent cross-check: {len(initial)} tensors, {threads} thread(s), median of {rounds} shuffled "
             f"round(s), glibc malloc {'pinned' if pin else 'as configured'}.", "",
             "| implementation | median s | vs peer | × floor |", "|---|---:|---:|---:|"]
    for name in names:
        lines.append(f"| {name} | {med[name]:.3f} | {med['peer loop'] / med[name]:.2f}× | "
                     f"{med[name] / med['GEMM floor']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=30, help="fewer layers for smoke tests")
    parser.add_argument("--vocab", type=int, default=49152, help="a smaller vocabulary for smoke tests")
    parser.add_argument("--pin-malloc", action="store_true", help="fix glibc malloc's thresholds (the benchmark's default)")
    args = parser.parse_args(argv)
    for name in ("threads", "rounds", "layers", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    print(run(args.threads, args.rounds, args.layers, args.vocab, args.pin_malloc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
