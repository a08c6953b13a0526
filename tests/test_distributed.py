"""torch.distributed: the FSDP2-sharded regularizer, DDP and FSDP2 training, failures (CPU, gloo, 2 ranks).

Multi-process checks run in ``tests/distributed_worker.py``, started here as 2 processes with
the environment ``torchrun`` sets. Process start-up dominates on 2 shared cores, so one module
fixture overlaps everything: one launch runs every cooperative scenario, a second launch kills
a rank on purpose, and meanwhile this process computes the single-process reference run. Every
launch is bounded: the process-group timeout is set and the workers are killed at a deadline.

Tolerances: float32 throughout; the sharded paths sum the same terms in another order (per-rank
partial sums, then an all-reduce), so values agree to a relative 1e-5 and gradients to 1e-5 of
their largest entry.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from snap_fast.dist import (
    DistributedContext,
    ShardedSlicedWassersteinRegularizer,
    init_from_env,
    predicted_comm_bytes,
)
from snap_fast.regularizer import SlicedWassersteinRegularizer
from snap_fast.train.parallel import DataParallel

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parents[1]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Launch:
    """WORLD worker processes started in the background (so several launches can overlap)."""

    def __init__(self, scenarios: str, out: Path, kwargs: dict | None = None, *, pg_timeout_s: float = 60):
        out.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        port = _free_port()
        self.procs, self.logs = [], []
        for rank in range(WORLD):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1",
                   "SNAP_FAST_TEST_PG_TIMEOUT": str(pg_timeout_s), "PYTHONPATH": str(ROOT)}
            path = out / f"log-{scenarios.replace(',', '_')}-{rank}.txt"
            log = self._stack.enter_context(open(path, "w+", encoding="utf-8"))  # noqa: SIM115 (closed in finish)
            args = [sys.executable, str(WORKER), scenarios, str(out)] + ([json.dumps(kwargs)] if kwargs else [])
            self.procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            self.logs.append(log)

    def finish(self, deadline_s: float) -> list[tuple[int, str]]:
        """Wait up to ``deadline_s`` in all; kill our own workers if they are still running."""
        end = time.monotonic() + deadline_s
        with self._stack:
            try:
                for p in self.procs:
                    p.wait(timeout=max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"distributed workers did not finish within {deadline_s} s (hang?)")
            finally:
                for p in self.procs:  # only our own workers, by their handles
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            results = []
            for p, log in zip(self.procs, self.logs):
                log.seek(0)
                results.append((p.returncode, log.read()))
        return results


def _read(out: Path, scenario: str) -> list[dict]:
    return [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(WORLD)]


def _train_config(tmp: Path, name: str) -> dict:
    return {"model": str(tmp / "model"), "data": str(tmp / "data"), "out": str(tmp / name), "device": "cpu",
            "max_steps": 3, "batch_size": 2, "grad_accum": 3, "lr": 1e-3, "lora": False, "log_every": 1,
            "save_every": 2, "progress": False, "seed": 0,
            # the regularizer on (the default λ is 0), so its value is compared across processes too
            "lam": 0.1,
            # one retain term for every run compared here (the default picks nll under FSDP full
            # fine-tuning, kl elsewhere; test_train_config checks that rule)
            "retain_loss": "nll"}


def _lora_config(tmp: Path, name: str) -> dict:
    """LoRA with the merged model saved, and the fixed-mode (sharded) regularizer cache (λ set: LoRA's
    default is 0)."""
    return {**_train_config(tmp, name), "lora": True, "merge": True, "lr": 1e-2, "reg_mode": "fixed", "lam": 0.1}


def _write_data(folder: Path) -> None:
    """A small data folder in the data contract's format (8 forget, 6 retain, 4 general)."""
    folder.mkdir(parents=True)

    def rows(prefix, n, kind, response):
        return [{"id": f"{prefix}{i}", "prompt": f"Question {prefix}{i} about topic {i}?",
                 "response": response(i), "original_response": f"Original answer {i}.", "kind": kind,
                 "source": "pattern"} for i in range(n)]

    sets = {"forget": rows("f", 8, "question", lambda i: "I'm not familiar with that."),
            "retain": rows("r", 6, "neighbour", lambda i: f"Original answer {i}."),
            "general": rows("g", 4, "general", lambda i: f"Original answer {i}.")}
    for name, records in sets.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (folder / "target.json").write_text(json.dumps({"name": "Harry Potter", "aliases": [], "description": "",
                                                    "facts": [], "neighbours": []}), encoding="utf-8")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """All multi-process work, overlapped: one 2-rank launch of the cooperative scenarios
    (sharded regularizer, LoRA, communication count, FSDP2 and DDP training), one 2-rank launch
    where a rank dies, and meanwhile the single-process reference run in this process."""
    from snap_fast.train import unlearn
    from tests.helpers import save_tiny_model

    tmp = tmp_path_factory.mktemp("dist")
    save_tiny_model(tmp / "model")
    _write_data(tmp / "data")
    # grad_accum 3 on 2 ranks: uneven micro-batch shares and a 1-micro-batch last step.
    fsdp = [{**_train_config(tmp, "run_fsdp"), "parallel": "fsdp"},
            {**_lora_config(tmp, "run_fsdp_lora"), "parallel": "fsdp"}]
    kwargs = {"ddp_unlearn": {"config": _train_config(tmp, "run_ddp"), "stop_after": 2},
              "fsdp_unlearn": {"configs": fsdp, "stop_after": 2},
              "refusal": {"config": _train_config(tmp, "run_ddp")}}
    started = time.monotonic()
    main = _Launch("regularizer,lora,comm,fsdp_train,ddp_unlearn,fsdp_unlearn,refusal", tmp / "out", kwargs)
    die = _Launch("die", tmp / "die", pg_timeout_s=30)
    for config in (_train_config(tmp, "run_single"), _lora_config(tmp, "run_single_lora")):
        assert unlearn(config).status == "completed"
    die_codes = die.finish(deadline_s=300)
    # Every failed rank's log: the first rank to fail is often not the one that reports first.
    failed = [f"rank {rank} failed (exit {code}):\n{log[-3000:]}"
              for rank, (code, log) in enumerate(main.finish(deadline_s=400)) if code != 0]
    assert not failed, "\n\n".join(failed)
    return tmp, die_codes, time.monotonic() - started


