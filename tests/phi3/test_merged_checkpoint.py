"""merge_and_save: a plain checkpoint that transformers loads, verified before it is renamed into place."""

from __future__ import annotations

import json

import pytest
import torch
from phi3_tiny import TINY, randomise_adapters

import lora
from lora.phi3 import MergeVerificationError, from_pretrained, merge_and_save, patch

transformers = pytest.importorskip("transformers")
IDS = torch.randint(3, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(2))


def adapted(path, dtype=None, targets=("q", "v", "o_proj", "gate_up_proj", "down_proj")):
    model = from_pretrained(path, dtype=dtype)
    patch(model, r=4, lora_alpha=8, targets=targets)
    randomise_adapters(model, seed=4)
    return model.eval()


@pytest.mark.parametrize("shard", ["5GB", 20_000])
def test_transformers_loads_the_merged_checkpoint(hf_checkpoint, tmp_path, shard):
    _, path = hf_checkpoint(num_key_value_heads=2)
    (path / "tokenizer.json").write_text("{}")
    model = adapted(path)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(IDS)
    difference = merge_and_save(model, tmp_path / "merged", max_shard_size=shard)
    assert difference < 1e-4
    merged = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-4, atol=1e-4)
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= files
    assert ("model.safetensors.index.json" in files) == (shard != "5GB")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "phi3"
    # The model itself is untouched and unmerged.
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name])
    assert not any(m.merged for m in model.modules() if isinstance(m, lora.LoRALayer))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bf16_model_and_transformers_model(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint()
    model = adapted(path, dtype=torch.bfloat16)
    difference = merge_and_save(model, tmp_path / "merged-bf16")
    loaded = from_pretrained(tmp_path / "merged-bf16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert difference < 0.5
    patch(hf, r=2, targets=("down_proj",))
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.lora_B.normal_()
    assert merge_and_save(hf, tmp_path / "merged-hf") < 1e-4


def test_verification_failure_writes_nothing(hf_checkpoint, tmp_path, monkeypatch):
    _, path = hf_checkpoint()
    model = adapted(path)
    monkeypatch.setattr(lora.LoRALayer, "merged_weight_tensor", lambda self: self.weight.detach() * 2)
    with pytest.raises(MergeVerificationError, match="merged checkpoint's logits differ from adapter \\+ base by"):
        merge_and_save(model, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # only the source checkpoint


def test_bad_targets(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(FileExistsError, match="already exists and is not an empty directory"):
        merge_and_save(adapted(path), tmp_path / "taken")
    with pytest.raises(ValueError, match="the model has no adapters to merge"):
        merge_and_save(from_pretrained(path), tmp_path / "plain")
