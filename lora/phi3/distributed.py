"""The processes of a `torchrun` job: which one this is, on which device, and checks across them.

>>> procs = setup_processes("auto", sharded=False)  # doctest: +SKIP
>>> procs.rank, procs.world, procs.device           # doctest: +SKIP
(0, 2, device(type='cpu'))
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import lora

__all__ = ["Processes", "check_device", "check_replicas_agree", "setup_processes", "shutdown_processes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processes:
    """This process's place: `rank` of `world`, its `device`, and whether the model is `sharded` (FSDP2) or
    replicated (DDP, or one process)."""

    rank: int
    world: int
    device: torch.device
    sharded: bool = False

    @property
    def rng_devices(self) -> list[torch.device]:
        """What `torch.random.fork_rng` must fork besides the CPU generator."""
        return [self.device] if self.device.type == "cuda" else []


def check_device(name: str) -> None:
    """A ValueError unless `name` is auto or a device this PyTorch build has and this machine can use."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N, ...): {err}") from err
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    if backend is None or not hasattr(backend, "is_available"):
        raise ValueError(f"--device {name}: this PyTorch build has no {device.type} support; use cpu or auto")
    if not backend.is_available():
        raise ValueError(f"--device {name}: {device.type.upper()} is not available on this machine "
                         "(or this PyTorch build lacks it); use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def setup_processes(device_name: str = "auto", *, sharded: bool = False) -> Processes:
    """This process under torchrun (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`; one process without them): joins the
    process group (nccl on CUDA, gloo on CPU) and picks the device (`auto`: cuda if available; `cuda` becomes
    `cuda:LOCAL_RANK` with several processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and device_name == "cuda":
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(device_name)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Processes(rank, world, device, sharded)


def check_replicas_agree(model: nn.Module, procs: Processes) -> None:
    """A RuntimeError unless every rank holds rank 0's adapters bit for bit (DDP keeps them in step); every
    rank must call it."""
    for name, tensor in lora.lora_state_dict(model).items():
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, tensor):
            raise RuntimeError(f"rank {procs.rank}: adapter {name} differs from rank 0's")
    # INFO on rank 0; the others log warnings only (a training script's usual levels), so theirs is one.
    (log.info if procs.rank == 0 else log.warning)("rank %d of %d: adapters identical to rank 0's", procs.rank,
                                                   procs.world)


def shutdown_processes() -> None:
    """End a torchrun job's process group once every rank is done (rank 0 may still be writing): a barrier,
    then the group destroyed after the objects holding it (drop a DDP wrapper first) are collected."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
