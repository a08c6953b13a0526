"""snap_fast: selective unlearning for LLMs with SNAP, with fast kernels.

Public API (everything else is internal and may change):

* :func:`sliced_wasserstein` — SWD(W0, W) of one tensor pair, with autograd.
* :class:`SlicedWassersteinRegularizer` — the whole-model regularizer a training loop calls.
* :func:`random_projections` — unit directions in POT's (d, L) layout.
* :func:`sliced_wasserstein_reference` — the plain PyTorch oracle.
* :func:`unlearn` / :class:`UnlearnConfig` — the SNAP training recipe (``snap-fast unlearn``).
* :func:`load_model` / :func:`model_identity` — hub id, folder, GGUF or the packaged SmolLM2.
* :func:`generate_answers` — batched greedy answers with the model's chat template.
* :func:`lora_delta_stats` — statistics of LoRA updates ΔW = s·B A, computed from the factors.
"""

import logging as _logging

# torchao (the quantization attack's optional library), when installed, is imported by
# transformers whenever a model class loads; on a CPU-only machine it then logs that its CUDA
# kernels failed to load, and torch logs a deprecation in a call torchao makes: noise about code
# this package never runs. A level the user has set on these loggers is kept.
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)

from .generation import generate_answers
from .models import load_model, model_identity
from .ops.lora_stats import lora_delta_stats
from .ops.swd.function import sliced_wasserstein
from .ops.swd.naive import random_projections, sliced_wasserstein_reference
from .regularizer import MODES, SlicedWassersteinRegularizer
from .train import UnlearnConfig, unlearn
from .version import __version__

__all__ = [
    "MODES",
    "SlicedWassersteinRegularizer",
    "UnlearnConfig",
    "__version__",
    "generate_answers",
    "load_model",
    "lora_delta_stats",
    "model_identity",
    "random_projections",
    "sliced_wasserstein",
    "sliced_wasserstein_reference",
    "unlearn",
]
