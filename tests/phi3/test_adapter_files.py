"""Our adapter format on Phi-3: round trip across implementations, and the 4k-vs-128k fingerprint."""

from __future__ import annotations

import pytest
import torch
from phi3_tiny import TINY, longrope, randomise_adapters, tiny_config

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


# The header metadata the previous version of save_adapter wrote (before the fingerprint took its architecture
# from lora.phi3.config), for Phi3ForCausalLM(tiny_config(**overrides)) patched with r=2, alpha=4, q and v, layer 0.
_LAYERS = ('{"model.layers.0.self_attn.qkv_proj": {"class": "MergedLinear", "enable_lora": [true, false, true], '
           '"lora_alpha": 4, "lora_dropout": 0.05, "r": 2, "split_sizes": [32, 32, 32], "use_dora": false, '
           '"use_rslora": false}}')
_WRITTEN = {
    "default": '{"architecture": {"head_dim": 8, "hidden_size": 32, "intermediate_size": 48, "long_factor": null, '
               '"max_position_embeddings": 128, "num_attention_heads": 4, "num_hidden_layers": 2, '
               '"num_key_value_heads": 4, "original_max_position_embeddings": 128, "partial_rotary_factor": 1.0, '
               '"rope_theta": 10000.0, "rope_type": "default", "short_factor": null, "sliding_window": null, '
               '"tie_word_embeddings": false, "vocab_size": 101}, '
               '"weights": {"model.layers.0.self_attn.qkv_proj": [[96, 32], "float32"]}}',
    "longrope": '{"architecture": {"head_dim": 8, "hidden_size": 32, "intermediate_size": 48, '
                '"long_factor": [1.0, 4.0, 7.0, 10.0], "max_position_embeddings": 512, "num_attention_heads": 4, '
                '"num_hidden_layers": 2, "num_key_value_heads": 4, "original_max_position_embeddings": 128, '
                '"partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "longrope", '
                '"short_factor": [1.0, 1.1, 1.2, 1.3], "sliding_window": null, "tie_word_embeddings": false, '
                '"vocab_size": 101}, "weights": {"model.layers.0.self_attn.qkv_proj": [[96, 32], "float32"]}}',
}


@pytest.mark.parametrize("rope", sorted(_WRITTEN))
def test_a_file_in_the_existing_format_loads_and_is_what_we_write(tmp_path, rope):
    from safetensors.torch import save_file

    from lora.adapter import adapter_metadata
    from lora.phi3 import Phi3ForCausalLM
    from lora.phi3.config import architecture

    overrides = longrope(8, original=128, maximum=512) if rope == "longrope" else {}
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_config(**overrides))
    patch(model, r=2, lora_alpha=4, targets=("q", "v"), layers=[0])
    randomise_adapters(model)
    metadata = {"format": "lora-adapter", "format_version": "1", "layers": _LAYERS, "fingerprint": _WRITTEN[rope]}
    tensors = {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}
    save_file(tensors, tmp_path / "old.safetensors", metadata=metadata)
    assert adapter_metadata(model) == metadata
    assert adapter_metadata(model, architecture=architecture(model.config)) == metadata
    assert adapter_metadata(model, architecture=architecture(model.config.to_dict())) == metadata
    with torch.no_grad():
        for p in lora.lora_state_dict(model).values():
            p.zero_()
    lora.load_adapter(model, tmp_path / "old.safetensors")
    for key, value in lora.lora_state_dict(model).items():
        assert torch.equal(value, tensors[key])


def test_the_architecture_of_transformers_config_is_ours(hf_checkpoint):
    from lora.phi3.config import architecture

    for overrides in ({}, longrope(8, original=128, maximum=512)):
        hf, path = hf_checkpoint(**overrides)
        assert architecture(hf.config) == architecture(from_pretrained(path).config)
    legacy = {"model_type": "phi3", **TINY, "max_position_embeddings": 512,
              "rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}}
    assert architecture(legacy)["rope_type"] == "longrope"  # Phi-3's legacy name, normalised by Phi3Config
