"""Which parameters train, and which go into a LoRA checkpoint.

LoRA parameters are found by module type (the `lora_A`/`lora_B`, and DoRA's `lora_magnitude`, of each
`LoRALayer` with `r > 0`), not by the substring `'lora_'` in a name, so a user's `explorer_lora_gate` stays
frozen. The two functions agree on the biases of each mode:

- `'none'`: no bias;
- `'all'`: every parameter named `bias`, in any module;
- `'lora_only'`: the `bias` of each LoRA layer with `r > 0` (conv layers included).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .layers import LoRALayer, check_lora_shapes_on_load
from .sharding import full_tensor

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "lora_parameter_names"]

BiasMode = Literal["none", "all", "lora_only"]
_BIAS_MODES = ("none", "all", "lora_only")


def lora_parameter_names(model: nn.Module, bias: BiasMode = "none") -> list[str]:
    """The names (as in `model.named_parameters()`) that a LoRA checkpoint holds for `bias`."""
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}; got {bias!r}")
    names = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        adapted = isinstance(module, LoRALayer) and module.has_lora
        if adapted:
            names += [prefix + name for name in module.adapter_parameter_names()]
        has_bias = module._parameters.get("bias") is not None
        if has_bias and (bias == "all" or (bias == "lora_only" and adapted)):
            names.append(prefix + "bias")
    return list(dict.fromkeys(names))


def mark_only_lora_as_trainable(model: nn.Module, bias: BiasMode = "none") -> None:
    """Freeze every parameter except the adapters (and the biases that `bias` selects).

    Also makes `model.load_state_dict` check every LoRA shape before loading anything
    (`lora.check_lora_shapes_on_load`), so a mismatched checkpoint changes nothing.
    """
    trainable = set(lora_parameter_names(model, bias))
    for name, param in model.named_parameters(remove_duplicate=False):
        param.requires_grad = name in trainable
    check_lora_shapes_on_load(model)


def lora_state_dict(model: nn.Module, bias: BiasMode = "none", *, full: bool = True) -> dict[str, torch.Tensor]:
    """The adapters (and the biases that `bias` selects) from `model.state_dict()`.

    On a model sharded with FSDP2 each tensor is gathered whole (a collective: call it on every rank);
    `full=False` returns the DTensors as they are, without communication.

    >>> torch.save(lora.lora_state_dict(model), "adapter.pt")  # doctest: +SKIP
    >>> model.load_state_dict(torch.load("adapter.pt", weights_only=True), strict=False)  # doctest: +SKIP
    """
    names = lora_parameter_names(model, bias)
    state = model.state_dict(keep_vars=False)
    return {name: full_tensor(state[name]) if full else state[name] for name in names if name in state}