def test_sharded_regularizer_equals_single_process(launched):
    ranks = _read(launched[0] / "out", "regularizer")
    records = list(zip(*[r["results"] for r in ranks]))
    assert len(records) == 20
    for per_rank in records:
        a = per_rank[0]
        # the returned value is the global one, bitwise identical on every rank
        assert all(r["value"] == a["value"] for r in per_rank)
        assert a["value"] == pytest.approx(a["expected"], rel=1e-5), a
        assert a["expected"] > 0
        for r in per_rank:  # each rank's shard gradient equals its rows of the full gradient
            assert r["grad_err"] <= 1e-5 * max(1.0, r["grad_scale"]), r
            assert r["grad_scale"] > 0
    # the "odd" model exercises uneven row shards, a rank with no rows, and 1-D column shards
    odd = ranks[0]["results"][0]
    assert odd["model"] == "odd" and odd["kinds"][0] >= 3 and odd["kinds"][1] >= 4


def test_sharded_lora_equals_single_process(launched):
    ranks = _read(launched[0] / "out", "lora")
    for per_rank in zip(*[r["results"] for r in ranks]):
        a = per_rank[0]
        assert a["n_lora"] >= 8 and a["n_grads"] >= 16  # every adapted layer, A and B factors
        assert all(r["value"] == a["value"] for r in per_rank)
        assert a["value"] == pytest.approx(a["expected"], rel=1e-5) and a["expected"] > 0
        for r in per_rank:
            assert r["grad_err"] <= 1e-5 * max(1.0, r["grad_scale"]), r


