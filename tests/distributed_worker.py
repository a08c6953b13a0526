"""One rank of the distributed tests: ``python tests/distributed_worker.py SCENARIO OUT_DIR [ARGS]``.

Started by tests/test_distributed.py as N processes with the environment ``torchrun`` would set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), on CPU with the gloo backend. Each
scenario writes ``OUT_DIR/<scenario>-rank<r>.json`` with what the test asserts; rank 0 also
computes the single-process reference on an unsharded copy of the model (no collectives), so
the comparison happens between real numbers produced by independent code paths.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from snap_fast.dist import (
    DistributedFailure,
    ShardedSlicedWassersteinRegularizer,
    fully_shard_model,
    init_from_env,
)
from snap_fast.regularizer import SlicedWassersteinRegularizer

TIMEOUT_S = float(os.environ.get("SNAP_FAST_TEST_PG_TIMEOUT", "60"))


class Odd(torch.nn.Module):
    """Uneven shards on 2 ranks: 7 and 3 rows, a 1-row matrix, 1-D tensors of odd length."""

    _no_split_modules = ("Linear",)

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(5, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.b = torch.nn.Linear(7, 3)
        self.c = torch.nn.Linear(3, 1)
        self.conv = torch.nn.Conv1d(3, 5, 2)  # rank-3 weight: rows = out channels

    def forward(self, x):
        return self.c(self.b(self.norm(self.a(x))))


def _tiny_llama(hidden_size: int = 16, num_layers: int = 1, seed: int = 0) -> torch.nn.Module:
    """A random tied-embedding Llama from a config (64-token vocabulary; no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


def _local_rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor | None:
    chunks = torch.chunk(full, world, dim=0)
    return chunks[rank] if rank < len(chunks) else None


def _perturb(reference: torch.nn.Module, sharded: torch.nn.Module, scale: float, seed: int) -> None:
    """Add the same random change to both models (the sharded one: only the local rows)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p, q in zip(reference.parameters(), sharded.parameters()):
            delta = torch.randn(p.shape, generator=g) * scale
            p.add_(delta)
            rows = _local_rows(delta, rank, world)
            if rows is not None:
                q.to_local().add_(rows)


def scenario_regularizer(out: Path) -> dict:
    """Sharded vs single-process regularizer: values and gradients, every mode, p = 2 and 1.5."""
    rank = dist.get_rank()
    results = []
    for model_kind in ("odd", "llama"):
        for mode, p in (("resample", 2.0), ("fixed", 2.0), ("refresh", 2.0), ("fixed", 1.5)):
            def build(model_kind=model_kind):
                if model_kind == "odd":
                    torch.manual_seed(1)
                    return Odd()
                return _tiny_llama()

            reference, sharded = build(), fully_shard_model(build())
            kw = {"n_projections": 8, "p": p, "mode": mode, "refresh_every": 2, "seed": 5, "reference_dtype": torch.float32}
            reg = ShardedSlicedWassersteinRegularizer(sharded, **kw)
            base = SlicedWassersteinRegularizer(reference, **kw)
            for call in range(3 if model_kind == "odd" else 2):
                _perturb(reference, sharded, 0.05, seed=call)
                for m in (reference, sharded):
                    m.zero_grad(set_to_none=True)
                value, expected = reg(), base()
                value.backward()
                expected.backward()
                grad_err, grad_scale = 0.0, 0.0
                for (name, pb), ps in zip(reference.named_parameters(), sharded.parameters()):
                    rows = _local_rows(pb.grad, rank, dist.get_world_size())
                    if rows is None:
                        continue
                    grad_err = max(grad_err, float((ps.grad.to_local() - rows).abs().max()))
                    grad_scale = max(grad_scale, float(rows.abs().max()))
                results.append({
                    "model": model_kind, "mode": mode, "p": p, "call": call, "value": float(value),
                    "expected": float(expected), "grad_err": grad_err, "grad_scale": grad_scale,
                    "comm_bytes": reg.comm_bytes_last_call, "cache_nbytes": reg.cache_nbytes(),
                    "kinds": [len(reg.rows), len(reg.cols), len(reg.replicated)],
                    "owned_values": reg.owned_layout.total,
                    "row_values": sum(t.n * reg.n_projections for t in reg.rows),
                })
    return {"results": results}


def scenario_lora(out: Path) -> dict:
    """LoRA (PEFT, r = 4, every linear layer and the embedding) on an FSDP2-sharded tiny Llama."""
    from tests.lora_models import peft_model

    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for mode in ("fixed", "resample"):
        reference, sharded = peft_model("llama", 4, False), fully_shard_model(peft_model("llama", 4, False))
        kw = {"n_projections": 8, "mode": mode, "seed": 1, "reference_dtype": torch.float32}
        reg = ShardedSlicedWassersteinRegularizer(sharded, **kw)
        base = SlicedWassersteinRegularizer(reference, **kw)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # move the adapters (B starts at zero) identically in both models
            for p, q in zip(reference.parameters(), sharded.parameters()):
                if p.requires_grad:
                    delta = torch.randn(p.shape, generator=g) * 0.1
                    p.add_(delta)
                    rows = _local_rows(delta, rank, world)
                    if rows is not None:
                        q.to_local().add_(rows)
        value, expected = reg(), base()
        value.backward()
        expected.backward()
        grad_err, grad_scale, n_grads = 0.0, 0.0, 0
        for p, q in zip(reference.parameters(), sharded.parameters()):
            if p.grad is None:
                continue
            n_grads += 1
            rows = _local_rows(p.grad, rank, world)
            if rows is not None:
                grad_err = max(grad_err, float((q.grad.to_local() - rows).abs().max()))
                grad_scale = max(grad_scale, float(rows.abs().max()))
        results.append({"mode": mode, "value": float(value.detach()), "expected": float(expected.detach()),
                        "grad_err": grad_err, "grad_scale": grad_scale, "n_lora": len(reg.lora),
                        "n_grads": n_grads})
    return {"results": results}


def scenario_comm(out: Path) -> dict:
    """Measured bytes of one call per mode on a tiny Llama, for bench_comm's formula."""
    model = fully_shard_model(_tiny_llama(hidden_size=32, num_layers=2))
    result = {"rank": dist.get_rank(), "L": 10}
    for mode in ("fixed", "resample"):
        reg = ShardedSlicedWassersteinRegularizer(model, n_projections=10, mode=mode, seed=0)
        reg()
        result[mode] = reg.comm_bytes_last_call
        result["shapes"] = [list(t.param.shape) for t in reg.terms]
    return result


def _train_losses(model, batches, reg, lam, steps, split):
    """A short AdamW loop: ``split(batch)`` gives this rank's (examples, weight) pairs."""
    from snap_fast.train import losses

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ids, weight in split(batches[step]):
            logits = model(input_ids=ids).logits
            loss = losses.nll(logits, ids.clone()) * weight
            loss.backward()
            total += float(loss.detach())
        value = reg()
        (lam * value).backward()
        opt.step()
        out.append((total, float(value.detach())))
    return out


def scenario_fsdp_train(out: Path) -> dict:
    """FSDP2 + sharded regularizer vs one process, same global batch (4 sequences per step)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    steps, lam = 4, 0.5

    def build():
        return _tiny_llama(num_layers=2)

    vocab = build().config.vocab_size
    batches = [torch.randint(0, vocab, (4, 12), generator=g) for _ in range(steps)]
    kw = {"n_projections": 8, "mode": "fixed", "seed": 3, "reference_dtype": torch.float32}
    model = fully_shard_model(build())
    reg = ShardedSlicedWassersteinRegularizer(model, **kw)
    # FSDP2 averages gradients over ranks: each rank weighs its half of the batch by 1 (its
    # token mean), so the average equals the single-process token mean when halves have equal
    # token counts (fixed-length sequences here).
    split = lambda b: [(b[rank::world], 1.0)]
    got = _train_losses(model, batches, reg, lam, steps, split)
    got = [(float(_sum_all(t)) / world, r) for t, r in got]
    result = {"sharded": got}
    if rank == 0:
        single = build()
        ref = SlicedWassersteinRegularizer(single, **kw)
        result["single"] = _train_losses(single, batches, ref, lam, steps, lambda b: [(b, 1.0)])
    return result


def _sum_all(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


class _Interrupt(Exception):
    """Raised from ``on_step`` on every rank at the same step: a crash after a checkpoint."""


def scenario_ddp_unlearn(out: Path, config: dict, stop_after: int) -> dict:
    """``snap_fast.train.unlearn`` under DDP, stopped after ``stop_after`` steps, then resumed.

    Rank 1 starts late, once rank 0 has created the run folder (rank 0 then waits for it in the
    broadcast of the folder's status): the order a loaded machine produces by chance, which made
    rank 1 refuse the "existing" folder before rank 0 alone checked it.
    """
    if dist.get_rank() != 0:
        created = Path(config["out"]) / "config.yaml"
        deadline = time.monotonic() + TIMEOUT_S
        while not created.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not create {created} within {TIMEOUT_S} s")
            time.sleep(0.05)
    return _unlearn_stopped_and_resumed(config, stop_after)


def scenario_fsdp_unlearn(out: Path, configs: list[dict], stop_after: int) -> dict:
    """``unlearn`` with ``parallel="fsdp"`` (full fine-tuning, then LoRA), each stopped after
    ``stop_after`` steps (a checkpoint was saved there) and resumed."""
    return {"runs": [_unlearn_stopped_and_resumed(config, stop_after) for config in configs]}


def _unlearn_stopped_and_resumed(config: dict, stop_after: int) -> dict:
    from snap_fast.train import unlearn

    def on_step(step, metrics, model):
        if step == stop_after:
            raise _Interrupt

    try:
        unlearn(dict(config), on_step=on_step)
    except _Interrupt:
        pass
    result = unlearn({**config, "resume": True, "overwrite": False})
    return {"status": result.status, "steps": result.steps, "last": result.last_metrics}


def scenario_refusal(out: Path, config: dict) -> dict:
    """Resuming with a changed config: rank 0 refuses, and every rank must stop with its error."""
    from snap_fast.train import unlearn

    try:
        unlearn({**config, "resume": True, "overwrite": False, "lr": config["lr"] / 2})
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


def scenario_die(out: Path) -> dict:
    """Rank 1 dies in the middle of training; rank 0 must fail fast with a clear error."""
    rank = dist.get_rank()
    model = fully_shard_model(Odd())
    reg = ShardedSlicedWassersteinRegularizer(model, n_projections=4, mode="fixed", seed=0)
    reg().backward()
    if rank == 1:
        os._exit(17)  # a crash: no cleanup, no goodbye to the peers
    start = time.monotonic()
    try:
        for _ in range(1000):
            reg().backward()
    except DistributedFailure as exc:
        return {"error": str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def main() -> int:
    """argv: comma-separated scenarios, the output folder, optional JSON {scenario: kwargs}."""
    scenarios, out = sys.argv[1].split(","), Path(sys.argv[2])
    kwargs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    torch.set_num_threads(1)
    ctx = init_from_env(device="cpu", timeout_s=TIMEOUT_S)
    try:
        for scenario in scenarios:
            start = time.monotonic()
            result = globals()[f"scenario_{scenario}"](out, **kwargs.get(scenario, {}))
            result["wall_s"] = time.monotonic() - start
            path = out / f"{scenario}-rank{ctx.rank}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result), encoding="utf-8")
            os.replace(tmp, path)
    finally:
        if "die" not in scenarios:
            ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
