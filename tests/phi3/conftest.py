"""Fixtures for the Phi-3 tests: tiny random transformers models saved as real checkpoint directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

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


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[Any, Path]]:
    """Factory: `(transformers model in float32 eval mode, directory it was saved to)` for config overrides."""
    transformers = pytest.importorskip("transformers")

    def make(seed: int = 0, **overrides: Any) -> tuple[Any, Path]:
        torch.manual_seed(seed)
        config = transformers.Phi3Config(**{**TINY, **overrides})
        model = transformers.Phi3ForCausalLM(config).eval()
        # Random norms too (init leaves them at 1), so a norm weight that is not loaded shows up.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.uniform_(0.5, 1.5)
        path = tmp_path / f"hf-{seed}-{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(path)
        return model, path

    return make