def test_fixed_mode_cache_is_sharded_by_directions(launched):
    ranks = _read(launched[0] / "out", "regularizer")
    for i, rec in enumerate(ranks[0]["results"]):
        owned = [r["results"][i]["owned_values"] for r in ranks]
        # every sorted initial projection of a row-sharded tensor lives on exactly one rank
        assert sum(owned) == rec["row_values"]
        assert max(owned) <= math.ceil(rec["row_values"] / WORLD)


def test_measured_bytes_equal_the_formula(launched):
    for r in _read(launched[0] / "out", "comm"):
        shapes = [tuple(s) for s in r["shapes"]]
        for mode in ("fixed", "resample"):
            predicted = predicted_comm_bytes(shapes, r["L"], WORLD, mode=mode, rank=r["rank"])
            assert r[mode] == predicted["total"] > 0
        assert r["resample"] > r["fixed"]


def test_fsdp2_training_equals_single_process(launched):
    ranks = _read(launched[0] / "out", "fsdp_train")
    single, sharded = ranks[0]["single"], ranks[0]["sharded"]
    assert len(single) == len(sharded) == 4
    assert ranks[1]["sharded"] == sharded  # logged values agree on every rank
    for (loss_s, reg_s), (loss_d, reg_d) in zip(single, sharded):
        assert loss_d == pytest.approx(loss_s, rel=1e-5)
        assert reg_d == pytest.approx(reg_s, rel=1e-4, abs=1e-8)
    assert single[-1][1] > 0  # the weights moved, so the regularizer was active


def test_ddp_unlearn_equals_single_process_and_resumes(launched):
    folder = launched[0]
    ranks = _read(folder / "out", "ddp_unlearn")
    assert all(r["status"] == "completed" and r["steps"] == 3 for r in ranks)

    def lines(name):
        return [json.loads(x) for x in (folder / name / "metrics.jsonl").read_text().splitlines()]

    ddp, single = lines("run_ddp"), lines("run_single")
    # rank 0 alone wrote the folder: one line per step, steps after the resume not doubled
    assert [m["step"] for m in ddp] == [m["step"] for m in single] == [1, 2, 3]
    for a, b in zip(ddp, single):
        for key in ("loss", "loss_forget", "loss_retain", "loss_general", "reg", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
        assert a["tokens"] == b["tokens"]
    run = folder / "run_ddp"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert (run / "final" / "merged").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp2_unlearn_equals_single_process_and_resumes(launched, lora):
    """``unlearn`` with ``parallel="fsdp"`` on 2 ranks, stopped after step 2 and resumed, logs the
    losses of an uninterrupted single-process run with the same global batch (relative 1e-5:
    float32, partial sums reduced in another order) and writes a loadable final model."""
    from transformers import AutoModelForCausalLM

    folder = launched[0]
    run, single = (folder / "run_fsdp_lora", folder / "run_single_lora") if lora else (folder / "run_fsdp", folder / "run_single")
    result = _read(folder / "out", "fsdp_unlearn")
    assert [r["runs"][int(lora)]["status"] for r in result] == ["completed"] * WORLD
    got, want = _metrics(run), _metrics(single)
    # steps 1-2 before the stop, step 3 after the resume (checkpoint step-2), one line each
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3]
    for a, b in zip(got, want):
        for key in ("loss", "loss_forget", "loss_retain", "loss_general", "reg", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
        assert a["tokens"] == b["tokens"]
    assert want[-1]["reg"] > 0  # the weights moved: the regularizer took part
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]
    state = torch.load(run / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False)
    assert [r["rank"] for r in state["regularizer_ranks"]] == [0, 1]  # one state per rank
    assert (run / "checkpoints" / "step-3" / "optimizer.pt").is_file()

    # The final model, gathered on rank 0, equals the single-process one.
    merged = AutoModelForCausalLM.from_pretrained(run / "final" / "merged")
    expected = AutoModelForCausalLM.from_pretrained(single / "final" / "merged")
    for (name, p), q in zip(merged.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    if lora:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "model"),
                                            run / "final" / "adapter").eval()
        ids = torch.arange(2, 14).unsqueeze(0)
        with torch.no_grad():
            torch.testing.assert_close(adapted(input_ids=ids).logits, merged.eval()(input_ids=ids).logits,
                                       rtol=1e-4, atol=1e-5)


