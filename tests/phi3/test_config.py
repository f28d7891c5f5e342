"""`Phi3Config`: both config.json spellings, the Phi-3 family's shapes, LongRoPE scaling, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora.phi3 import Phi3Config, Phi3ForCausalLM

# config.json of the Hub's Phi-3-mini-128k-instruct (April 2024, transformers 4 spelling), factors shortened.
MINI_128K_V4 = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "su", "short_factor": [1.05] * 48, "long_factor": [1.03] * 48},
    "sliding_window": 262144,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "attention_bias": False,
    "transformers_version": "4.39.3",
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("rope_name", ["su", "longrope", "yarn"])
def test_v4_longrope_spellings_are_one_algorithm(tmp_path: Path, rope_name: str) -> None:
    data = {**MINI_128K_V4, "rope_scaling": {**MINI_128K_V4["rope_scaling"], "type": rope_name}}
    config = Phi3Config.from_json(_write(tmp_path, data))
    assert config.rope_type == "longrope"
    assert config.short_factor == [1.05] * 48 and config.long_factor == [1.03] * 48
    assert config.dtype == "bfloat16"
    assert config.head_dim == 96 and config.rotary_dim == 96
    assert config.sliding_window == 262144
    assert config.rope_attention_scaling == pytest.approx(1.1902380714, abs=1e-10)


def test_v5_spelling_and_round_trip(tmp_path: Path) -> None:
    v4 = Phi3Config.from_json(_write(tmp_path, MINI_128K_V4))
    v5 = v4.to_dict()
    assert "rope_scaling" not in v5 and "torch_dtype" not in v5 and "rope_theta" not in v5
    assert v5["rope_parameters"]["rope_type"] == "longrope"
    assert v5["dtype"] == "bfloat16"
    again = Phi3Config.from_dict(v5)
    assert again == v4


def test_v5_config_written_by_transformers(hf_checkpoint) -> None:
    _, path = hf_checkpoint(partial_rotary_factor=0.5, tie_word_embeddings=True, num_key_value_heads=1)
    config = Phi3Config.from_json(path / "config.json")
    assert config.rope_type == "default" and config.partial_rotary_factor == 0.5
    assert config.rotary_dim == 4 and config.tie_word_embeddings and config.num_key_value_heads == 1
    assert config.rope_attention_scaling == 1.0


def test_explicit_factor_and_attention_factor() -> None:
    base = {**MINI_128K_V4, "rope_scaling": None}
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}
    with_factor = Phi3Config.from_dict({**base, "rope_parameters": {**rope, "factor": 8.0}})
    assert with_factor.rope_attention_scaling == pytest.approx(math.sqrt(1 + math.log(8) / math.log(4096)))
    with_attention = Phi3Config.from_dict({**base, "rope_parameters": {**rope, "attention_factor": 1.5}})
    assert with_attention.rope_attention_scaling == 1.5


FAMILY = {
    # name: (overrides of the mini-4k defaults, parameter count)
    "Phi-3-mini-4k": ({"sliding_window": 2047}, 3_821_079_552),
    "Phi-3-medium-4k": (
        {
            "hidden_size": 5120,
            "intermediate_size": 17920,
            "num_attention_heads": 40,
            "num_key_value_heads": 10,
            "num_hidden_layers": 40,
        },
        13_960_238_080,
    ),
}


@pytest.mark.parametrize("name", FAMILY)
def test_family_shapes_build_on_meta(name: str) -> None:
    overrides, params = FAMILY[name]
    config = Phi3Config.from_dict({"model_type": "phi3", **overrides})
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == params


def test_phi4_mini_shape_partial_rotary_and_tied() -> None:
    config = Phi3Config.from_dict(
        {
            "model_type": "phi3",
            "vocab_size": 200064,
            "hidden_size": 3072,
            "num_attention_heads": 24,
            "num_key_value_heads": 8,
            "num_hidden_layers": 32,
            "partial_rotary_factor": 0.75,
            "tie_word_embeddings": True,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
            "max_position_embeddings": 131072,
        }
    )
    assert config.head_dim == 128 and config.rotary_dim == 96
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (24 * 128 + 2 * 8 * 128, 3072)


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json: config\.json not found; expected a Hugging Face"):
        Phi3Config.from_json(tmp_path / "config.json")


def test_wrong_model_type(tmp_path: Path) -> None:
    path = _write(tmp_path, {**MINI_128K_V4, "model_type": "llama"})
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'llama', expected 'phi3'"):
        Phi3Config.from_json(path)


def test_unsupported_rope_type(tmp_path: Path) -> None:
    path = _write(tmp_path, {**MINI_128K_V4, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        Phi3Config.from_json(path)


def test_wrong_longrope_factor_length(tmp_path: Path) -> None:
    rope = {"type": "su", "short_factor": [1.0] * 47, "long_factor": [1.0] * 48}
    path = _write(tmp_path, {**MINI_128K_V4, "rope_scaling": rope})
    with pytest.raises(ValueError, match=r"LongRoPE short_factor must be a list of rotary_dim/2 = 48 numbers, got 47"):
        Phi3Config.from_json(path)


def test_bad_head_counts_and_activation() -> None:
    with pytest.raises(ValueError, match=r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(5\)"):
        Phi3Config(num_key_value_heads=5)
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        Phi3Config(hidden_act="gelu")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("rms_norm_eps", 0, "rms_norm_eps must be a positive number, got 0"),
        ("rms_norm_eps", -1e-5, "rms_norm_eps must be a positive number"),
        ("rope_theta", 0.0, "rope_theta must be a positive number"),
        ("rope_theta", "10000", "rope_theta must be a positive number, got '10000' \\(str\\)"),
        ("partial_rotary_factor", 0.0, "partial_rotary_factor must be a number in \\(0, 1\\]"),
        ("partial_rotary_factor", 1.5, "partial_rotary_factor must be a number in \\(0, 1\\]"),
        ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
        ("num_key_value_heads", 0, "num_key_value_heads must be a positive integer or null"),
        ("hidden_size", -8, "hidden_size must be a positive integer, got -8"),
        ("hidden_size", "3072", "hidden_size must be a positive integer, got '3072' \\(str\\)"),
        ("num_hidden_layers", True, "num_hidden_layers must be a positive integer, got True \\(bool\\)"),
        ("vocab_size", 32064.0, "vocab_size must be a positive integer, got 32064.0"),
        ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
        ("eos_token_id", [32000, "x"], "eos_token_id must be a token id"),
        ("attention_dropout", 1.0, "attention_dropout must be a number in \\[0, 1\\)"),
    ],
)
def test_bad_values_name_config_json_and_the_key(tmp_path: Path, key: str, value, message: str) -> None:
    path = _write(tmp_path, {**MINI_128K_V4, "rope_scaling": None, key: value})
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        Phi3Config.from_json(path)


def test_numpy_integers_are_integers() -> None:
    np = pytest.importorskip("numpy")
    config = Phi3Config(hidden_size=np.int64(64), num_attention_heads=np.int32(4), vocab_size=100)
    assert config.head_dim == 16
