"""One script for a CUDA machine: check, test and time snap_fast's regularizer in under 5 minutes.

Usage (on a GPU machine, from the repository root)::

    python3 benchmarks/gpu_check.py                  # writes benchmarks/results/gpu_<gpu>.md
    python3 benchmarks/gpu_check.py --skip-8b        # SmolLM2-135M shapes only
    python3 benchmarks/gpu_check.py --dry-run        # CPU, tiny shapes: checks the script itself

Sections (each one is a function; a failing section is reported in the output and the script
goes on):

1. ``section_environment``: torch, triton, CUDA and GPU name; imports the script relies on.
2. ``section_tests``: ``pytest -q tests/test_kernels_triton.py tests/test_regularizer.py`` run
   natively (``TRITON_INTERPRET`` removed from the environment).
3. ``section_timings``: whole-model regularizer forward + backward in bfloat16, L = 100, p = 2,
   on SmolLM2-135M and Llama-3.1-8B shapes (random weights, built directly as parameters), for
   the peer loop of SNAP.md §2, POT per tensor, and ``SlicedWassersteinRegularizer`` in modes
   ``resample``, ``refresh`` (K = 10, amortised over 10 calls) and ``fixed``. Medians of
   ``torch.cuda.Event`` timings, speed-up over the peer loop, achieved GB/s (weights read once +
   gradients written once, over the time) and its fraction of the measured device-to-device copy
   bandwidth, the bytes each implementation keeps besides the model, and peak memory.
4. Hooks filled by other parts of the project, each skipped with a note when absent:
   ``section_lora`` (``benchmarks/bench_lora.py: gpu_section()``), ``section_cuda_extension``
   (``snap_fast.ops.swd.cpp.cuda_available()`` → ``pytest tests/test_ext.py``) and ``section_training``
   (``benchmarks/bench_train.py: gpu_section()``). A ``gpu_section()`` takes no argument and
   returns markdown text (``str``) or a list of row dicts (rendered as a table).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from snap_fast.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
L_DIRECTIONS = 100
P = 2.0


# ------------------------------------------------------------------------------ report model
@dataclass
class Report:
    """Markdown sections collected as the script runs; written once at the end."""

    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body))
        print(f"\n## {heading}\n{body}", flush=True)

    def markdown(self) -> str:
        parts = [f"# {self.title}\n"]
        if self.failures:
            parts.append("Failed sections: " + ", ".join(self.failures) + "\n")
        parts += [f"## {h}\n\n{b}\n" for h, b in self.sections]
        return "\n".join(parts)


def run_section(report: Report, heading: str, fn: Callable[[], str]) -> None:
    """Run one section; an exception becomes a FAILED entry in the report, never a crash."""
    start = time.perf_counter()
    try:
        body = fn()
    except Exception as exc:  # noqa: BLE001 - every failure is reported, the script goes on
        report.failures.append(heading)
        body = f"**FAILED** ({type(exc).__name__}: {exc})\n\n```\n{traceback.format_exc()[-3000:]}```"
    report.add(heading, f"{body}\n\n_section time: {time.perf_counter() - start:.1f} s_")


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ------------------------------------------------------------------------------ 1. environment
def section_environment(device: torch.device) -> str:
    rows = [
        {"item": "python", "value": platform.python_version()},
        {"item": "torch", "value": torch.__version__},
        {"item": "CUDA (torch build)", "value": torch.version.cuda or "none"},
        {"item": "device", "value": device_name(device)},
    ]
    for module in ("triton", "snap_fast", "snap_fast.kernels.segmented_sort", "ot", "pytest"):
        try:
            mod = importlib.import_module(module)
            rows.append({"item": f"import {module}", "value": getattr(mod, "__version__", "ok")})
        except Exception as exc:  # noqa: BLE001 - a missing optional import is a row, not a crash
            rows.append({"item": f"import {module}", "value": f"FAILED: {type(exc).__name__}: {exc}"})
    rows.append({"item": "TRITON_INTERPRET", "value": os.environ.get("TRITON_INTERPRET", "unset")})
    return markdown_table(rows)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------ 2. native tests
def run_pytest(files: list[str], *, collect_only: bool, timeout_s: float) -> str:
    """``pytest -q`` on the files that exist, without the interpreter; a summary and the tail."""
    present = [f for f in files if (ROOT / f).exists()]
    missing = [f for f in files if f not in present]
    if not present:
        return f"skipped: none of {files} exists"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *present]
    if collect_only:
        cmd.append("--collect-only")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"**FAILED**: `{' '.join(cmd[2:])}` ran past {timeout_s:.0f} s"
    elapsed = time.perf_counter() - start
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = tail[-1] if tail else "(no output)"
    status = "passed" if proc.returncode == 0 else f"**FAILED** (exit {proc.returncode})"
    body = f"`{' '.join(cmd[2:])}`: {status} in {elapsed:.1f} s: {summary}"
    if missing:
        body += f"\n\nnot present (skipped): {', '.join(missing)}"
    if proc.returncode != 0:
        body += "\n\n```\n" + "\n".join(tail[-40:]) + "\n```"
    return body


# ------------------------------------------------------------------------------ 3. timings
def smollm2_135m_shapes() -> list[tuple[int, ...]]:
    """SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9/3 heads, vocab 49152, tied."""
    h, i, kv = 576, 1536, 3 * 64
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(49152, h)] + layer * 30 + [(h,)]


def llama31_8b_shapes() -> list[tuple[int, ...]]:
    """Llama-3.1-8B: hidden 4096, intermediate 14336, 32 layers, 32/8 heads, vocab 128256."""
    h, i, kv, vocab = 4096, 14336, 1024, 128256
    layer = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(vocab, h)] + layer * 32 + [(h,), (vocab, h)]


def tiny_shapes() -> list[tuple[int, ...]]:
    """A toy decoder for --tiny / --dry-run: checks the script's logic on the CPU in seconds."""
    h, i = 64, 160
    layer = [(h, h), (16, h), (16, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(512, h)] + layer * 2 + [(h,)]


class ShapeModel(torch.nn.Module):
    """Parameters of the given shapes, random (std 0.02), in one ParameterList."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device):
        super().__init__()
        params = []
        for shape in shapes:
            t = torch.empty(shape, dtype=dtype, device=device)
            t.normal_(0.0, 0.02)
            params.append(torch.nn.Parameter(t))
        self.weights = torch.nn.ParameterList(params)

    @torch.no_grad()
    def perturb(self, scale: float = 1e-3) -> None:
        """Move the weights away from the snapshot, one tensor at a time (bounded temporaries)."""
        for p in self.parameters():
            p.add_(torch.randn_like(p), alpha=scale)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def peer_loop(model: torch.nn.Module, initial_bf16: list[torch.Tensor], n_projections: int, p: float):
    """The authors' loop (SNAP.md §2): per tensor, fresh CPU directions copied over, bf16 copy of
    W0, two matmuls, two ``torch.sort`` along the rows, a sum; a Python loop over the tensors."""
    total = 0.0
    for w, w0 in zip(model.parameters(), initial_bf16):
        a = w.reshape(1, -1) if w.dim() == 1 else w
        a0 = w0.reshape(1, -1) if w0.dim() == 1 else w0
        theta = torch.randn(a.shape[1], n_projections)
        theta = (theta / theta.norm(dim=0, keepdim=True)).to(device=a.device, dtype=torch.bfloat16)
        proj = (a @ theta.to(a.dtype)).to(torch.bfloat16)
        with torch.no_grad():
            proj0 = a0 @ theta
        diff = torch.sort(proj, dim=0).values - torch.sort(proj0, dim=0).values
        total = total + diff.abs().pow(p).sum() / n_projections
    return total


def pot_loop(model: torch.nn.Module, initial_bf16: list[torch.Tensor], n_projections: int, p: float):
    """POT's ``sliced_wasserstein_distance`` per tensor (torch backend, float32 on the device),
    scaled to SNAP's sum over rows: n · SW_p^p."""
    import ot

    total = 0.0
    for w, w0 in zip(model.parameters(), initial_bf16):
        a = (w.reshape(1, -1) if w.dim() == 1 else w).float()
        a0 = (w0.reshape(1, -1) if w0.dim() == 1 else w0).float()
        theta = torch.randn(a.shape[1], n_projections, device=a.device)
        theta = theta / theta.norm(dim=0, keepdim=True)
        sw = ot.sliced_wasserstein_distance(a0, a, projections=theta, p=int(p))
        total = total + a.shape[0] * sw**p
    return total


class Timer:
    """Milliseconds of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def copy_bandwidth_gbs(device: torch.device, nbytes: int, timer: Timer, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth: bytes read + bytes written over the median time."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


@dataclass
class Measurement:
    implementation: str
    median_ms: float | None
    kept_bytes: int | None = None
    peak_bytes: int | None = None
    note: str = ""


def measure(
    name: str,
    model: ShapeModel,
    timer: Timer,
    step: Callable[[], torch.Tensor],
    *,
    calls_per_sample: int,
    repeats: int,
    kept_bytes: Callable[[], int] | None = None,
) -> Measurement:
    """Median time of ``calls_per_sample`` forward+backward calls of ``step``, per call."""

    def sample() -> None:
        for _ in range(calls_per_sample):
            step().backward()

    def clear_grads() -> None:
        for p in model.parameters():
            p.grad = None

    clear_grads()
    sample()  # warm-up: Triton compilation, cuBLAS heuristics, allocator growth
    timer.sync()
    if timer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(timer.device)
    times = []
    for _ in range(repeats):
        clear_grads()
        timer.sync()
        times.append(timer(sample) / calls_per_sample)
    peak = torch.cuda.max_memory_allocated(timer.device) if timer.device.type == "cuda" else None
    clear_grads()
    return Measurement(name, statistics.median(times), kept_bytes() if kept_bytes else None, peak)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_baselines(model: ShapeModel, timer: Timer, repeats: int) -> list[Measurement]:
    """The peer loop and POT per tensor, from a bf16 snapshot of the current weights."""
    initial = [p.detach().to(torch.bfloat16, copy=True) for p in model.parameters()]
    model.perturb()
    copy_bytes = sum(t.numel() * t.element_size() for t in initial)
    baselines = [
        ("peer loop (SNAP.md §2)", peer_loop, repeats),
        ("POT per tensor", pot_loop, max(1, repeats // 2)),
    ]
    out = []
    for name, loop, n in baselines:
        if loop is pot_loop and importlib.util.find_spec("ot") is None:
            out.append(Measurement(name, None, note="n/a: POT not importable"))
            continue
        try:
            out.append(
                measure(
                    name, model, timer, lambda loop=loop: loop(model, initial, L_DIRECTIONS, P),
                    calls_per_sample=1, repeats=n, kept_bytes=lambda: copy_bytes,
                )
            )
        except Exception as exc:  # noqa: BLE001 - one failing implementation is a row
            out.append(Measurement(name, None, note=f"FAILED: {type(exc).__name__}: {exc}"[:300]))
    return out


def time_model(
    label: str,
    shapes: list[tuple[int, ...]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    copy_gbs: float,
    deadline: float,
) -> str:
    """Every implementation on one model shape; a markdown table."""
    from snap_fast import SlicedWassersteinRegularizer

    timer = Timer(device)
    torch.manual_seed(0)
    model = ShapeModel(shapes, dtype, device)
    weight_bytes = model.weight_bytes()
    # Weights read once + gradients (same dtype) written once: the memory floor of one call.
    floor_bytes = 2 * weight_bytes
    n_params = sum(p.numel() for p in model.parameters())
    results: list[Measurement] = []

    def over_budget(name: str) -> bool:
        if time.perf_counter() > deadline:
            results.append(Measurement(name, None, note="skipped: time budget spent"))
            return True
        return False

    def guarded(name: str, body: Callable[[], Measurement]) -> None:
        if over_budget(name):
            return
        try:
            results.append(body())
        except Exception as exc:  # noqa: BLE001 - one failing implementation is a row
            results.append(Measurement(name, None, note=f"FAILED: {type(exc).__name__}: {exc}"[:300]))
        free_memory(device)

    # The peer and POT both keep a full bf16 copy of the initial weights, as the authors do; it
    # lives only inside this call.
    if not over_budget("peer loop (SNAP.md §2)"):
        results.extend(time_baselines(model, timer, repeats))
    free_memory(device)

    # Each regularizer snapshots the weights at construction; perturbing afterwards makes the
    # distance non-zero, as in training. The refresh mode is timed over blocks of K = 10 calls.
    for mode, calls in (("resample", 1), ("refresh", 10), ("fixed", 1)):
        name = f"snap_fast {mode}" + (" (K=10, amortised)" if mode == "refresh" else "")

        def body(mode: str = mode, calls: int = calls, name: str = name) -> Measurement:
            reg = SlicedWassersteinRegularizer(
                model, n_projections=L_DIRECTIONS, p=P, mode=mode, refresh_every=10
            )
            model.perturb()
            m = measure(
                name, model, timer, reg, calls_per_sample=calls, repeats=repeats,
                kept_bytes=reg.cache_nbytes,
            )
            m.note = f"backend={reg.backend}"
            return m

        guarded(name, body)

    peer_ms = next((m.median_ms for m in results if m.implementation.startswith("peer")), None)
    rows = []
    for m in results:
        row = {"implementation": m.implementation}
        if m.median_ms is None:
            row["median ms"] = "—"
        else:
            row["median ms"] = f"{m.median_ms:.2f}"
            row["× vs peer"] = f"{peer_ms / m.median_ms:.2f}" if peer_ms else "—"
            gbs = floor_bytes / (m.median_ms * 1e-3) / 1e9
            row["GB/s"] = f"{gbs:.1f}"
            row["of copy BW"] = f"{100 * gbs / copy_gbs:.1f} %"
        if m.kept_bytes is not None:
            row["kept / weights"] = f"{100 * m.kept_bytes / weight_bytes:.2f} %"
        if m.peak_bytes is not None:
            row["peak GiB"] = f"{m.peak_bytes / 2**30:.1f}"
        row["note"] = m.note
        rows.append(row)
    header = (
        f"{label}: {len(shapes)} tensors, {n_params / 1e6:.1f} M parameters, {dtype}, "
        f"L = {L_DIRECTIONS}, p = {P:g}, forward + backward per call, median of {repeats}. "
        f"Memory floor per call: {floor_bytes / 1e9:.2f} GB (weights read + gradients written); "
        f"measured copy bandwidth {copy_gbs:.0f} GB/s. 'kept / weights': bytes kept besides the "
        "model (initial-weight copy, caches) over the weight bytes."
    )
    return header + "\n\n" + markdown_table(rows)


# ------------------------------------------------------------------------------ 4. hooks
def _load_benchmark_module(filename: str):
    path = ROOT / "benchmarks" / filename
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"_snap_fast_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def hook_section(filename: str) -> str:
    """Call ``gpu_section()`` of ``benchmarks/<filename>`` if it defines one."""
    module = _load_benchmark_module(filename)
    if module is None or not callable(getattr(module, "gpu_section", None)):
        return f"skipped: benchmarks/{filename} does not define gpu_section()"
    result = module.gpu_section()
    if isinstance(result, list):
        return markdown_table(result)
    return str(result)


def section_cuda_extension(timeout_s: float) -> str:
    try:
        ext = importlib.import_module("snap_fast.ops.swd.cpp")
    except ImportError as exc:
        return f"skipped: snap_fast.ops.swd.cpp not importable ({exc})"
    if not callable(getattr(ext, "cuda_available", None)):
        return "skipped: snap_fast.ops.swd.cpp has no cuda_available()"
    if not ext.cuda_available():
        reason = getattr(ext, "unavailable_reason", lambda kind: None)("cuda")
        return f"skipped: CUDA extension unavailable ({reason})"
    return run_pytest(["tests/test_ext.py"], collect_only=False, timeout_s=timeout_s)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy shapes instead of SmolLM2/Llama")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check the script on the CPU: implies --device cpu --tiny, pytest only collects",
    )
    parser.add_argument("--skip-tests", action="store_true", help="skip the native pytest run")
    parser.add_argument("--skip-8b", action="store_true", help="skip the Llama-3.1-8B shapes")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per implementation")
    parser.add_argument("--budget-s", type=float, default=270.0, help="skip timings started after this")
    parser.add_argument("--out", type=Path, default=None, help="markdown output path")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry-run to check the script on the CPU")
        return 2
    name = device_name(device)
    report = Report(f"snap_fast GPU check: {name}")
    run_section(report, "1. Environment", lambda: section_environment(device))

    tests = ["tests/test_kernels_triton.py", "tests/test_regularizer.py"]
    if args.skip_tests:
        report.add("2. Native tests", "skipped: --skip-tests")
    else:
        run_section(
            report, "2. Native tests",
            lambda: run_pytest(tests, collect_only=args.dry_run or device.type != "cuda", timeout_s=150),
        )

    copy_holder: dict[str, float] = {}

    def copy_bw() -> str:
        nbytes = (16 << 20) if args.tiny else (2 << 30)
        copy_holder["gbs"] = copy_bandwidth_gbs(device, nbytes, Timer(device))
        return f"device-to-device copy of {nbytes / 2**30:.2f} GiB: {copy_holder['gbs']:.0f} GB/s (read + write)"

    run_section(report, "3a. Copy bandwidth", copy_bw)
    copy_gbs = copy_holder.get("gbs", float("nan"))
    models = [("toy decoder", tiny_shapes())] if args.tiny else [("SmolLM2-135M shapes", smollm2_135m_shapes())]
    if not args.tiny and not args.skip_8b:
        models.append(("Llama-3.1-8B shapes", llama31_8b_shapes()))
    for i, (label, shapes) in enumerate(models):
        run_section(
            report, f"3{'bcd'[i]}. Regularizer timings: {label}",
            lambda label=label, shapes=shapes: time_model(
                label, shapes, device=device, dtype=torch.bfloat16, repeats=args.repeats,
                copy_gbs=copy_gbs, deadline=deadline,
            ),
        )
        free_memory(device)

    run_section(report, "4a. LoRA mode (issue 3 hook)", lambda: hook_section("bench_lora.py"))
    if device.type == "cuda":
        run_section(report, "4b. CUDA segmented-sort extension", lambda: section_cuda_extension(120))
    else:
        report.add("4b. CUDA segmented-sort extension", "skipped: not on a CUDA device")
    run_section(report, "4c. Training overhead (hook)", lambda: hook_section("bench_train.py"))

    report.add("Total", f"{time.perf_counter() - start:.1f} s")
    out = args.out
    if out is None and not args.dry_run:
        out = RESULTS / f"gpu_{slug(name)}.md"
    if out is not None:
        atomic_write_text(out, report.markdown())
        print(f"\nwrote {out}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