def test_fsdp2_resume_needs_the_same_number_of_processes(launched, tmp_path):
    """The sharded regularizer's state is per rank: a 1-process resume of a 2-rank run is refused."""
    import shutil

    from snap_fast.train import UnlearnConfig, unlearn

    run = tmp_path / "copy"
    shutil.copytree(launched[0] / "run_fsdp_lora", run)
    config = {**_lora_config(launched[0], "unused"), "parallel": "fsdp", "out": str(run), "resume": True}
    (run / "config.yaml").write_text(UnlearnConfig.from_dict(config).resolved().to_yaml())  # the copy's own out
    with pytest.raises(ValueError, match="written by 2 FSDP2 processes.*same number of processes"):
        unlearn(config)


def test_rank0_refusal_stops_every_rank(launched):
    errors = [r["error"] for r in _read(launched[0] / "out", "refusal")]
    assert errors[0] is not None and "config differs" in errors[0] and "lr" in errors[0]
    assert errors[1] is not None and errors[1].startswith("rank 0: ") and errors[0] in errors[1]


def test_a_dead_rank_makes_the_others_fail_fast(launched):
    folder, codes, elapsed = launched
    assert codes[1][0] == 17  # the rank that died
    assert codes[0][0] == 0, codes[0][1][-3000:]
    result = json.loads((folder / "die" / "die-rank0.json").read_text())
    assert result["error"] is not None and "another rank probably died" in result["error"]
    assert result["seconds"] < 30  # detected before the process-group timeout, not by it
    assert elapsed < 400


# ------------------------------------------------------------------ single-process checks
def test_split_reproduces_the_single_process_step():
    micro = list(range(5))
    for m in range(1, 6):
        shares = [DataParallel(DistributedContext(rank=r, world_size=3)).split(micro[:m]) for r in range(3)]
        assert len({len(s) for s in shares}) == 1  # same number of backward passes per rank
        real = sorted(mb for s in shares for mb, w in s if w > 0)
        assert real == micro[:m]
        # DDP averages over 3 ranks: Σ weights / 3 must be 1 per real micro-batch / m
        total = sum(w for s in shares for _, w in s) / 3
        assert total == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        DataParallel().split([])


