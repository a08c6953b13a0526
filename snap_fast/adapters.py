"""Reads LoRA adapters (A, B, scale, layout) out of PEFT modules; nothing else in snap_fast knows PEFT.

A LoRA layer's effective weight, *as stored* in the base module, is ``W = W0 + s · U V`` with
``U`` (n×r) and ``V`` (r×d) views of PEFT's factors (``s`` is PEFT's ``scaling[adapter]``:
``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``):

================================  ==================  ============  ============
PEFT layer                        stored ``W0``       ``U``         ``V``
================================  ==================  ============  ============
``lora.Linear``                   (out, in)           ``B``         ``A``
``lora.Linear``, fan_in_fan_out   (in, out) (Conv1D)  ``Aᵀ``        ``Bᵀ``
``lora.Embedding``                (num_emb, dim)      ``A_embᵀ``    ``B_embᵀ``
================================  ==================  ============  ============

Rows of the stored matrix are the samples, exactly as the plain regularizer would treat the same
parameter (the regularizer's LoRA term, :class:`snap_fast.regularizer.terms.LoraTerm`, builds on
this).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None

__all__ = ["LoraFactors", "find_lora_factors"]


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight matrix of the active adapter.

    Attributes:
        module_name: qualified name of the PEFT LoRA module.
        weight_name: qualified parameter name of the frozen base weight (what ``param_filter``
            sees and what the regularizer reports).
        module: the PEFT LoRA layer; its factors and ``scaling`` are read on every call, so
            ``set_scale``/``scale_layer`` and replaced parameters are honoured.
        adapter: the adapter name.
        kind: ``"linear"``, ``"fan_in_fan_out"`` (GPT-2 Conv1D) or ``"embedding"``.
        base: the frozen base weight, stored layout (n, d).
    """

    module_name: str
    weight_name: str
    module: torch.nn.Module
    adapter: str
    kind: str
    base: torch.Tensor

    @property
    def scaling(self) -> float:
        """PEFT's scale ``s`` (read, not recomputed: it already includes rslora and set_scale)."""
        return float(self.module.scaling[self.adapter])

    def factor_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's own factor parameters ``(A, B)`` as registered (the tensors gradients reach)."""
        if self.kind == "embedding":
            return self.module.lora_embedding_A[self.adapter], self.module.lora_embedding_B[self.adapter]
        return self.module.lora_A[self.adapter].weight, self.module.lora_B[self.adapter].weight

    def uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` views, (n, r) and (r, d), with ``ΔW_stored = s · U @ V``; no copies."""
        return self.uv_of(*self.factor_params())

    def uv_of(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(U, V)`` views of factors laid out as this layer's ``(A, B)`` (its own, or copies
        assembled from shards)."""
        if self.kind == "linear":
            return b, a
        # fan_in_fan_out stores W0 as (in, out) = (BA)ᵀ-shaped; lora_embedding_A is (r, num_emb)
        # and lora_embedding_B is (dim, r), so both store ΔW = s·(B A)ᵀ = s·Aᵀ Bᵀ.
        return a.t(), b.t()

    @property
    def rank(self) -> int:
        return int(self.factor_params()[0].shape[0])


def _unsupported(module_name: str, why: str) -> ValueError:
    return ValueError(f"LoRA module {module_name!r}: {why}; snap_fast cannot regularize it")


def _check_base_weight(module_name: str, weight: object) -> torch.Tensor:
    if DTensor is not None and isinstance(weight, DTensor):
        # FSDP2 shards the frozen base by rows: check the local shard, keep the DTensor (the
        # sharded regularizer in snap_fast.dist projects local rows only).
        _check_base_weight(module_name, weight.to_local())
        return weight
    # Quantized bases (bitsandbytes Params4bit/Int8Params, torchao, ...) are Parameter subclasses
    # or integer tensors whose values are not the weight: refuse them instead of reading garbage.
    if type(weight) not in (torch.nn.Parameter, torch.Tensor):
        raise _unsupported(module_name, f"base weight of type {type(weight).__name__} is not a plain float tensor (quantized base?)")
    if not weight.is_floating_point():
        raise _unsupported(module_name, f"base weight has dtype {weight.dtype}, not a float dtype (quantized base?)")
    if weight.device.type == "meta":
        raise _unsupported(module_name, "base weight is on the meta device (offloaded or not materialised)")
    if weight.dim() != 2:
        raise _unsupported(module_name, f"base weight has shape {tuple(weight.shape)}, expected a matrix")
    if weight.requires_grad:
        raise _unsupported(
            module_name,
            "base weight is trainable; the LoRA term assumes a frozen base (W0 is read, never copied)",
        )
    return weight


def _check_plain_lora(module_name: str, module, adapter: str) -> None:
    """Refuse what the factor formula does not describe: DoRA, other variants, a LoRA bias, a
    merged adapter."""
    if module.use_dora.get(adapter, False):
        raise _unsupported(module_name, "DoRA (use_dora=True) is not supported")
    if adapter in getattr(module, "lora_variant", {}):
        variant = type(module.lora_variant[adapter]).__name__
        raise _unsupported(module_name, f"LoRA variant {variant} is not supported (plain LoRA only)")
    if getattr(module, "lora_bias", {}).get(adapter, False):
        raise _unsupported(module_name, "lora_bias=True is not supported")
    if module.merged:
        raise _unsupported(module_name, "the adapter is merged into the base weight; unmerge it first")


def find_lora_factors(model: torch.nn.Module) -> list[LoraFactors]:
    """Every LoRA-adapted weight of the active adapter in ``model``, in module order.

    Layers that do not carry the active adapter are skipped (their weight is the frozen base).

    Raises:
        ValueError naming the module, for: several active adapters, DoRA (``use_dora=True``) or
        any other LoRA variant, ``lora_bias=True``, a merged adapter, LoRA on layer kinds other
        than Linear / Conv1D (fan_in_fan_out) / Embedding (convolutions, MultiheadAttention,
        target_parameters, quantized wrappers), a base weight that is not a readable float matrix,
        or factor shapes that do not match the base weight.
    """
    if "peft" not in sys.modules:  # a model cannot hold PEFT layers unless peft was imported
        return []
    from peft.tuners.lora import Embedding as LoraEmbedding
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    by_name = dict(model.named_parameters(remove_duplicate=False))
    first_name = {id(p): n for n, p in reversed(list(by_name.items()))}
    found: list[LoraFactors] = []
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = list(module.active_adapters)
        if len(active) != 1:
            raise _unsupported(module_name, f"{len(active)} active adapters {active}; activate exactly one")
        adapter = active[0]
        if type(module) not in (LoraLinear, LoraEmbedding):
            raise _unsupported(module_name, f"LoRA layer type {type(module).__module__}.{type(module).__name__} is not supported "
                               "(supported: lora.Linear incl. fan_in_fan_out, lora.Embedding)")
        is_embedding = type(module) is LoraEmbedding
        present = module.lora_embedding_A if is_embedding else module.lora_A
        if adapter not in present:
            continue
        _check_plain_lora(module_name, module, adapter)
        base_layer = module.get_base_layer()
        weight = _check_base_weight(module_name, getattr(base_layer, "weight", None))
        if is_embedding:
            kind = "embedding"
        else:
            kind = "fan_in_fan_out" if module.fan_in_fan_out else "linear"
        # A tied base (GPT-2's wte / lm_head) has several names: prefer the adapted module's own.
        own_name = f"{module_name}.base_layer.weight"
        factors = LoraFactors(
            module_name=module_name,
            weight_name=own_name if by_name.get(own_name) is weight else first_name.get(id(weight), own_name),
            module=module,
            adapter=adapter,
            kind=kind,
            base=weight,
        )
        u, v = factors.uv()
        if u.shape[0] != weight.shape[0] or v.shape[1] != weight.shape[1] or u.shape[1] != v.shape[0]:
            raise _unsupported(
                module_name,
                f"factor shapes U {tuple(u.shape)}, V {tuple(v.shape)} do not match the base weight "
                f"{tuple(weight.shape)} ({kind})",
            )
        for name, t in zip(("U", "V"), (u, v)):
            if not t.is_floating_point() or t.device != weight.device:
                raise _unsupported(module_name, f"factor {name} must be a float tensor on {weight.device}, got {t.dtype} on {t.device}")
        found.append(factors)
    return found
