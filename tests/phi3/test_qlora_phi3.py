"""QLoRA on Phi-3: 4-bit loading and saving, patching, adapter files, PEFT interop and merging on a 4-bit base."""

from __future__ import annotations

import json
import re

import pytest
import torch
from phi3_tiny import TINY, randomise_adapters

import lora
from lora import quant
from lora.adapter import adapter_metadata
from lora.phi3 import (
    from_pretrained,
    load_peft_adapter,
    merge_and_save,
    patch,
    save_peft_adapter,
    save_pretrained,
)
from lora.phi3.checkpoint import plan_checkpoint

bnb = pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# bitsandbytes quantizes rows in blocks of 64: hidden and intermediate sizes that blocks divide
WIDE = {"hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2}
IDS = torch.randint(3, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(5))
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def hf_4bit(path, quant_type="nf4", double_quant=True, **kwargs):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32)
    return transformers.Phi3ForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                        dtype=torch.float32, **kwargs)


def hf_logits(model, ids=IDS):
    # train mode (there is no dropout): bnb's eval-mode CPU kernel computes in bf16 (lora.quant.linear4bit)
    model.train()
    with torch.no_grad():
        return model(ids).logits


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_load_equals_transformers_bit_for_bit(hf_checkpoint, quant_type, double_quant):
    _, path = hf_checkpoint(**WIDE)
    model = from_pretrained(path, dtype=torch.float32, quantize=quant_type, double_quant=double_quant)
    for layer in model.model.layers:
        for name in PROJECTIONS:
            module = layer.get_submodule(name)
            assert type(module) is bnb.nn.Linear4bit and module.weight.quant_state.quant_type == quant_type
            assert bool(module.weight.quant_state.nested) == double_quant
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    theirs = hf_4bit(path, quant_type, double_quant)
    assert_same_state(model, theirs)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_logits(theirs), rtol=1e-5, atol=1e-5)
    config = model.config.extra["quantization_config"]
    assert config["bnb_4bit_quant_type"] == quant_type and config["bnb_4bit_use_double_quant"] == double_quant


def test_save_and_load_the_4bit_base_round_trips(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint(**WIDE)
    model = from_pretrained(path, dtype=torch.bfloat16, quantize="nf4")
    save_pretrained(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["bnb_4bit_quant_type"] == "nf4"
    assert saved["bnb_4bit_compute_dtype"] == "bfloat16" and saved["load_in_4bit"] is True
    again = from_pretrained(tmp_path / "q")  # no quantization: the packed weights as saved
    assert_same_state(again, model)
    with torch.no_grad():
        assert torch.equal(again(IDS), model(IDS))
    with pytest.raises(ValueError, match="already quantized to nf4; quantize='fp4' would need the original"):
        from_pretrained(tmp_path / "q", quantize="fp4")
    with pytest.raises(ValueError, match="a 4-bit .bitsandbytes. checkpoint; load it whole with lora.phi3.from_pre"):
        plan_checkpoint(tmp_path / "q")  # what lora.phi3.fsdp reads rows through
    theirs = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert type(theirs.model.layers[0].mlp.down_proj) is bnb.nn.Linear4bit
    assert_same_state(theirs, model)
    # and transformers' own 4-bit save loads in ours
    hf_4bit(path).save_pretrained(tmp_path / "hf-q")
    assert_same_state(from_pretrained(tmp_path / "hf-q", dtype=torch.float32),
                      from_pretrained(path, dtype=torch.float32, quantize="nf4"))


def test_4bit_load_errors_come_before_anything_is_read(hf_checkpoint, hide_bitsandbytes):
    _, narrow = hf_checkpoint()  # hidden 32: rows shorter than a block
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.down_proj.weight: a weight of shape (32, 48) "
                                                   "cannot be quantized in blocks of 64")):
        from_pretrained(narrow, quantize="nf4")
    with pytest.raises(ValueError, match=re.escape("quantize='int8' is not a 4-bit type; expected one of nf4, fp4")):
        from_pretrained(narrow, quantize="int8")
    hide_bitsandbytes()
    with pytest.raises(ImportError, match=re.escape('need bitsandbytes, which is not installed: pip install '
                                                    '"purelora[qlora]"')):
        from_pretrained(narrow, quantize="nf4")


@pytest.fixture
def base(hf_checkpoint):
    _, path = hf_checkpoint(**WIDE)
    return path


def test_patched_4bit_model_equals_transformers_4bit_with_our_patch(base):
    ours = from_pretrained(base, dtype=torch.float32, quantize="nf4")
    theirs = hf_4bit(base)
    for model in (ours, theirs):
        patch(model, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "o_proj", "gate_up_proj"))
        randomise_adapters(model)
    qkv = ours.model.layers[0].self_attn.qkv_proj
    assert type(qkv) is lora.MergedLinear and qkv.lora_A.dtype == torch.float32 and quant.is_quantized(qkv.weight)
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf_logits(theirs), rtol=1e-5, atol=1e-5)
        with lora.disable_adapters(ours):
            plain = from_pretrained(base, dtype=torch.float32, quantize="nf4")
            assert torch.equal(ours(IDS), plain(IDS))
    # gradients reach every adapter, and nothing else
    ours(IDS).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in ours.named_parameters() if not p.requires_grad)


