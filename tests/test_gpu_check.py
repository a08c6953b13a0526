"""CPU-side logic of benchmarks/gpu_check.py: shapes, report assembly, failure handling, output.

The timings themselves need a GPU; ``python3 benchmarks/gpu_check.py --dry-run`` runs the whole
script on toy shapes on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import load_benchmark

gpu_check = load_benchmark("gpu_check")


def _numel(shapes):
    return sum(torch.Size(s).numel() for s in shapes)


def test_model_shapes_match_the_published_architectures():
    smol = gpu_check.smollm2_135m_shapes()
    assert len(smol) == 272  # SNAP.md §5: 272 tensors, 134.5 M parameters
    assert round(_numel(smol) / 1e6, 1) == 134.5
    llama = gpu_check.llama31_8b_shapes()
    assert len(llama) == 32 * 9 + 3
    assert 8.02e9 < _numel(llama) < 8.04e9  # Llama-3.1-8B: 8.03 B parameters, untied head


def test_failing_section_is_reported_and_the_report_goes_on(tmp_path):
    report = gpu_check.Report("t")

    def boom() -> str:
        raise RuntimeError("kaput")

    gpu_check.run_section(report, "A", boom)
    gpu_check.run_section(report, "B", lambda: gpu_check.markdown_table([{"x": 1, "y": "z"}]))
    assert report.failures == ["A"]
    text = report.markdown()
    assert "Failed sections: A" in text and "RuntimeError: kaput" in text
    assert "| x | y |\n|---|---|\n| 1 | z |" in text
    out = tmp_path / "sub" / "gpu_x.md"
    gpu_check.atomic_write_text(out, text)
    assert out.read_text() == text
    assert [p.name for p in out.parent.iterdir()] == ["gpu_x.md"]  # no temp file left behind


def test_peer_and_pot_loops_agree_with_the_float64_reference():
    from snap_fast.ops.swd.naive import sliced_wasserstein_reference

    pytest.importorskip("ot")
    torch.manual_seed(0)
    model = gpu_check.ShapeModel([(6, 5), (5,)], torch.float32, torch.device("cpu"))
    initial = [p.detach().to(torch.bfloat16, copy=True) for p in model.parameters()]
    model.perturb(0.05)
    # Both loops draw their directions from the global RNG, tensor by tensor: replay it.
    state = torch.get_rng_state()
    peer = gpu_check.peer_loop(model, initial, 7, 2.0)
    torch.set_rng_state(state)
    pot = gpu_check.pot_loop(model, initial, 7, 2.0)
    torch.set_rng_state(state)
    expected = 0.0
    for w, w0 in zip(model.parameters(), initial):
        d = w.shape[-1]
        theta = torch.randn(d, 7)
        theta = theta / theta.norm(dim=0, keepdim=True)
        expected += sliced_wasserstein_reference(w0.double(), w.detach().double(), theta.double()).item()
    assert expected > 0
    # POT runs in float32: tight. The peer casts projections to bf16 (3 significant digits).
    assert pot.item() == pytest.approx(expected, rel=1e-4)
    assert peer.item() == pytest.approx(expected, rel=3e-2)


def test_dry_run_arguments():
    args = gpu_check.parse_args(["--dry-run"])
    assert args.device == "cpu" and args.tiny
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--repeats", "0"])
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
