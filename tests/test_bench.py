"""The benchmark baselines compute the regularizer of SNAP.md §2, and the benchmark runs end to end."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
import torch

from snap_fast import sliced_wasserstein_reference
from snap_fast.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_regularizer import (
    SMOLLM2_PARAMS,
    SMOLLM2_TENSORS,
    RefreshFloor,
    ResampleFloor,
    smollm2_shapes,
)
from peer import PeerRegularizer, PotRegularizer, draw_directions_cpu, peer_swd, pot_swd


def _pair(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    # W differs from W0 in distribution, so matched differences are O(1), far above bf16 rounding
    return torch.randn(n, d, generator=g), 2 * torch.randn(n, d, generator=g) + 1


@pytest.mark.parametrize("n,d", [(1, 7), (129, 7), (64, 576)])
@pytest.mark.parametrize("p", [2.0, 1.5])
def test_peer_and_pot_match_the_reference(n, d, p):
    w0, w = _pair(n, d, n + d)
    theta = draw_directions_cpu(d, 9, torch.Generator().manual_seed(1), torch.device("cpu"))
    w64 = w.double().requires_grad_(True)
    ref = sliced_wasserstein_reference(w0.double(), w64, theta.double(), p)
    ref.backward()
    for fn, w0_copy, rtol, gtol in [(peer_swd, w0.bfloat16(), 3e-2, 5e-2), (pot_swd, w0, 1e-5, 1e-4)]:
        leaf = w.clone().requires_grad_(True)
        value = fn(w0_copy, leaf, theta, p)
        value.backward()
        assert value.item() == pytest.approx(ref.item(), rel=rtol), fn.__name__
        err = ((leaf.grad.double() - w64.grad).norm() / w64.grad.norm()).item()
        assert err < gtol, (fn.__name__, err)


@pytest.mark.parametrize("cls, rtol", [(PeerRegularizer, 3e-2), (PotRegularizer, 1e-5)])
def test_baseline_loops_sum_over_tensors_with_fresh_directions(cls, rtol):
    shapes = [(40, 7), (7,), (3, 5, 2)]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    initial = [w.detach().clone() for w in params]
    reg = cls(params, n_projections=6, seed=3)
    with torch.no_grad():
        for w in params:
            w.mul_(2).add_(1)
    rows = [w.reshape(1, -1) if w.dim() == 1 else w.reshape(w.shape[0], -1) for w in params]
    # the loops draw per tensor, in order, from one CPU generator seeded with `seed`
    gen = torch.Generator().manual_seed(3)
    thetas = [draw_directions_cpu(r.shape[1], 6, gen, torch.device("cpu")) for r in rows]
    expected = sum(
        sliced_wasserstein_reference(w0.double(), w.detach().double(), th.double()).item()
        for w0, w, th in zip(initial, params, thetas)
    )
    value = reg()
    value.backward()
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected, rel=rtol)
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in params)
    assert reg().item() != value.item()  # fresh directions on the next call


def test_smollm2_shapes_match_snap_md():
    shapes = smollm2_shapes()
    assert len(shapes) == SMOLLM2_TENSORS == 272
    total = sum(torch.Size(s).numel() for _, s in shapes)
    assert total == SMOLLM2_PARAMS and round(total / 1e6, 1) == 134.5
    assert shapes[0] == ("embed_tokens.weight", (49152, 576))
    assert sum(len(s) == 1 for _, s in shapes) == 61  # 2 RMSNorm weights per layer + final norm


def test_quick_benchmark_end_to_end(tmp_path, capsys):
    out = tmp_path / "quick.md"
    rc = cli_main(
        ["bench", "--quick", "--layers", "1", "--vocab", "512", "--skip-pot", "--n-projections", "8",
         "--repeats", "1", "--output", str(out)]
    )
    assert rc == 0
    table = out.read_text()
    assert table in capsys.readouterr().out  # the printed table is the written one
    main, breakdown = table.split("Per-stage")
    assert "| peer loop | torch |" in main and "| 1.00× |" in main
    floor_row = next(line for line in main.splitlines() if line.startswith("| GEMM floor"))
    assert floor_row.split("|")[6].strip() == "1.00"  # the floor reads 1.00 against itself
    assert "| resample floor (draw Θ, W0 Θ + W Θ + G Θᵀ) | torch |" in main
    assert ("cannot pass" in main or "can reach at most" in main) and "the resample floor alone" in main
    assert "| refresh floor (K=10: GEMM floor, draw Θ and bf16 W0 Θ every K calls) | torch |" in main
    for line in (ln for ln in main.splitlines() if ln.startswith("| snap_fast")):
        cells = [c.strip() for c in line.split("|")]
        float(cells[7])  # every snap_fast mode reads against its own floor
        if line.startswith("| snap_fast fixed"):
            assert cells[7] == cells[6]  # fixed's own floor is the GEMM floor
    assert "POT per tensor" not in main
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert "Allocator: glibc malloc pinned" in main  # one allocator state for every implementation
    for mode in ("resample", "refresh (K=10, amortised)", "fixed"):
        assert f"| snap_fast {mode} | torch |" in main
        assert f"| snap_fast {mode} | torch |" in breakdown
    assert "| projection GEMM | sort/match | reduction | backward |" in breakdown
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left


def test_benchmark_rejects_bad_options(capsys):
    assert cli_main(["bench", "--quick", "--backends", "cuda"]) == 2
    assert "--backends" in capsys.readouterr().err
    assert cli_main(["bench", "--quick", "--repeats", "0"]) == 2
    assert cli_main(["bench", "--quick", "--layers", "0"]) == 2
    assert "--layers" in capsys.readouterr().err


def test_resample_floor_draws_fresh_unit_directions_and_does_the_three_products():
    params = [torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float32)), torch.nn.Parameter(torch.randn(5))]
    floor = ResampleFloor(params, n_projections=3, seed=0)
    floor().backward()
    first = [t.clone() for t in floor.thetas]
    for theta, w, out, out0, w0 in zip(floor.thetas, params, floor.outs, floor.outs0, floor.initial):
        mat = w.detach().reshape(w.shape[0] if w.dim() > 1 else 1, -1)
        torch.testing.assert_close(theta.norm(dim=0), torch.ones(3))  # unit directions (columns)
        torch.testing.assert_close(out, mat @ theta)  # W Θ
        torch.testing.assert_close(out0, (w0.float() @ theta).t())  # (W0 Θ)ᵀ from the bf16 copy
        torch.testing.assert_close(w.grad.reshape(mat.shape), out @ theta.t())  # dW = G Θᵀ (G := W Θ)
    floor()
    assert all(not torch.equal(a, b) for a, b in zip(first, floor.thetas))  # redrawn every call


def test_refresh_floor_redraws_every_k_calls_in_bf16_values():
    params = [torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float32))]
    floor = RefreshFloor(params, n_projections=3, seed=0, refresh_every=3)
    seen = []
    for _ in range(6):
        floor().backward()
        seen.append(floor.thetas[0].clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])  # kept within a window
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[5])  # redrawn at call K
    theta = seen[3]
    assert torch.equal(theta, theta.bfloat16().float())  # bf16 values, as refresh's bf16 GEMM needs
    torch.testing.assert_close(theta.norm(dim=0), torch.ones(3), atol=1e-2, rtol=0)  # unit up to bf16 rounding
    # its W0 Θ product, into the kept bf16 buffer: exact products, one bf16 rounding of the result
    want = (theta.t().double() @ floor.initial[0].double().t()).float()
    torch.testing.assert_close(floor.outs0[0].float(), want, rtol=2**-8, atol=1e-6)


def test_timing_crosscheck_peer_is_snap_md_and_runs_end_to_end(capsys):
    # the cross-check's own peer loop computes SNAP.md §2 (bf16 rounding aside), and the script runs
    import timing_crosscheck as xc

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in [(9, 7), (7,)]]
    peer = xc.PeerLoop(params, seed=3)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    value = peer()
    redraw = torch.Generator().manual_seed(3)
    want = 0.0
    for p, w0 in zip(params, peer.initial):
        theta = torch.randn(w0.shape[1], xc.L, generator=redraw)
        theta = (theta / theta.norm(dim=0, keepdim=True)).to(torch.bfloat16).double()
        want += float(sliced_wasserstein_reference(w0.double(), xc._matrix(p.detach()).double(), theta, p=2))
    assert abs(float(value) - want) / want < 2**-6  # the peer rounds W Θ and W0 Θ to bf16
    assert xc.main(["--threads", "1", "--rounds", "1", "--layers", "1", "--vocab", "64"]) == 0
    out = capsys.readouterr().out
    for name in ("peer loop", "GEMM floor", "fixed", "refresh", "resample"):
        assert f"| {name} |" in out
    assert len(xc.tensor_shapes()) == SMOLLM2_TENSORS
    assert sum(torch.Size(s).numel() for s in xc.tensor_shapes()) == SMOLLM2_PARAMS


def test_fused_pass_benchmark_builds_the_three_situations_and_compares_versions(tmp_path):
    # The three inputs are what their names say: the kept permutation of "kept order sorts"
    # sorts every segment, the stale one (the bf16 W0 Θ order) sorts almost none of the longer
    # ones; and a version built from a source file gives the installed extension's values.
    import bench_fused_pass as bfp

    from snap_fast.ops.swd import cpp

    if not cpp.available():
        pytest.skip(f"the C++ extension is unavailable: {cpp.unavailable_reason()}")
    buffers = bfp.flat_buffers(layers=1, vocab=300, n_projections=6, seed=0)
    segments = buffers["offsets"].numel() - 1
    module = cpp._module()
    inputs = bfp.case_inputs(module, buffers)
    scale = 1 / 6
    results = {}
    for case, (proj, ref, template, reuse, sort_ref) in inputs.items():
        perm = None if template is None else template.clone()
        value, _, stats = module.swd_forward(proj, ref, buffers["offsets"], perm, reuse, 2.0, scale, None, None,
                                                sort_ref)
        results[case] = (float(value), stats.tolist())
    assert results["kept order sorts"][1] == [segments, 0, 0]
    assert results["kept order stale"][1][2] > segments // 2
    # the same reference (sorted bf16 W0 Θ) and projections: the same value whatever the start order
    assert results["kept order sorts"][0] == results["kept order stale"][0]

    source = Path(bfp.__file__).resolve().parent.parent / "csrc" / "swd_cpu.cpp"
    out = tmp_path / "fused.md"
    argv = ["--threads", "1", "--rounds", "1", "--layers", "1", "--vocab", "300", "--n-projections", "6",
            "--sources", str(source), "--output", str(out)]
    assert bfp.main(argv) == 0
    table = out.read_text()
    for case in bfp.CASES:
        assert f"| {case} |" in table
    with pytest.raises(SystemExit):
        bfp.main(["--rounds", "0"])
