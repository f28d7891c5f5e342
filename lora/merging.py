"""Model-level merging: fold every adapter into its weight for inference or export, and back.

Every function here uses the layers' one definition of the delta (`LoRALayer.delta_weight`),
computed in float32 once per call. Merging never writes the frozen weights (see `lora.layers`), so
`unmerge_lora` restores them bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import quant
from .layers import LoRALayer, lora_layers, refuse_quantized_merge

__all__ = ["merge_lora", "unmerge_lora", "merged", "merged_state_dict", "disable_adapters"]


def merge_lora(model: nn.Module) -> nn.Module:
    """Make every LoRA layer of `model` compute with `W + delta`. Idempotent; returns `model`.

    Costs one weight-sized tensor per adapted layer until `unmerge_lora`. Refused, before any layer merges,
    when a layer's base is 4-bit (`lora.quant.QuantizedMergeError`; `merged_state_dict` works there).
    """
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        refuse_quantized_merge(layer, "merge_lora")
    for layer in layers:
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora`: the frozen weights are exactly what they were. Returns `model`."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` with merged weights inside the block, and restore each layer's state after.

    >>> import lora
    >>> model = torch.nn.Sequential(lora.Linear(8, 8, r=2))
    >>> with lora.merged(model):
    ...     y = model(torch.randn(1, 8))
    """
    was_merged = [(layer, layer.merged) for _, layer in lora_layers(model)]
    try:
        merge_lora(model)  # inside the try: a merge failing part-way (out of memory) is undone too
        yield model
    finally:
        for layer, state in was_merged:
            if not state:
                layer.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (a reference model, or to compare with the base)."""
    previous = [(layer, layer.adapters_disabled) for _, layer in lora_layers(model)]
    for layer, _ in previous:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, state in previous:
            layer.adapters_disabled = state


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a plain (LoRA-free) copy of `model` would have, with every delta folded in.

    A pure function: `model` is not modified. `lora_A`/`lora_B` (and DoRA's `lora_magnitude`) are left
    out, so the result loads into the original architecture (`nn.Linear` in place of `lora.Linear`). This replaces
    loralib's habit of calling `model.eval()` and saving `model.state_dict()`.

    Every 4-bit (bitsandbytes) weight, adapted or not, comes out dequantized, in the dtype it dequantizes to
    (`dequantize(W4) + delta` where adapted), without its quant-state keys: a plain bf16/float32 state dict.
    """
    state = model.state_dict()
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if quant.is_quantized(weight) and not (isinstance(module, LoRALayer) and module.has_lora):
            head = f"{name}.weight" if name else "weight"
            for key in [k for k in state if k.startswith(head + ".")]:
                del state[key]
            state[head] = quant.dequantize(weight)
    merged_weights: dict[int, torch.Tensor] = {}
    # every name a shared layer has, as state_dict() lists them all; its merged weight is computed once
    for name, layer in lora_layers(model, adapted_only=True, remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if id(layer) not in merged_weights:
            merged_weights[id(layer)] = layer.merged_weight_tensor()
        for key in [k for k in state if k.startswith(prefix + "weight.")]:
            del state[key]  # a 4-bit base's quant state: the merged weight is plain
        state[prefix + "weight"] = merged_weights[id(layer)]
        del state[prefix + "lora_A"], state[prefix + "lora_B"]
        state.pop(prefix + "lora_magnitude", None)  # DoRA's, folded into the weight too
    return state
