"""Tiny Phi-3 configs shared by the tests (keyword overrides for transformers' `Phi3Config`)."""

from __future__ import annotations

import re
from typing import Any

from lora.phi3 import Phi3Config

# Tiny but complete: 2 layers, hidden 32, vocab 101; special ids inside the vocabulary.
TINY = {
    "vocab_size": 101,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "original_max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    # Larger than the default 0.02 so that logits are O(1) and tolerances mean something.
    "initializer_range": 0.2,
}


def longrope(rotary_dim: int, *, original: int, maximum: int) -> dict[str, Any]:
    """Config overrides for LongRoPE with distinct short and long factors of `rotary_dim / 2` each."""
    half = rotary_dim // 2
    return {
        "original_max_position_embeddings": original,
        "max_position_embeddings": maximum,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.0 + 3.0 * i for i in range(half)],
        },
    }


def tiny_config(**overrides: Any) -> Phi3Config:
    """Our `Phi3Config` for `TINY` plus overrides, read the way a config.json would be."""
    return Phi3Config.from_dict({"model_type": "phi3", **TINY, **overrides})


def randomise_adapters(model: Any, seed: int = 3, scale: float = 0.2) -> None:
    """Give every lora_A/lora_B random values (B starts at zero), by sorted name.

    Sorted, because transformers registers `o_proj` before `qkv_proj` and we the other way round: two models
    patched alike then get the same values.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            # ours end in lora_A / lora_B; PEFT's in lora_A.<adapter name>.weight
            if name.endswith(("lora_A", "lora_B")) or re.search(r"\.lora_[AB]\.[^.]+\.weight$", name):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
