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


def peft_logits(path, adapter_dir, ids=IDS):
    base = transformers.Phi3ForCausalLM.from_pretrained(path).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(ids).logits


def randomise_peft(model, seed=3, scale=0.2):
    """Random values for a PEFT model's lora_A/lora_B (its B starts at zero), by sorted name."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


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
    randomise_peft(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(IDS).logits
        with peft_model.disable_adapter():
            assert (peft_model(IDS).logits - expected).abs().max() > 0.1  # the adapter is not a no-op
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
        ({"alora_invocation_tokens": [7, 8]}, "alora_invocation_tokens=[7, 8] is not supported by lora.phi3"),
        ({"use_bdlora": {"nblocks": 2}}, "use_bdlora={'nblocks': 2} is not supported by lora.phi3"),
        ({"kasa_config": {}}, "kasa_config={} is not supported by lora.phi3"),
        ({"monteclora_config": {}}, "monteclora_config={} is not supported by lora.phi3"),
        ({"arrow_config": {"top_k": 2}}, "arrow_config={'top_k': 2} is not supported by lora.phi3"),
        ({"velora_config": {"num_groups": 4}}, "velora_config={'num_groups': 4} is not supported by lora.phi3"),
        ({"target_modules": 5}, "target_modules must be a list of module names or a regex string, got 5 (int)"),
        ({"target_modules": ["o_proj", 3]}, "target_modules must be a list of module names or a regex string, "
         "got ['o_proj', 3] (list)"),
        ({"init_lora_weights": 1}, "init_lora_weights must be true, false or \"gaussian\" (other inits change the "
         "base weights, which lora.phi3 does not reproduce), got 1 (int)"),
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


def test_config_that_is_not_an_object_is_refused(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    source = from_pretrained(path)
    patch(source, r=2, targets=("o_proj",))
    adapter = write_adapter(tmp_path, source)
    config_path = adapter / "adapter_config.json"
    config_path.write_text("[1, 2]")
    target = from_pretrained(path)
    with pytest.raises(ValueError) as info:
        load_peft_adapter(target, adapter)
    assert str(info.value) == f"{config_path}: expected a JSON object of PEFT settings, got list [1, 2]"
    assert not any("lora_" in n for n, _ in target.named_parameters())


def peft_adapter(path, directory, **config):
    """Save a PEFT adapter (random A and B) over `path`'s base, made with `LoraConfig(**config)`; its logits."""
    model = peft.get_peft_model(transformers.Phi3ForCausalLM.from_pretrained(path),
                                peft.LoraConfig(task_type="CAUSAL_LM", **config))
    randomise_peft(model)
    model.save_pretrained(directory, save_embedding_layers=False)  # LoRA tensors only, even over lm_head
    return model


def test_peft_alora_adapter_is_refused_by_name(hf_checkpoint, tmp_path):
    # aLoRA acts only from the invocation tokens on; loaded as a plain LoRA it gave logits 5 off PEFT's.
    _, path = hf_checkpoint()
    peft_adapter(path, tmp_path / "alora", r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"],
                 alora_invocation_tokens=[7, 8])
    target = from_pretrained(path)
    with pytest.raises(ValueError, match=r"adapter_config.json: alora_invocation_tokens=\[7, 8\] is not supported"):
        load_peft_adapter(target, tmp_path / "alora")
    assert not any("lora_" in n for n, _ in target.named_parameters())


@pytest.mark.parametrize("variant", ["use_bdlora", "kasa_config", "monteclora_config"])
def test_peft_variants_are_refused_by_name(hf_checkpoint, tmp_path, variant):
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig

    value = {"use_bdlora": BdLoraConfig(target_modules_bd_a=["qkv_proj"], target_modules_bd_b=["o_proj"], nblocks=2),
             "kasa_config": KasaConfig(), "monteclora_config": MontecloraConfig()}[variant]
    _, path = hf_checkpoint()
    peft_adapter(path, tmp_path / variant, r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"],
                 **{variant: value})
    with pytest.raises(ValueError, match=rf"adapter_config.json: {variant}=.* is not supported by lora.phi3"):
        load_peft_adapter(from_pretrained(path), tmp_path / variant)


def test_lm_head_adapter_round_trips_through_peft(hf_checkpoint, tmp_path):
    # A transformers model patched from a PEFT adapter on lm_head saves it back (it crashed on the undotted name).
    _, path = hf_checkpoint(tie_word_embeddings=False)
    source = peft_adapter(path, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["qkv_proj", "lm_head"])
    model = transformers.Phi3ForCausalLM.from_pretrained(path).eval()
    load_peft_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        expected = source(IDS).logits
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    save_peft_adapter(model, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["lm_head", "qkv_proj"]
    torch.testing.assert_close(peft_logits(path, tmp_path / "again"), expected, rtol=1e-5, atol=1e-5)


def rewrite_tensor(adapter, change):
    """Apply `change(tensors)` to the adapter's safetensors file."""
    from safetensors.torch import load_file, save_file

    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)
    return weights


