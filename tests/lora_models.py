"""Tiny PEFT models built from configs (no download) and dense LoRA deltas written from PEFT's
documented layouts, independent of snap_fast.adapters: the oracle side of the LoRA tests."""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import LoraLayer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "wte"]


def tiny_llama() -> torch.nn.Module:
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> torch.nn.Module:
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def peft_model(arch: str, r: int, rslora: bool, *, alpha: int = 8, **extra) -> torch.nn.Module:
    """Tiny ``arch`` ("llama" | "gpt2") with LoRA on every linear layer and the token embedding,
    B factors randomised so ΔW ≠ 0 (PEFT starts with B = 0, and A = 0 for embeddings)."""
    torch.manual_seed(r)
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    targets = LLAMA_TARGETS if arch == "llama" else GPT2_TARGETS
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
        fan_in_fan_out=(arch == "gpt2"), lora_dropout=0.0, **extra,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    return model


def lora_layers(model: torch.nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def expected_scaling(module: LoraLayer, adapter: str = "default") -> float:
    r, alpha = module.r[adapter], module.lora_alpha[adapter]
    return alpha / math.sqrt(r) if module.use_rslora[adapter] else alpha / r


def dense_delta(module: LoraLayer, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """ΔW in the base weight's stored layout, from factors ``a``/``b`` shaped like PEFT's."""
    if isinstance(module, LoraEmbedding):
        return s * (b @ a).t()  # lora_embedding_B (dim, r) @ lora_embedding_A (r, num_emb)
    delta = s * (b @ a)  # lora_B (out, r) @ lora_A (r, in): nn.Linear's (out, in)
    return delta.t() if module.fan_in_fan_out else delta


def factors_of(module: LoraLayer, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, LoraEmbedding):
        return module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight


def dense_stats(module) -> dict[str, float]:
    a, b = factors_of(module)
    w0 = module.get_base_layer().weight.detach().double()
    delta = dense_delta(module, a.detach().double(), b.detach().double(), expected_scaling(module))
    sv = torch.linalg.svdvals(delta)
    sv = sv[: min(module.r["default"], *delta.shape)]  # the rest are rounding noise of a rank-r matrix
    probs = sv / sv.sum()
    rows = delta.norm(dim=1)
    return {
        "fro_norm": delta.norm().item(),
        "row_norm_max": rows.max().item(),
        "row_norm_mean": rows.mean().item(),
        "base_fro_norm": w0.norm().item(),
        "rel_change": (delta.norm() / w0.norm()).item(),
        "inner_w0": (w0 * delta).sum().item(),
        "spectral_norm": sv.max().item(),
        "effective_rank": math.exp(-(probs * probs.log()).sum().item()),
        "rows": delta.shape[0],
    }