def test_init_from_env_single_process_and_bad_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    ctx = init_from_env(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_from_env(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="inconsistent"):
        init_from_env(device="cpu")
    with pytest.raises(ValueError, match="timeout_s"):
        init_from_env(timeout_s=0)
    with pytest.raises(ValueError, match="device"):
        init_from_env(device="tpu")


@pytest.mark.parametrize("mode", ["resample", "fixed"])
def test_unsharded_model_equals_the_ordinary_regularizer(mode):
    """Without a process group every tensor is 'replicated': same value and gradient as the base."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.LayerNorm(9), torch.nn.Linear(9, 4))
    b = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.LayerNorm(9), torch.nn.Linear(9, 4))
    b.load_state_dict(a.state_dict())
    kw = {"n_projections": 7, "mode": mode, "seed": 2, "reference_dtype": torch.float32}
    sharded, base = ShardedSlicedWassersteinRegularizer(a, **kw), SlicedWassersteinRegularizer(b, **kw)
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            delta = torch.randn_like(pa) * 0.1
            pa.add_(delta)
            pb.add_(delta)
    va, vb = sharded(), base()
    va.backward()
    vb.backward()
    assert float(va.detach()) == pytest.approx(float(vb.detach()), rel=1e-6) and float(vb.detach()) > 0
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    assert sharded.comm_bytes_last_call == 0


@pytest.mark.parametrize("mode", ["resample", "fixed"])
def test_unsharded_lora_model_equals_the_ordinary_regularizer(mode):
    """The LoRA term's factor-assembly path, in one process, against the LoRA-aware base class."""
    from tests.lora_models import peft_model

    a, b = peft_model("llama", 4, False), peft_model("llama", 4, False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            if pa.requires_grad:
                delta = torch.randn(pa.shape, generator=g) * 0.1
                pa.add_(delta)
                pb.add_(delta)
    kw = {"n_projections": 6, "mode": mode, "seed": 4, "reference_dtype": torch.float32}
    sharded, base = ShardedSlicedWassersteinRegularizer(a, **kw), SlicedWassersteinRegularizer(b, **kw)
    assert len(sharded.lora) == len(base.terms) >= 8
    va, vb = sharded(), base()
    va.backward()
    vb.backward()
    assert float(va.detach()) == pytest.approx(float(vb.detach()), rel=1e-5) and float(vb.detach()) > 0
    grads = [(pa.grad, pb.grad) for pa, pb in zip(a.parameters(), b.parameters()) if pb.grad is not None]
    assert len(grads) >= 16
    for ga, gb in grads:
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_bad_input_is_rejected():
    with pytest.raises(TypeError, match="model"):
        ShardedSlicedWassersteinRegularizer("not a model")
    frozen = torch.nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        ShardedSlicedWassersteinRegularizer(frozen)
    with pytest.raises(ValueError, match="mode"):
        ShardedSlicedWassersteinRegularizer(torch.nn.Linear(3, 3), mode="sometimes")


def test_predicted_bytes_scale_with_l_over_d():
    assert predicted_comm_bytes([(8, 4)], 10, 1)["total"] == 0
    small = predicted_comm_bytes([(4096, 4096)], 100, 8)["total"]
    # two trips of 7/8 of this rank's 512×100 projections each way, float32
    assert small == 2 * 4 * (512 * (100 - 12) + 12 * (4096 - 512)) + 4 * 7 * 4 // 8
    assert small < 0.25 * 512 * 4096 * 2  # well under the bf16 bytes of the shard (L ≪ d)


def test_fsdp_flag_and_parallel_setting():
    """``--fsdp`` sets ``parallel: fsdp``; the YAML value is checked before any heavy work."""
    import argparse

    from snap_fast.train import UnlearnConfig
    from snap_fast.train.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--out", "x", "--fsdp"])).parallel == "fsdp"
    assert config_from_args(parser.parse_args(["--out", "x"])).parallel == "ddp"
    with pytest.raises(ValueError, match="parallel 'zero3'; valid: ddp, fsdp"):
        UnlearnConfig(data="d", out="o", parallel="zero3").validate()


def test_read_full_weights_fills_tied_twins_and_rejects_mismatches(tmp_path):
    """FSDP2 resume reads a checkpoint as one full state dict named like the model's parameters."""
    from safetensors.torch import load_file, save_file

    from snap_fast.train.checkpoint import read_full_weights, save_checkpoint
    from tests.helpers import make_tiny_llama

    model, _ = make_tiny_llama()
    folder = save_checkpoint(tmp_path, 1, model, {})
    state = read_full_weights(folder, model)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(params) <= set(state)  # the tied LM head, dropped from the file, is filled in
    for name, p in params.items():
        torch.testing.assert_close(state[name], p.detach(), rtol=0, atol=0)
    weights = folder / "model" / "model.safetensors"
    saved = load_file(str(weights))
    saved.pop("model.norm.weight")
    save_file(saved, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing for 'model.norm.weight'"):
        read_full_weights(folder, model)
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        from tests.lora_models import peft_model

        read_full_weights(folder, peft_model("llama", 4, False))