A_KEY = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({A_KEY: t[A_KEY].to(torch.int32)}),
         f"tensor {A_KEY!r} has dtype torch.int32; adapters are floating point"),
        (lambda t: t[A_KEY].__setitem__((0, 0), float("nan")), f"tensor {A_KEY!r} holds NaN or inf"),
        (lambda t: t[A_KEY].__setitem__((1, 3), float("-inf")), f"tensor {A_KEY!r} holds NaN or inf"),
    ],
    ids=["int", "nan", "inf"],
)
@pytest.mark.parametrize("onto", ["unpatched", "patched"])
def test_non_float_or_non_finite_tensors_are_refused(hf_checkpoint, tmp_path, change, message, onto):
    _, path = hf_checkpoint()
    source = from_pretrained(path)
    patch(source, r=2, targets=("o_proj",))
    weights = rewrite_tensor(write_adapter(tmp_path, source), change)
    target = from_pretrained(path)
    if onto == "patched":
        patch(target, r=2, targets=("o_proj",))
        randomise_adapters(target)
    before = {name: p.clone() for name, p in target.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_peft_adapter(target, weights.parent)
    assert str(info.value) == f"{weights}: {message}"
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_flattened_lora_a_is_refused_by_its_shape(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint()
    source = from_pretrained(path)
    patch(source, r=2, targets=("o_proj",))
    adapter = write_adapter(tmp_path, source)
    rewrite_tensor(adapter, lambda t: t.update({A_KEY: t[A_KEY].flatten()}))
    target = from_pretrained(path)
    with pytest.raises(ValueError) as info:
        load_peft_adapter(target, adapter)
    assert str(info.value) == (f"{adapter}: model.layers.0.self_attn.o_proj.lora_A has shape (64,); "
                               "expected 2-D (rank, in_features)")
    assert not any("lora_" in n for n, _ in target.named_parameters())


@pytest.mark.parametrize("saved, loaded", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-to-fp32", "fp32-to-bf16"])
@pytest.mark.parametrize("stored", [None, torch.bfloat16], ids=["as-saved", "magnitudes-bf16"])
def test_per_slice_dora_loads_across_dtypes(hf_checkpoint, tmp_path, saved, loaded, stored):
    """A per-slice DoRA layer's unadapted rows hold their own row norms in the file; those computed from a bf16
    copy of the base (or stored in bf16) still match a float32 copy, while a real rescaling is refused."""
    _, path = hf_checkpoint(num_key_value_heads=2)

    def dora_model(dtype):
        model = from_pretrained(path, dtype=dtype)
        patch(model, r=3, lora_alpha=5, lora_dropout=0.0, targets=("q", "v", "o_proj"), use_dora=True)
        return model

    source = dora_model(saved)
    randomise_adapters(source)
    with torch.no_grad():
        for name, param in sorted(source.named_parameters()):
            if name.endswith("lora_magnitude"):
                param.mul_(1.5)
    save_peft_adapter(source, tmp_path / "adapter")
    key = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_magnitude_vector"
    if stored is not None:
        rewrite_tensor(tmp_path / "adapter", lambda t: t.update({k: v.to(stored) for k, v in t.items()
                                                                 if "magnitude" in k}))
    target = dora_model(loaded)
    load_peft_adapter(target, tmp_path / "adapter")
    for (name, a), (_, b) in zip(sorted(source.named_parameters()), sorted(target.named_parameters()), strict=True):
        if "lora_" in name:
            torch.testing.assert_close(b, a if stored is None or "magnitude" not in name else a.to(stored).float(),
                                       rtol=0, atol=0, msg=name)
    k_row = TINY["hidden_size"]  # qkv_proj's rows are q (hidden), k, v: k's first row is not adapted

    def rescale(tensors):
        tensors[key][k_row] *= 1.05

    rewrite_tensor(tmp_path / "adapter", rescale)
    with pytest.raises(ValueError, match="qkv_proj's lora_magnitude_vector rescales rows the model's per-slice "
                                         "layer does not adapt"):
        load_peft_adapter(dora_model(loaded), tmp_path / "adapter")


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
    torch.save([torch.zeros(2)], adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin: expected a dict of name -> tensor, got list"):
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
