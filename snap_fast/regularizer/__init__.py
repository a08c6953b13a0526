"""SNAP's sliced-Wasserstein regularizer over a whole model: the object a training loop holds.

* :mod:`.core` — :class:`SlicedWassersteinRegularizer` (direction modes, caches, resume).
* :mod:`.terms` — which tensors are regularized and how each is projected (plain, LoRA).
* :mod:`.flat` — every projection in one buffer with one autograd node.
* :mod:`.l2sp` — :class:`L2SPRegularizer`, the plain ‖W − W0‖² baseline on the same tensors.

The sharded variant for FSDP2 lives in :mod:`snap_fast.dist`.
"""

from .core import MODES, SlicedWassersteinRegularizer
from .l2sp import L2SPRegularizer
from .terms import LoraTerm, ParamFilter, RegularizedTerm

__all__ = ["MODES", "L2SPRegularizer", "LoraTerm", "ParamFilter", "RegularizedTerm", "SlicedWassersteinRegularizer"]