def test_adapter_files_move_between_4bit_and_plain_bases(base, tmp_path):
    q = from_pretrained(base, dtype=torch.float32, quantize="nf4")
    patch(q, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "down_proj"))
    randomise_adapters(q)
    lora.save_adapter(q, tmp_path / "a.safetensors")
    weights = json.loads(adapter_metadata(q)["fingerprint"])["weights"]
    assert weights["model.layers.0.self_attn.qkv_proj"] == [[128, 64], "float32"]  # q 64 + k 32 + v 32
    plain = from_pretrained(base, dtype=torch.float32)
    patch(plain, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "down_proj"))
    lora.load_adapter(plain, tmp_path / "a.safetensors")  # the fingerprint matches: same logical base
    lora.save_adapter(plain, tmp_path / "b.safetensors")
    back = from_pretrained(base, dtype=torch.float32, quantize="nf4")
    patch(back, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "down_proj"))
    lora.load_adapter(back, tmp_path / "b.safetensors")
    with torch.no_grad():
        assert torch.equal(back(IDS), q(IDS))
    bf16 = from_pretrained(base, dtype=torch.bfloat16, quantize="nf4")
    patch(bf16, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "down_proj"))
    with pytest.raises(lora.AdapterMismatchError, match=re.escape("file [[128, 64], 'float32'], model "
                                                                  "[[128, 64], 'bfloat16']")):
        lora.load_adapter(bf16, tmp_path / "a.safetensors")


def test_peft_interop_on_the_same_4bit_base(base, tmp_path):
    ours = from_pretrained(base, dtype=torch.float32, quantize="nf4")
    patch(ours, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "o_proj", "down_proj"))
    randomise_adapters(ours)
    save_peft_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(IDS)
    theirs = peft.PeftModel.from_pretrained(hf_4bit(base), tmp_path / "ours")
    actual = hf_logits(theirs)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()
    # a PEFT QLoRA adapter (PEFT's own 4-bit LoRA layers) loads into ours
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["qkv_proj", "gate_up_proj"],
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_4bit(base), config)
    randomise_adapters(peft_model, seed=11)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = hf_logits(peft_model)
    model = from_pretrained(base, dtype=torch.float32, quantize="nf4")
    load_peft_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        actual = model(IDS)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_save_writes_dequantized_plus_delta(base, tmp_path, dtype):
    model = from_pretrained(base, dtype=dtype, quantize="nf4")
    patch(model, r=4, lora_alpha=8, lora_dropout=0.0, targets=("q", "v", "down_proj"))  # o_proj, gate_up: 4-bit only
    randomise_adapters(model)
    with pytest.raises(lora.QuantizedMergeError, match="lora.phi3.merge_and_save"):
        lora.merge_lora(model)
    difference = merge_and_save(model, tmp_path / "merged", probe_ids=IDS)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(dtype).removeprefix("torch.")
    merged = from_pretrained(tmp_path / "merged")
    layer = model.model.layers[1]
    expected_qkv = (quant.dequantize(layer.self_attn.qkv_proj.weight).float()
                    + layer.self_attn.qkv_proj.delta_weight()).to(dtype)
    assert torch.equal(merged.model.layers[1].self_attn.qkv_proj.weight, expected_qkv)
    assert torch.equal(merged.model.layers[1].self_attn.o_proj.weight, quant.dequantize(layer.self_attn.o_proj.weight))
    state = lora.merged_state_dict(model)
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with torch.no_grad():
        ours, theirs = model(IDS).float(), merged(IDS).float()
    # the check merge_and_save ran: 1e-4 (float32) or 3e-2 (bf16) of the logits' scale
    assert difference == (theirs - ours).abs().max().item()
    assert difference <= (1e-4 if dtype == torch.float32 else 3e-2) * max(1.0, ours.abs().max().item())


def test_merge_and_save_on_transformers_4bit_model_with_unadapted_projections(base, tmp_path):
    # transformers' 4-bit projections left unadapted are bitsandbytes' Linear4bit, whose eval-mode kernel on an
    # AVX512-BF16 CPU computes in bf16: merge_and_save's reference runs them as training does, in float32, and
    # leaves the model as it was (its weights in the standard layout, their settings restored)
    model = hf_4bit(base)
    patch(model, r=4, lora_alpha=8, lora_dropout=0.0, targets=("o_proj",))
    randomise_adapters(model)
    before = hf_logits(model)
    flags = {n: m.support_avx512bf16_for_cpu for n, m in model.named_modules()
             if hasattr(m, "support_avx512bf16_for_cpu")}
    assert flags
    difference = merge_and_save(model, tmp_path / "merged", probe_ids=IDS)
    assert difference <= 1e-4 * before.abs().max()
    assert {n: m.support_avx512bf16_for_cpu for n, m in model.named_modules() if n in flags} == flags
    torch.testing.assert_close(hf_logits(model), before, rtol=0, atol=0)
    with torch.no_grad():
        merged = from_pretrained(tmp_path / "merged")(IDS)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
