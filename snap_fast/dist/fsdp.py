"""FSDP2 applied the usual way: each decoder block, then the root."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["fully_shard_model"]


def fully_shard_model(model: torch.nn.Module, *, mesh=None, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) the usual way: each block, then the root.

    Blocks are the modules whose class Hugging Face lists in ``model._no_split_modules`` (the
    decoder layers); a model without that list is sharded as one unit. Parameters become
    ``Shard(0)`` DTensors in place; build :class:`ShardedSlicedWassersteinRegularizer` *after*
    this call, from the same model.

    Args:
        model: the model, already on this rank's device.
        mesh: a 1-D ``DeviceMesh``; default: all ranks of the default group on the model's
            device type (``init_device_mesh("cpu"|"cuda", (world_size,))``).
        reshard_after_forward: FSDP2's option (free the gathered weights after forward).

    Returns the same ``model`` object (now an ``FSDPModule``).

    Raises:
        ValueError: no initialised process group.
    """
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("fully_shard_model needs an initialised process group (launch with torchrun)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if module is not model and type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model
