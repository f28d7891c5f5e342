"""Phi-3 sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds 1/N of every tensor.

The order is fixed:

1. build the model on the meta device (no memory) from the checked checkpoint directory;
2. `prepare(model)`: patch it (which marks only the adapters trainable), still on meta;
3. draw the adapters' initial values, whole, on every rank: the same random stream as a patch of a
   loaded model, so a sharded run starts where a single-process run does;
4. `fully_shard` each decoder layer, the embedding and the lm_head (each gathered only while it computes, and
   neither again in backward), then the root (the final norm): the base weights are still on meta, so this only
   decides which rows each rank holds;
5. load: each rank reads its rows of every base tensor from the safetensors files and nothing else, so
   the peak per rank is the weights / N (plus the adapters, whole, until step 4 slices them).

Adapters of a resumed run are loaded afterwards with `lora.load_adapter`, which copies each rank its rows.
The base keeps its dtype (bf16 for Hub checkpoints) and is all-gathered one decoder layer at a time, for
the forward and again for the backward; the adapters train as float32 (FSDP2 needs one dtype among the
trainable parameters of a layer only). `Phi3ForCausalLM.loss` is registered as a forward method, so it
runs FSDP2's hooks as `forward` does.

>>> model = from_pretrained_sharded("Phi-3-mini-4k-instruct", prepare=lambda m: patch(m, r=16))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lora.layers import lora_layers
from lora.phi3.checkpoint import plan_checkpoint
from lora.phi3.model import Phi3ForCausalLM
from lora.sharding import is_sharded

__all__ = ["from_pretrained_sharded", "local_rows", "root_unsharded"]


def local_rows(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows `[start, stop)` of a dim of `size` that `rank` of `world` holds under FSDP2 (`torch.chunk`'s split)."""
    chunk = math.ceil(size / world)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def _draw_adapters(model: nn.Module) -> None:
    """Replace each meta adapter with a real one, initialised as the layer does (in module order)."""
    for _, module in lora_layers(model, adapted_only=True):
        for name in ("lora_A", "lora_B"):
            meta = getattr(module, name)
            setattr(module, name, nn.Parameter(torch.empty(meta.shape, dtype=meta.dtype),
                                               requires_grad=meta.requires_grad))
        module.reset_lora_parameters()


def from_pretrained_sharded(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    prepare: Callable[[Phi3ForCausalLM], Any] | None = None,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    backward_prefetch: bool | None = None,
) -> Phi3ForCausalLM:
    """Load a Phi-3 checkpoint sharded over the default process group (or `mesh`), in the order above.

    Every rank must call it. `prepare` patches the meta model (say `lambda m: patch(m, r=16)`); `device` is
    this rank's (cpu with gloo, `cuda:LOCAL_RANK` with nccl). `backward_prefetch` (default: on a GPU, not on
    a CPU) gathers the next decoder layer while the current one computes its backward: on a GPU that hides
    the gather behind the computation; gloo's gathers on CPU do not overlap computation, so there it would
    only hold one more layer whole.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    if not dist.is_initialized():
        raise ValueError("from_pretrained_sharded needs a process group: run under torchrun and call "
                         "torch.distributed.init_process_group first")
    device = torch.device(device if device is not None else "cpu")
    plan = plan_checkpoint(path, dtype=dtype)
    model = plan.model
    if model.config.tie_word_embeddings:
        raise ValueError(f"{path}: tie_word_embeddings is not supported with FSDP (no Phi-3 release ties them)")
    if prepare is not None:
        prepare(model)
    for name, module in model.named_modules():
        if getattr(module, "use_dora", False):
            raise ValueError(f"{name}: DoRA layers cannot be sharded by from_pretrained_sharded (their magnitude "
                             "starts as the row norms of the whole base weight, which no rank reads); train DoRA "
                             "with DDP")
    _draw_adapters(model)
    if device.type != "cpu":
        for _, module in lora_layers(model, adapted_only=True):
            module.lora_A.data, module.lora_B.data = module.lora_A.to(device), module.lora_B.to(device)
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if not (device.type != "cpu" if backward_prefetch is None else backward_prefetch):
        for layer in model.model.layers:  # an explicit prefetch of itself, gathered already: no prefetch
            layer.set_modules_to_backward_prefetch([layer])
    # The embedding and the head are units of their own, gathered only while they compute, not for the whole
    # forward and backward as the root's would be. The frozen embedding needs no weight in backward; nor does
    # the head after the chunked loss, which computes its gradients in forward. After a logits forward
    # (`model(ids)` with gradients), the head's backward needs its weight: it is gathered again then.
    head = model.lm_head
    for unit in (model.model.embed_tokens, head):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
        unit.set_unshard_in_backward(False)
    head.register_forward_pre_hook(lambda module, args: module.set_unshard_in_backward(True)
                                   if torch.is_grad_enabled() else None)
    chunked_loss = head.loss

    def loss_without_regather(*args: Any, **kwargs: Any) -> torch.Tensor:
        head.set_unshard_in_backward(False)
        return chunked_loss(*args, **kwargs)

    head.loss = loss_without_regather
    register_fsdp_forward_method(head, "loss")
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(model, "loss")

    rank, world = mesh.get_local_rank(), mesh.size()
    state = {}
    for name, param in model.named_parameters():
        if name not in plan.files:  # an adapter: already sharded from its real initial value
            continue
        if not (isinstance(param, DTensor) and tuple(param.placements) == (Shard(0),)):
            raise RuntimeError(f"{name}: expected FSDP2 to shard it by rows, got {type(param).__name__}")
        start, stop = local_rows(param.shape[0], rank, world)
        rows = plan.read_rows(name, start, stop, device)  # (stop - start, ...)
        state[name] = DTensor.from_local(rows, mesh, [Shard(0)], run_check=False, shape=param.shape,
                                         stride=param.stride())
    model.load_state_dict(state, strict=False, assign=True)
    return model


@contextmanager
def root_unsharded(model: nn.Module) -> Iterator[None]:
    """The root's own parameters (the final norm) whole inside the block, for code that uses them without calling
    `forward` or `loss` (`lora.phi3.generate`); the decoder layers, the embedding and the lm_head gather theirs
    as they run. On an unsharded model it does nothing. Every rank must enter it and run the same computation."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
