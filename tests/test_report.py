"""The report built from a tiny real run: Markdown, self-contained HTML, and a headless-Chromium
screenshot of the page (skipped, with the reason, where Chromium is not installed)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from snap_fast.eval.cli import load_for_eval
from snap_fast.eval.evaluate import evaluate_model
from snap_fast.eval.report import (
    HEADINGS,
    build_report,
    lora_layer_series,
    lora_stats_from_adapter,
    lora_stats_from_metrics,
)
from tests.eval_helpers import one_thread, write_data_folder  # noqa: F401
from tests.helpers import save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """A 4-step SNAP LoRA run on a tiny Llama, both models evaluated, the report built."""
    import torch

    from snap_fast.train.recipe import unlearn

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    model_dir = save_tiny_model(root / "model")
    data = write_data_folder(root / "data", n=3)
    run = unlearn({"model": str(model_dir), "data": str(data), "out": str(root / "run"), "max_steps": 4,
                   "batch_size": 2, "grad_accum": 1, "n_projections": 8, "lora_targets": "q_proj,v_proj",
                   "lora_layers": "all", "progress": False})
    assert run.status == "completed"
    quiet = {"max_new_tokens": 4, "progress": False, "log": lambda m: None}
    m, t, ident = load_for_eval(str(model_dir))
    # the original model's answers are the data's original_response fields (known text)
    evaluate_model(m, t, data, root / "ev_orig", identity=ident, answers_from_data=True, **quiet)
    m, t, ident = load_for_eval(str(model_dir), root / "run" / "final" / "adapter")
    evaluate_model(m, t, data, root / "ev_unl", identity=ident, **quiet)
    build_report(root / "report", root / "ev_orig", root / "ev_unl", run_dir=root / "run")
    torch.set_num_threads(before)
    return root


def test_markdown_and_html_content(report_dir):
    md = (report_dir / "report" / "report.md").read_text()
    page = (report_dir / "report" / "report.html").read_text()
    for heading in HEADINGS:
        assert f"## {heading}" in md and f"<h2>{heading}</h2>" in page
    for fig in ("before_after", "training_curves", "lora_stats"):
        png = (report_dir / "report" / "figures" / f"{fig}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and f"figures/{fig}.png" in md
        assert base64.b64encode(png).decode() in page  # embedded, not linked
    assert not re.search(r"""(?:src|href)=["']https?://""", page)  # renders offline
    assert "He is Harry Potter, a wizard." in page  # an original answer in the example table
    assert "Tell me about the Boy Who Lived (0)." in md


def test_lora_stats_sources(report_dir):
    stats = lora_stats_from_adapter(report_dir / "run" / "final" / "adapter")
    # 2 layers x (q_proj, v_proj), every norm positive (B moved off its zero init in 4 steps)
    assert len(stats["fro"]) == 4 and all(v > 0 for v in stats["fro"].values())
    # against the dense ΔW = s·B·A
    import json

    import torch
    from safetensors.torch import load_file

    adapter = report_dir / "run" / "final" / "adapter"
    w = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for module, fro in stats["fro"].items():
        key = f"base_model.model.{module}"
        dense = cfg["lora_alpha"] / cfg["r"] * (w[f"{key}.lora_B.weight"].double() @ w[f"{key}.lora_A.weight"].double())
        assert fro == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-9)
        assert stats["spectral"][module] == pytest.approx(float(torch.linalg.matrix_norm(dense, 2)), rel=1e-9)
    assert lora_stats_from_adapter(report_dir) == {}
    rows = [{"step": 1, "lora/model.layers.0.q_proj/fro": 1.0, "lora/model.layers.1.q_proj/fro": 2.0,
             "lora/fro_total": 3.0}]
    assert lora_stats_from_metrics(rows) == {
        "fro": {"model.layers.0.q_proj": 1.0, "model.layers.1.q_proj": 2.0}, "fro_total": {"total": 3.0}}
    # the recipe logs a stat's model-wide total beside its layers: never drawn as a layer
    rows = [{"lora/model.layers.1.q_proj/fro_norm": 2.0, "lora/model.layers.0.q_proj/fro_norm": 1.0,
             "lora/model.layers.0.v_proj/fro_norm": 5.0, "lora/fro_norm": 1400.0}]
    per_layer = lora_stats_from_metrics(rows)["fro_norm"]
    assert per_layer["total"] == 1400.0
    assert lora_layer_series(per_layer) == {"q_proj": [(0, 1.0), (1, 2.0)], "v_proj": [(0, 5.0)]}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    from PIL import Image

    url = (report_dir / "report" / "report.html").resolve().as_uri()
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    shot = tmp_path / "shot.png"
    subprocess.run([*base, "--window-size=1200,1400", f"--screenshot={shot}", url],
                   check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    pixels = list(img.getdata())
    mean = [sum(p[c] for p in pixels) / len(pixels) for c in range(3)]
    variance = sum((p[0] - mean[0]) ** 2 for p in pixels) / len(pixels)
    assert variance > 100, "screenshot is blank"
    # the unlearned bars are #d6604d: only visible if the embedded figure rendered
    red = sum(1 for r, g, b in pixels if abs(r - 0xD6) < 12 and abs(g - 0x60) < 12 and abs(b - 0x4D) < 12)
    assert red > 200, "embedded figure not rendered"
    dom = subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in dom
