"""The one script a GPU loan runs: build, verify and time snap_fast on the card, in at most 6 minutes.

Usage (from the repository root)::

    python3 benchmarks/gpu_check.py             # GPU: writes benchmarks/results/gpu_<card>.{json,md}
    python3 benchmarks/gpu_check.py --dry-run   # CPU: runs what can run on toy shapes, skips the rest
    python3 benchmarks/gpu_check.py --only build,precision --budget-s 120

A 15-minute loan can run it twice. Every step runs in its own child process with its own time
limit, cut to what is left of the total budget (``--budget-s``, default 330 s): a step that
fails, crashes or hangs is recorded as such and the next step runs; a step that would start after
the budget is spent is recorded as skipped. Without a CUDA device every GPU step is recorded as
skipped, with the reason, in a few seconds. The C++/CUDA extensions are built first, in a fresh
directory of their own (``SNAP_FAST_CACHE``), so no step can wait on another process's build lock.

Steps (:data:`STEPS`; each child prints one JSON object, see :func:`child_main`):

* ``environment``: versions, device, imports the steps rely on.
* ``build``: the C++ CPU extension and the CUDA segmented-sort extension, with a timeout.
* ``triton_blocks``: every Triton kernel at every block size (16 … 4096, full and ragged
  segments) against ``torch.sort`` / float64 Grams; registers and spills per compiled kernel.
* ``cub``: CUB's segmented sort on long segments against ``torch.sort``; the regularizer's long
  segment path run under ``torch.cuda.set_sync_debug_mode("error")`` to prove it never syncs.
* ``precision``: bf16 / fp16 / fp32 weights on odd shapes, value and gradient against float64.
* ``determinism``: fixed directions identical across regularizers and across a CPU → CUDA resume.
* ``tf32``: fp32 SmolLM2-shaped regularizer with and without TF32: time and value change.
* ``smollm2``: SmolLM2-135M shapes, bf16: the peer loop of SNAP.md §2 and every mode, interleaved.
* ``llama8b``: Llama-3.1-8B shapes, bf16, fixed and resample forward + backward, per-stage
  profiler breakdown, against the bandwidth floor (read W once + write dW once).
* ``lora``: LoRA regularizer and LoRA-delta statistics on CUDA tensors against dense
  computations on the CPU, then ``benchmarks/bench_lora.py: gpu_section()`` (share of a step).
* ``train``: ``benchmarks/bench_train.py: gpu_section()``, a training step with and without the
  regularizer (last: it gets what the budget has left).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_BUDGET_S = 330.0
L_DIRECTIONS = 100


# ---------------------------------------------------------------------------------- the steps
@dataclass(frozen=True)
class Step:
    name: str
    timeout_s: float
    needs_cuda: bool
    what: str


STEPS: tuple[Step, ...] = (
    Step("environment", 30, False, "versions, device, imports"),
    Step("build", 150, True, "C++ CPU and CUDA extensions in their own directory"),
    Step("triton_blocks", 60, True, "Triton kernels at every block size; registers and spills"),
    Step("cub", 30, True, "CUB long-segment sort vs torch.sort; no host sync"),
    Step("precision", 30, True, "bf16/fp16/fp32 on odd shapes vs float64"),
    Step("determinism", 25, True, "fixed directions across regularizers and a CPU -> CUDA resume"),
    Step("tf32", 40, True, "fp32 with and without TF32"),
    Step("smollm2", 60, True, "SmolLM2-135M shapes: peer loop and every mode"),
    Step("llama8b", 100, True, "Llama-3.1-8B shapes: fixed and resample with a profile"),
    Step("lora", 60, True, "LoRA regularizer and delta stats on CUDA"),
    Step("train", 60, True, "training step with and without the regularizer (bench_train.py)"),
)


@dataclass
class StepResult:
    name: str
    status: str  # "ok", "failed", "timeout", "skipped"
    seconds: float
    reason: str = ""
    markdown: str = ""
    data: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------- the runner
def run_child(command: list[str], timeout_s: float, env: dict[str, str]) -> tuple[str, str, float]:
    """Run ``command`` in its own process group; ``(status, stdout or reason, seconds)``.

    On timeout the whole group is killed (a compiler or build the step started dies with it).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", f"killed after {timeout_s:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((err or out).strip().splitlines()[-25:])
        return "failed", f"exit {proc.returncode}: {tail}", seconds
    return "ok", out, seconds


def parse_child_output(name: str, out: str, seconds: float) -> StepResult:
    """The step's result from the last JSON line a child printed."""
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if not lines:
        return StepResult(name, "failed", seconds, "the step printed no JSON result")
    try:
        payload = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        return StepResult(name, "failed", seconds, f"unreadable result: {exc}")
    return StepResult(name, payload.get("status", "ok"), seconds, payload.get("reason", ""),
                      payload.get("markdown", ""), payload.get("data", {}))


def run_steps(
    steps: list[Step], command_for: Callable[[Step], list[str]], *, budget_s: float,
    skip_reason: Callable[[Step], str | None], env: dict[str, str], log: Callable[[str], None] = print,
) -> list[StepResult]:
    """Every step in order, each time-boxed to ``min(its timeout, what is left of the budget)``.

    A step ``skip_reason`` names a reason for is skipped with it; a step whose turn comes after
    the budget is spent is skipped; a failed or timed-out step never stops the next one.
    """
    deadline = time.monotonic() + budget_s
    results = []
    for step in steps:
        left = deadline - time.monotonic()
        reason = skip_reason(step)
        if reason:
            result = StepResult(step.name, "skipped", 0.0, reason)
        elif left < 1.0:
            result = StepResult(step.name, "skipped", 0.0, f"total budget of {budget_s:.0f} s spent")
        else:
            limit = min(step.timeout_s, left)
            status, out, seconds = run_child(command_for(step), limit, env)
            if status == "ok":
                result = parse_child_output(step.name, out, seconds)
            else:
                result = StepResult(step.name, status, seconds, out)
        log(f"[gpu_check] {step.name}: {result.status} in {result.seconds:.1f} s"
            + (f" ({result.reason.splitlines()[0][:160]})" if result.reason else ""))
        results.append(result)
    return results


def render(title: str, results: list[StepResult], total_s: float) -> str:
    """The markdown report: a summary table, then each step's own section."""
    lines = [f"# {title}", "", f"Total {total_s:.0f} s.", "", "| step | status | s | note |", "|---|---|---:|---|"]
    for r in results:
        note = r.reason.splitlines()[0][:120].replace("|", "/") if r.reason else ""
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {note} |")
    for r in results:
        if r.markdown or r.status in ("failed", "timeout"):
            lines += ["", f"## {r.name}", ""]
            if r.markdown:
                lines.append(r.markdown)
            if r.status in ("failed", "timeout"):
                lines += ["", "```", r.reason[-3000:], "```"]
    return "\n".join(lines) + "\n"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ------------------------------------------------------------------------------ helpers used by steps
def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def rel_err(a, b) -> float:

    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


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
    """A toy decoder: the dry run's stand-in for the real shapes."""
    h, i = 64, 160
    layer = [(h, h), (16, h), (16, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return [(512, h)] + layer * 2 + [(h,)]


def shaped_model(shapes, dtype, device, seed: int = 0):
    """Parameters of the given shapes, std 0.02, in one ParameterList."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype))
              for s in shapes]
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList(params)
    return model


def perturb(model, scale: float = 1e-3) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=scale)


def time_ms(fn: Callable[[], object], device, repeats: int) -> float:
    """Median milliseconds of ``fn`` after one warm-up call (CUDA events on a GPU)."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(reg, params) -> Callable[[], None]:
    def call() -> None:
        for p in params:
            p.grad = None
        reg().backward()

    return call


# ------------------------------------------------------------------------------ step bodies
# Each takes (device, tiny) and returns (markdown, data); raising makes the step "failed".
def step_environment(device, tiny):
    import torch

    rows = [{"item": "python", "value": platform.python_version()}, {"item": "torch", "value": torch.__version__},
            {"item": "CUDA (torch build)", "value": torch.version.cuda or "none"},
            {"item": "device", "value": device_name(device)}]
    for module in ("triton", "snap_fast", "snap_fast.kernels.segmented_sort", "transformers", "peft", "pytest"):
        try:
            mod = __import__(module, fromlist=["_"])
            rows.append({"item": f"import {module}", "value": getattr(mod, "__version__", "ok")})
        except Exception as exc:  # noqa: BLE001 - a missing import is a row, the steps that need it fail
            rows.append({"item": f"import {module}", "value": f"FAILED: {type(exc).__name__}: {exc}"[:200]})
    return markdown_table(rows), {r["item"]: r["value"] for r in rows}


def step_build(device, tiny):
    from snap_fast.ops.swd import cpp

    rows = []
    for kind, available in (("cpu", cpp.available), ("cuda", cpp.cuda_available)):
        start = time.perf_counter()
        ok = available()
        rows.append({"extension": kind, "built": ok, "s": round(time.perf_counter() - start, 1),
                     "reason": "" if ok else str(cpp.unavailable_reason(kind))[:200]})
    return markdown_table(rows), {"extensions": rows}


def step_triton_blocks(device, tiny):
    import torch

    from kernels import lora_gram, segmented_sort
    from snap_fast.ops.swd.layout import SegmentLayout

    blocks = [16, 64] if tiny else [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for block in blocks:
        for length in sorted({block, max(block - 3, block // 2 + 1)}):
            layout = SegmentLayout.from_blocks([(3, length)])
            x = torch.randn(layout.total, generator=gen, device=device)
            ref = torch.sort(torch.randn(layout.total, generator=gen, device=device).view(3, length), dim=1).values
            out = torch.full((layout.total,), float("nan"), device=device)  # every element must be written
            got = segmented_sort.sort_segments_triton(x, layout, out=out)
            want = torch.sort(x.view(3, length), dim=1).values.reshape(-1)
            targets = segmented_sort.match_sorted_triton(x, ref.reshape(-1), layout)
            cost = ((x.view(3, length) - targets.view(3, length)) ** 2).sum()
            want_cost = ((torch.sort(x.view(3, length), dim=1).values - ref) ** 2).sum()
            rows.append({"kernel": "sort/match", "block": block, "length": length,
                         "sort exact": bool(torch.equal(got, want)),
                         "match cost rel err": f"{rel_err(cost, want_cost):.1e}"})
    rows += _compiled_kernel_rows(segmented_sort)
    mats = [torch.randn(m, r, generator=gen, device=device) for m, r in ((5000, 8), (97, 16), (4096, 64))]
    grams = lora_gram.gram_matrices_triton(mats)
    err = max(rel_err(g, (m.double().t() @ m.double())) for g, m in zip(grams, mats))
    rows.append({"kernel": "lora gram", "block": lora_gram.BLOCK_M, "length": "5000/97/4096 rows",
                 "sort exact": "", "match cost rel err": f"max rel err vs float64 {err:.1e}"})
    failed = [r for r in rows if r.get("sort exact") is False]
    if failed:
        raise AssertionError(f"Triton sort differs from torch.sort at {[(r['block'], r['length']) for r in failed]}")
    return markdown_table(rows), {"rows": rows}


def _compiled_kernel_rows(module) -> list[dict]:
    """Registers and spills of every compiled variant of the module's Triton kernels (read from
    Triton's per-device JIT caches; a layout this Triton does not have gives one row saying so)."""
    rows = []
    for name in ("_sort_segments_kernel", "_match_sorted_kernel"):
        kernel = getattr(module, name)
        try:
            for cache in getattr(kernel, "device_caches", {}).values():
                compiled = cache[0] if isinstance(cache, tuple) else cache
                for key, ck in dict(compiled).items():
                    if hasattr(ck, "_init_handles"):
                        ck._init_handles()
                    rows.append({"kernel": name, "block": re.findall(r"BLOCK[^0-9]*(\d+)", str(key))[:1] or "?",
                                 "registers": getattr(ck, "n_regs", "?"), "spills": getattr(ck, "n_spills", "?")})
        except Exception as exc:  # noqa: BLE001 - the counts are a report, not a check
            rows.append({"kernel": name, "block": "?", "registers": f"unreadable: {type(exc).__name__}: {exc}"[:120]})
    return rows


def step_cub(device, tiny):
    import torch

    from snap_fast import SlicedWassersteinRegularizer
    from snap_fast.ops.swd import cpp

    if not cpp.cuda_available():
        return f"skipped: CUDA extension unavailable ({cpp.unavailable_reason('cuda')})", {"skipped": True}
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for count, n in ((4, 128256), (100, 5000), (3, 4097)):
        block = torch.randn(count, n, generator=gen, device=device)
        values, idx = cpp.cuda_sort_rows(block)
        want = torch.sort(block, dim=1).values
        rows.append({"segments": f"{count} × {n}", "values exact": bool(torch.equal(values, want)),
                     "indices consistent": bool(torch.equal(torch.gather(block, 1, idx), values))})
    model = shaped_model([(20000, 64), (64,)], torch.float32, device)
    reg = SlicedWassersteinRegularizer(model, n_projections=16, mode="fixed")
    perturb(model)
    reg().backward()  # warm-up: compilations and allocations may sync once
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        reg().backward()
        syncs = "none"
    except RuntimeError as exc:
        syncs = f"SYNC: {exc}"[:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows.append({"segments": "regularizer, 20000-row tensor (long segments)", "values exact": "",
                 "indices consistent": f"host syncs: {syncs}"})
    return markdown_table(rows), {"rows": rows, "host_syncs": syncs}


def step_precision(device, tiny):
    import torch

    from snap_fast import (
        random_projections,
        sliced_wasserstein,
        sliced_wasserstein_reference,
    )

    rows = []
    for dtype, shape in ((torch.bfloat16, (257, 576)), (torch.float16, (96, 40)), (torch.float32, (257, 576)),
                         (torch.bfloat16, (1, 577))):
        gen = torch.Generator().manual_seed(3)
        w0 = (0.02 * torch.randn(shape, generator=gen)).to(dtype)
        w = (w0.float() + 0.002 * torch.randn(shape, generator=gen)).to(dtype)
        theta = random_projections(shape[1], 16, generator=gen)
        w64 = w.double().requires_grad_()
        ref = sliced_wasserstein_reference(w0.double(), w64, theta.double())
        ref.backward()
        leaf = w.to(device).requires_grad_()
        got = sliced_wasserstein(w0.to(device), leaf, projections=theta.to(device))
        got.backward()
        rows.append({"dtype": str(dtype).split(".")[-1], "shape": f"{shape[0]}×{shape[1]}",
                     "value rel err": f"{rel_err(got, ref):.1e}", "grad rel err": f"{rel_err(leaf.grad, w64.grad):.1e}",
                     "≤ 2 %": rel_err(leaf.grad, w64.grad) <= 0.02})
    return markdown_table(rows), {"rows": rows}


def step_determinism(device, tiny):
    import torch

    from snap_fast import SlicedWassersteinRegularizer

    shapes = tiny_shapes()
    model = shaped_model(shapes, torch.float32, device)
    a = SlicedWassersteinRegularizer(model, mode="fixed", seed=5, cache_directions=False)
    b = SlicedWassersteinRegularizer(model, mode="fixed", seed=5, cache_directions=False)
    perturb(model)
    same_values = a().item() == b().item() == a().item()
    same_dirs = all(torch.equal(x, y) for x, y in zip(a.last_directions(), b.last_directions()))
    # a state saved on the CPU, loaded on the device: the CPU-drawn directions are used again
    cpu_model = shaped_model(shapes, torch.float32, torch.device("cpu"))
    cpu_reg = SlicedWassersteinRegularizer(cpu_model, mode="fixed", seed=5, reference_dtype=torch.float32)
    state = cpu_reg.state_dict()
    perturb(cpu_model)
    cpu_value = cpu_reg().item()
    dev_model = shaped_model(shapes, torch.float32, device)
    with torch.no_grad():
        for p, q in zip(dev_model.parameters(), cpu_model.parameters()):
            p.copy_(q)
    dev_reg = SlicedWassersteinRegularizer(dev_model, mode="fixed", seed=9, reference_dtype=torch.float32)
    dev_reg.load_state_dict(state)
    resumed = dev_reg().item()
    rows = [{"check": "two fixed regularizers, same seed: same directions", "result": same_dirs},
            {"check": "repeated calls, same weights: bitwise equal values", "result": same_values},
            {"check": "CPU state -> device regularizer of another seed: value rel diff",
             "result": f"{abs(resumed - cpu_value) / abs(cpu_value):.1e}"}]
    return markdown_table(rows), {"rows": rows}


def step_tf32(device, tiny):
    import torch

    from snap_fast import SlicedWassersteinRegularizer

    model = shaped_model(tiny_shapes() if tiny else smollm2_135m_shapes(), torch.float32, device)
    params = list(model.parameters())
    reg = SlicedWassersteinRegularizer(model, mode="fixed", reference_dtype=torch.float32)
    perturb(model)
    rows, values = [], {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        values[tf32] = reg().item()
        rows.append({"TF32": tf32, "fixed fwd+bwd ms": f"{time_ms(fwd_bwd(reg, params), device, 5):.2f}",
                     "value": f"{values[tf32]:.6g}"})
    torch.backends.cuda.matmul.allow_tf32 = False
    rows.append({"TF32": "value rel change", "fixed fwd+bwd ms": "",
                 "value": f"{abs(values[True] - values[False]) / abs(values[False]):.1e}"})
    return markdown_table(rows), {"rows": rows}


def _modes_table(shapes, device, dtype, repeats: int, with_peer: bool, modes) -> tuple[str, dict]:
    """Every implementation on one shape list, interleaved rounds; medians."""

    from snap_fast import SlicedWassersteinRegularizer

    model = shaped_model(shapes, dtype, device)
    params = list(model.parameters())
    regs = {m: SlicedWassersteinRegularizer(model, n_projections=L_DIRECTIONS, mode=m, refresh_every=10) for m in modes}
    if with_peer:  # the authors' loop of SNAP.md §2 (benchmarks/peer.py), snapshot like the others
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from peer import PeerRegularizer

        peer = PeerRegularizer(params, L_DIRECTIONS)
    perturb(model)
    calls: dict[str, Callable[[], None]] = {m: fwd_bwd(r, params) for m, r in regs.items()}
    if with_peer:
        calls = {"peer loop": fwd_bwd(peer, params), **calls}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(time_ms(call, device, 1))
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    rows = []
    peer_ms = statistics.median(times["peer loop"]) if with_peer else None
    for name, ts in times.items():
        ms = statistics.median(ts)
        row = {"implementation": name, "median ms": f"{ms:.2f}",
               "GB/s (W read + dW written)": f"{2 * weight_bytes / (ms * 1e-3) / 1e9:.0f}"}
        if peer_ms:
            row["× vs peer"] = f"{peer_ms / ms:.2f}"
        if name in regs:
            row["backend"] = regs[name].backend
            row["kept / weights"] = f"{100 * regs[name].cache_nbytes() / weight_bytes:.2f} %"
        rows.append(row)
    return markdown_table(rows), {"rows": rows, "weight_bytes": weight_bytes}


def step_smollm2(device, tiny):
    import torch

    text, data = _modes_table(tiny_shapes() if tiny else smollm2_135m_shapes(), device, torch.bfloat16,
                              repeats=3, with_peer=True, modes=("resample", "refresh", "fixed"))
    return "SmolLM2-135M shapes, bf16, L = 100, interleaved rounds, medians.\n\n" + text, data


def step_llama8b(device, tiny):
    import torch

    shapes = tiny_shapes() if tiny else llama31_8b_shapes()
    copy_gbs = _copy_bandwidth(device, (16 << 20) if tiny else (4 << 30))
    text, data = _modes_table(shapes, device, torch.bfloat16, repeats=3, with_peer=False, modes=("fixed", "resample"))
    floor_ms = 2 * data["weight_bytes"] / (copy_gbs * 1e9) * 1e3
    profile = _stage_profile(shapes, device)
    head = (f"Llama-3.1-8B shapes, bf16, L = 100. Bandwidth floor (read W once + write dW once at the measured "
            f"copy bandwidth {copy_gbs:.0f} GB/s): {floor_ms:.1f} ms.")
    data.update({"copy_gbs": copy_gbs, "floor_ms": floor_ms, "profile": profile})
    return f"{head}\n\n{text}\n\nTop device kernels, fixed mode, one call:\n\n{markdown_table(profile)}", data


def _copy_bandwidth(device, nbytes: int) -> float:
    import torch

    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, 5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _stage_profile(shapes, device) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from snap_fast import SlicedWassersteinRegularizer

    model = shaped_model(shapes, torch.bfloat16, device)
    reg = SlicedWassersteinRegularizer(model, mode="fixed")
    perturb(model)
    call = fwd_bwd(reg, list(model.parameters()))
    call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:12]
    return [{"kernel / op": e.key[:70], "calls": e.count, "ms": f"{getattr(e, key, 0.0) / 1e3:.2f}"} for e in events]


def step_lora(device, tiny):
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from lora_models import dense_stats, lora_layers, peft_model

    from snap_fast import SlicedWassersteinRegularizer, lora_delta_stats
    from snap_fast.ops.lora_stats import STAT_KEYS

    model = peft_model("llama", 8, False)
    dense = {name: dense_stats(m) for name, m in lora_layers(model)}  # float64 on the CPU
    reg_cpu = SlicedWassersteinRegularizer(model, mode="fixed", n_projections=16, reference_dtype=torch.float32)
    value_cpu = reg_cpu().item()
    model_dev = model.to(device)
    rows = []
    for backend in ("torch", "triton") if device.type == "cuda" else ("torch",):
        stats = lora_delta_stats(model_dev, backend=backend)
        worst = {key: max(abs(stats[n][key] - d[key]) / max(abs(d[key]), 1e-12) for n, d in dense.items())
                 for key in STAT_KEYS}
        rows.append({"check": f"lora_delta_stats ({backend}) on {device.type} vs dense float64: max rel err",
                     "result": ", ".join(f"{k} {v:.0e}" for k, v in worst.items()),
                     "≤ 1e-4": max(worst.values()) <= 1e-4})
    reg_dev = SlicedWassersteinRegularizer(model_dev, mode="fixed", n_projections=16, reference_dtype=torch.float32)
    reg_dev.load_state_dict(reg_cpu.state_dict())
    value_dev = reg_dev().item()
    rows.append({"check": "LoRA regularizer, CPU state resumed on the device: value rel diff",
                 "result": f"{abs(value_dev - value_cpu) / abs(value_cpu):.1e}", "≤ 1e-4": ""})
    text = markdown_table(rows)
    if device.type == "cuda":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import bench_lora

        text += "\n\n" + str(bench_lora.gpu_section())
    return text, {"rows": rows}


def step_train(device, tiny):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train

    return str(bench_train.gpu_section(device=device.type, tiny=tiny)), {}


STEP_BODIES: dict[str, Callable] = {
    "environment": step_environment, "build": step_build, "triton_blocks": step_triton_blocks, "cub": step_cub,
    "precision": step_precision, "determinism": step_determinism, "tf32": step_tf32, "smollm2": step_smollm2,
    "llama8b": step_llama8b, "lora": step_lora, "train": step_train,
}
# Steps whose logic can run on the CPU in a dry run (the Triton ones under the interpreter).
DRY_RUN_STEPS = ("environment", "triton_blocks", "precision", "determinism", "lora")


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------ processes
def child_main(step_name: str, dry_run: bool) -> int:
    """Run one step in this process and print its result as one JSON line."""
    import torch

    sys.path.insert(0, str(ROOT))
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    markdown, data = STEP_BODIES[step_name](device, dry_run)
    skipped = isinstance(data, dict) and data.get("skipped")
    payload = {"status": "skipped" if skipped else "ok", "markdown": markdown, "data": data}
    print(json.dumps(payload, default=str))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"total time budget in seconds (default {DEFAULT_BUDGET_S:.0f}, at most 360)")
    parser.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: run the steps whose logic runs on the CPU on toy shapes (Triton interpreted)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where gpu_<card>.{json,md} go (default: benchmarks/results on a GPU; nowhere otherwise)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv)
    if not 0 < args.budget_s <= 360:
        parser.error(f"--budget-s must be in (0, 360], got {args.budget_s}")
    names = [s.name for s in STEPS]
    if args.only is not None:
        chosen = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown or not chosen:
            parser.error(f"--only: unknown step(s) {unknown or chosen}; steps are {names}")
        args.only = chosen
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step is not None:
        return child_main(args.step, args.dry_run)
    import torch

    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    steps = [s for s in STEPS if args.only is None or s.name in args.only]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # the Triton steps run interpreted on the CPU
    else:
        # A fresh extension cache: no step can wait on a build lock another process holds.
        env["SNAP_FAST_CACHE"] = tempfile.mkdtemp(prefix="snap_fast_gpu_check_")
    script = str(Path(__file__).resolve())

    def command_for(step: Step) -> list[str]:
        return [sys.executable, script, "--step", step.name] + (["--dry-run"] if args.dry_run else [])

    def skip_reason(step: Step) -> str | None:
        if args.dry_run:
            return None if step.name in DRY_RUN_STEPS else "needs a CUDA device (not part of the dry run)"
        if step.needs_cuda and not cuda:
            return "no CUDA device visible (torch.cuda.is_available() is False)"
        return None

    results = run_steps(steps, command_for, budget_s=args.budget_s, skip_reason=skip_reason, env=env)
    card = torch.cuda.get_device_name(0) if cuda else device_name(torch.device("cpu"))
    total = time.perf_counter() - start
    report = render(f"snap_fast GPU check: {card}", results, total)
    print(report)
    out_dir = args.out_dir if args.out_dir is not None else (RESULTS if cuda else None)
    if out_dir is not None:
        from snap_fast.io import atomic_write_text

        stem = f"gpu_{slug(card)}"
        payload = {"card": card, "total_s": total, "budget_s": args.budget_s, "steps": [asdict(r) for r in results]}
        atomic_write_text(Path(out_dir) / f"{stem}.json", json.dumps(payload, indent=1, default=str) + "\n")
        atomic_write_text(Path(out_dir) / f"{stem}.md", report)
        print(f"wrote {Path(out_dir) / stem}.json and .md")
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
