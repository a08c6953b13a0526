"""Reads LoRA adapters (A, B, scale, layout) out of PEFT modules; nothing else in snap_fast knows PEFT.

(Filled in by the LoRA issue: LoRA-aware terms for the regularizer and delta statistics.)
"""

from __future__ import annotations

import torch


def build_lora_terms(model: torch.nn.Module, keep_initial, param_filter):
    """Regularized terms for the LoRA-adapted layers of ``model``.

    Returns ``(terms, covered)``: the terms, and the ``id`` of every parameter they account for
    (adapter factors and frozen bases), which the plain parameter scan then skips.
    """
    return [], set()
