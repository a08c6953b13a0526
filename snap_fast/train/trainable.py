"""The model made trainable: loaded, LoRA-wrapped or fully unfrozen; its optimizer and schedule."""

from __future__ import annotations

import torch

from .config import UnlearnConfig, lora_layer_indices
from .runtime import Runtime

__all__ = ["load_trainable", "optimizer_and_schedule"]


def load_trainable(cfg: UnlearnConfig, runtime: Runtime):
    """Load the model and tokenizer; wrap with LoRA or unfreeze everything."""
    from ..models import load_model

    model, tokenizer = load_model(cfg.model, dtype=torch.float32, device=runtime.device,
                                  trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {cfg.model!r}: its tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.use_cache = False  # no KV cache in training; it also conflicts with checkpointing
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets
        layers = lora_layer_indices(cfg.lora_layers, model.config.num_hidden_layers)
        if layers is not None and targets == "all-linear":  # PEFT takes layers_to_transform with names only
            targets = _linear_module_names(model)
        # LoRA's A factors are drawn here: seeding makes them (and so the regularizer's initial
        # state) the same on a resume as in the original run.
        torch.manual_seed(cfg.seed)
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=targets, layers_to_transform=layers, task_type="CAUSAL_LM",
        ))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model, tokenizer


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    """What PEFT's ``"all-linear"`` adapts, as module names: the linear layers (GPT-2's
    ``Conv1D`` included) other than the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head})


def optimizer_and_schedule(model, cfg: UnlearnConfig, total_steps: int):
    """AdamW over the trainable parameters and the linear warmup/decay schedule."""
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    # As Hugging Face's Trainer: no weight decay on biases and norm weights (1-D tensors).
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup, total_steps)
    return optimizer, scheduler
