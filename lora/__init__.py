"""LoRA layers for PyTorch with loralib's API, and LoRA fine-tuning of Phi-3 (`lora.phi3`).

Switch from loralib by changing one import:

>>> import lora
>>> layer = lora.Linear(64, 32, r=8, lora_alpha=16)
>>> lora.mark_only_lora_as_trainable(layer)
"""

from __future__ import annotations

import importlib
from typing import Any

from .adapter import AdapterMismatchError, load_adapter, save_adapter
from .layers import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvLoRA,
    Embedding,
    Linear,
    LoRALayer,
    MergedLinear,
    check_lora_shapes,
    check_lora_shapes_on_load,
    lora_layers,
    lora_scaling,
)
from .merging import disable_adapters, merge_lora, merged, merged_state_dict, unmerge_lora
from .quant import QuantizedMergeError
from .slices import LoRASlice
from .trainable import lora_parameter_names, lora_state_dict, mark_only_lora_as_trainable

__version__ = "0.1.0"

__all__ = [
    # the layers (loralib's names) and their slices
    "LoRALayer", "Linear", "Embedding", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d", "LoRASlice",
    "lora_layers", "lora_scaling",
    # what trains and what a LoRA checkpoint holds
    "mark_only_lora_as_trainable", "lora_state_dict", "lora_parameter_names",
    # merging
    "merge_lora", "unmerge_lora", "merged", "merged_state_dict", "disable_adapters", "QuantizedMergeError",
    # loading checks and adapter files
    "check_lora_shapes", "check_lora_shapes_on_load", "save_adapter", "load_adapter", "AdapterMismatchError",
]


def __getattr__(name: str) -> Any:
    # `lora.phi3` imports on first use: the layer library alone stays light.
    if name == "phi3":
        return importlib.import_module(".phi3", __name__)
    raise AttributeError(f"module 'lora' has no attribute {name!r}")
