"""DoRA adapters in files: PEFT's format both ways (per-slice layers included), our adapter file, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from phi3_tiny import TINY, randomise_adapters

import lora
from lora.phi3 import from_pretrained, load_peft_adapter, patch, save_peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))


def randomise_magnitudes(model, seed=9):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_magnitude" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator))


def logits(model):
    with torch.no_grad():
        out = model.eval()(IDS)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("targets", [("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("q", "v", "o_proj", "up")],
                         ids=["whole-modules", "slices"])
def test_export_reproduces_our_dora_logits_in_peft(hf_checkpoint, tmp_path, targets):
    _, path = hf_checkpoint(num_key_value_heads=2)
    model = from_pretrained(path)
    patch(model, r=4, lora_alpha=12, lora_dropout=0.0, targets=targets, use_dora=True)
    randomise_adapters(model)
    randomise_magnitudes(model)
    save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    base = transformers.Phi3ForCausalLM.from_pretrained(path)
    theirs = logits(peft.PeftModel.from_pretrained(base, tmp_path / "adapter"))
    torch.testing.assert_close(theirs, logits(model), rtol=1e-5, atol=1e-5)

    again = from_pretrained(path)  # and back: PEFT's file onto our unpatched model
    load_peft_adapter(again, tmp_path / "adapter")
    torch.testing.assert_close(logits(again), logits(model), rtol=1e-5, atol=1e-5)


def test_peft_trained_dora_adapter_loads_onto_our_model(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"], use_dora=True,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config)
    randomise_adapters(peft_model)
    randomise_magnitudes(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    ours = from_pretrained(path)
    load_peft_adapter(ours, tmp_path / "adapter")
    assert all(layer.use_dora for layer in ours.modules() if isinstance(layer, lora.LoRALayer))
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=1e-5, atol=1e-5)


def test_our_adapter_file_carries_the_magnitude(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    model = from_pretrained(path)
    patch(model, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "down_proj"), use_dora=True)
    randomise_adapters(model)
    randomise_magnitudes(model)
    lora.save_adapter(model, tmp_path / "adapter.safetensors")
    assert any(k.endswith("lora_magnitude") for k in lora.lora_state_dict(model))
    fresh = from_pretrained(path)
    patch(fresh, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "down_proj"), use_dora=True)
    lora.load_adapter(fresh, tmp_path / "adapter.safetensors")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)

    plain = from_pretrained(path)
    patch(plain, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "down_proj"))
    with pytest.raises(lora.AdapterMismatchError, match=r"lora_magnitude' has no place in the model"):
        lora.load_adapter(plain, tmp_path / "adapter.safetensors")


def test_dora_and_plain_do_not_mix(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    model = from_pretrained(path)
    patch(model, r=4, lora_alpha=8, lora_dropout=0.0, targets=("o_proj",), use_dora=True)
    save_peft_adapter(model, tmp_path / "dora")
    plain = from_pretrained(path)
    patch(plain, r=4, lora_alpha=8, lora_dropout=0.0, targets=("o_proj",))
    with pytest.raises(ValueError, match=r"the adapter is DoRA \(use_dora=True\) but the model's "
                                         r"model\.layers\.0\.self_attn\.o_proj is plain LoRA"):
        load_peft_adapter(plain, tmp_path / "dora")
    with pytest.raises(ValueError, match=r"^uniform_rank=True folds each module's scaling into B"):
        save_peft_adapter(model, tmp_path / "uniform", uniform_rank=True)
    config_path = tmp_path / "dora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = "true"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"use_dora must be true or false \(a boolean, not a string\)"):
        load_peft_adapter(from_pretrained(path), tmp_path / "dora")
