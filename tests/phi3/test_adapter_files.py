"""Our adapter format on Phi-3: round trip across implementations, and the 4k-vs-128k fingerprint."""

from __future__ import annotations

import pytest
import torch
from phi3_tiny import TINY, longrope, randomise_adapters

import lora
from lora.phi3 import from_pretrained, patch

IDS = torch.randint(3, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


def trained(path, targets=("q", "v", "down_proj")):
    model = from_pretrained(path).eval()
    patch(model, r=4, lora_alpha=8, targets=targets)
    randomise_adapters(model, seed=6)
    return model


def test_round_trip_onto_ours_and_onto_transformers(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint(num_key_value_heads=2)
    source = trained(path)
    lora.save_adapter(source, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        expected = source(IDS)
    ours = from_pretrained(path).eval()
    patch(ours, r=4, lora_alpha=8, targets=("q", "v", "down_proj"))
    lora.load_adapter(ours, tmp_path / "adapter.safetensors")
    patch(hf, r=4, lora_alpha=8, targets=("q", "v", "down_proj"))
    lora.load_adapter(hf, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(ours(IDS), expected)
        torch.testing.assert_close(hf(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_4k_adapter_onto_a_longrope_base_of_the_same_shapes(hf_checkpoint, tmp_path):
    _, short_path = hf_checkpoint()
    _, long_path = hf_checkpoint(**longrope(8, original=128, maximum=512))
    lora.save_adapter(trained(short_path), tmp_path / "adapter.safetensors")
    target = from_pretrained(long_path)
    patch(target, r=4, lora_alpha=8, targets=("q", "v", "down_proj"))
    with pytest.raises(lora.AdapterMismatchError) as info:
        lora.load_adapter(target, tmp_path / "adapter.safetensors")
    message = str(info.value)
    assert "the adapter was trained on a different base model; differing fields: " in message
    for field in ("long_factor: file None", "max_position_embeddings: file 128, model 512",
                  "rope_type: file 'default', model 'longrope'"):
        assert field in message
    assert "Pass ignore_fingerprint=True to load it anyway" in message
    lora.load_adapter(target, tmp_path / "adapter.safetensors", ignore_fingerprint=True)


def test_differently_patched_model_names_the_first_tensor(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    lora.save_adapter(trained(path), tmp_path / "adapter.safetensors")
    target = from_pretrained(path)
    patch(target, r=4, lora_alpha=8, targets=("qkv_proj", "down_proj"))
    with pytest.raises(lora.AdapterMismatchError) as info:
        lora.load_adapter(target, tmp_path / "adapter.safetensors")
    assert str(info.value).endswith("tensor 'model.layers.0.self_attn.qkv_proj.lora_A' has shape (8, 32), "
                                    "the model's is (4, 32)")
