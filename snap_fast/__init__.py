"""snap_fast: selective unlearning for LLMs with SNAP, with fast kernels.

Public API (everything else is internal and may change):

* :func:`sliced_wasserstein` — SWD(W0, W) of one tensor pair, with autograd.
* :class:`SlicedWassersteinRegularizer` — the whole-model regularizer a training loop calls.
* :func:`random_projections` — unit directions in POT's (d, L) layout.
* :func:`sliced_wasserstein_reference` — the plain PyTorch oracle.
"""

from .functional import sliced_wasserstein
from .reference import random_projections, sliced_wasserstein_reference
from .regularizer import MODES, SlicedWassersteinRegularizer

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "SlicedWassersteinRegularizer",
    "random_projections",
    "sliced_wasserstein",
    "sliced_wasserstein_reference",
]
