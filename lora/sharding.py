"""Adapters of a model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), whose parameters are DTensors.

Each rank holds a slice of every sharded tensor, so nothing here ever treats a shard as the whole tensor:

- reading (`lora_state_dict`, `save_adapter`, `save_peft_adapter`) gathers full tensors, a collective:
  call it on every rank, in the same order;
- writing a file happens on rank 0 only (`writes_files`); the other ranks take part in the gathers;
- loading a full tensor into a sharded parameter copies each rank its own slice (`shard_like`).

On an unsharded model every function is the identity (or True), and nothing communicates.
`torch.distributed.tensor` takes 0.4 s to import, so it is only looked up: a DTensor exists only once
something (FSDP2) has imported it.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["full_tensor", "is_sharded", "shard_like", "writes_files"]


def _dtensor() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_sharded(model_or_tensor: nn.Module | torch.Tensor) -> bool:
    """True for a DTensor, or a module with at least one DTensor parameter."""
    dtensor = _dtensor()
    if dtensor is None:
        return False
    if isinstance(model_or_tensor, nn.Module):
        return any(isinstance(p, dtensor) for p in model_or_tensor.parameters())
    return isinstance(model_or_tensor, dtensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor all-gathered (every rank must call this), any other tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: this rank's slice of it when `like` is a DTensor (no communication)."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def writes_files(model: nn.Module) -> bool:
    """False on the ranks other than 0 of a sharded model: they gather, rank 0 writes."""
    return not (is_sharded(model) and dist.is_initialized() and dist.get_rank() != 0)
