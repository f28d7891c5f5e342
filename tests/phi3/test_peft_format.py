"""PEFT-format adapters: exported ones load in PEFT with the same logits; PEFT's load in ours."""

from __future__ import annotations

import json

import pytest
import torch
from phi3_tiny import TINY, randomise_adapters

from lora.phi3 import from_pretrained, load_peft_adapter, patch, save_peft_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(5))


def peft_logits(path, adapter_dir):
    base = transformers.Phi3ForCausalLM.from_pretrained(path).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "kv_heads, targets, kwargs",
    [
        (4, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), {}),
        (2, ("q", "v"), {}),
        (2, ("q", "v", "o_proj", "up"), {}),
        (2, ("q", "v", "o_proj", "up"), {"uniform_rank": True}),
        (2, ("k", "gate_up_proj"), {"use_rslora": True}),
        (4, ("qkv_proj", "down_proj"), {"layers": [1]}),
    ],
)
def test_export_reproduces_our_logits_in_peft(hf_checkpoint, tmp_path, kv_heads, targets, kwargs):
    _, path = hf_checkpoint(num_key_value_heads=kv_heads)
    model = from_pretrained(path).eval()
    uniform = kwargs.pop("uniform_rank", False)
    patch(model, r=4, lora_alpha=12, lora_dropout=0.0, targets=targets, **kwargs)
    randomise_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter", uniform_rank=uniform)
    with torch.no_grad():
        ours = model(IDS)
    theirs = peft_logits(path, tmp_path / "adapter")
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if uniform:
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}


def test_peft_trained_adapter_loads_onto_an_unpatched_model(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint(num_key_value_heads=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj", "o_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config)
    randomise_adapters(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(IDS).logits
    model = from_pretrained(path).eval()
    load_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, rtol=1e-5, atol=1e-5)
    down = model.model.layers[0].mlp.down_proj
    assert down.r == 2 and down.scaling == 4.0
    assert model.model.layers[0].self_attn.o_proj.scaling == 0.75
    assert [n for n, p in model.named_parameters() if p.requires_grad][0].endswith("lora_A")


def test_round_trip_onto_a_patched_model_with_slices(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint(num_key_value_heads=2)
    source = from_pretrained(path)
    patch(source, r=3, lora_alpha=6, targets=("q", "v", "down_proj"))
    randomise_adapters(source)
    save_peft_adapter(source, tmp_path / "adapter")
    target = from_pretrained(path)
    patch(target, r=3, lora_alpha=6, targets=("q", "v", "down_proj"))
    load_peft_adapter(target, tmp_path / "adapter")
    for (name, a), (_, b) in zip(sorted(source.named_parameters()), sorted(target.named_parameters()), strict=True):
        assert torch.equal(a, b), name
    other = from_pretrained(path)
    patch(other, r=3, lora_alpha=6, targets=("q", "k", "down_proj"))
    with pytest.raises(ValueError, match="lora_B is not block-diagonal over the model's slices"):
        load_peft_adapter(other, tmp_path / "adapter")
    other = from_pretrained(path)
    patch(other, r=3, lora_alpha=6, targets=("o_proj",))
    with pytest.raises(ValueError, match="the adapter's modules differ from the model's LoRA layers"):
        load_peft_adapter(other, tmp_path / "adapter")


def write_adapter(tmp_path, model, **config_changes):
    save_peft_adapter(model, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(config_changes)
    config_path.write_text(json.dumps(config))
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"use_qalora": True}, "use_qalora=True is not supported by lora.phi3"),
        ({"lora_bias": True}, "lora_bias=True is not supported by lora.phi3"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] is not supported by lora.phi3"),
        ({"bias": "all"}, "bias='all' is not supported by lora.phi3 (only 'none')"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported; only 'LORA' is"),
        ({"use_rslora": "false"}, "use_rslora must be true or false (a boolean, not a string), got 'false' (str)"),
        ({"r": "2"}, "r must be a positive integer, got '2' (str)"),
        ({"lora_alpha": True}, "lora_alpha must be a positive number, got True (bool)"),
        ({"lora_dropout": "0.1"}, "lora_dropout must be a number in [0, 1), got '0.1' (str)"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights must be true, false or \"gaussian\" (other inits "
         "change the base weights, which lora.phi3 does not reproduce), got 'pissa' (str)"),
        ({"init_lora_weights": "olora"}, "init_lora_weights must be true, false or \"gaussian\" (other inits "
         "change the base weights, which lora.phi3 does not reproduce), got 'olora' (str)"),
        ({"alpha_pattern": {"q(": 2}}, "alpha_pattern key 'q(' is not a valid regular expression "
         "(missing ), unterminated subpattern at position 1)"),
        ({"rank_pattern": {"qkv_proj": "4"}}, "rank_pattern['qkv_proj'] must be a positive integer, got '4'"),
    ],
)
def test_unsupported_options_are_refused_by_name(hf_checkpoint, tmp_path, change, message):
    _, path = hf_checkpoint()
    source = from_pretrained(path)
    patch(source, r=2)
    adapter = write_adapter(tmp_path, source, **change)
    target = from_pretrained(path)
    with pytest.raises(ValueError) as info:
        load_peft_adapter(target, adapter)
    assert str(info.value) == f"{adapter / 'adapter_config.json'}: {message}"
    assert not any("lora_" in n for n, _ in target.named_parameters())


def test_bin_weights_load_with_weights_only(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    source = from_pretrained(path).eval()
    patch(source, r=2, targets=("o_proj",))
    randomise_adapters(source)
    adapter = write_adapter(tmp_path, source)
    from safetensors.torch import load_file

    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    target = from_pretrained(path).eval()
    load_peft_adapter(target, adapter)
    with torch.no_grad():
        torch.testing.assert_close(target(IDS), source(IDS))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="cannot be read with torch.load\\(weights_only=True\\)"):
        load_peft_adapter(from_pretrained(path), adapter)


def test_foreign_keys_and_missing_files(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    with pytest.raises(FileNotFoundError, match="no PEFT adapter config"):
        load_peft_adapter(from_pretrained(path), tmp_path)
    source = from_pretrained(path)
    patch(source, r=2, targets=("o_proj",))
    adapter = write_adapter(tmp_path, source)
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="tensor 'base_model.model.lm_head.weight' is not a LoRA weight"):
        load_peft_adapter(from_pretrained(path), adapter)
