"""Fixtures for the Phi-3 tests: tiny random transformers models saved as real checkpoint directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from phi3_tiny import TINY


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[Any, Path]]:
    """Factory: `(transformers model, float32, eval mode; the directory it was saved to)` for overrides."""
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
