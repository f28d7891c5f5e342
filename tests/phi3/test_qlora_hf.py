"""The cookbook's QLoRA path: transformers' 4-bit Phi-3 (bitsandbytes NF4) + our patcher + ``Trainer(bf16=True)``,
with activation checkpointing; adapter-only checkpoints that load in ours and PEFT on the same 4-bit base."""

from __future__ import annotations

import pytest
import torch
from phi3_tiny import TINY
from test_hf import conversations, lm_trainer, losses, patched, record_autocast, tokenized, tokenizer  # noqa: F401

import lora
from lora import quant

bnb = pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("lora.phi3.hf")

WIDE = {"hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2}


def quantized(path, compute_dtype=torch.bfloat16):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    return transformers.Phi3ForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                        dtype=torch.float32)


@pytest.fixture
def base_dir(tokenizer, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**TINY, **WIDE, "vocab_size": len(tokenizer),
                                        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id})
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_trainer_bf16_on_a_transformers_4bit_base(base_dir, tokenizer, tokenized, tmp_path):  # noqa: F811
    model = patched(quantized(base_dir))
    assert quant.is_quantized(model.model.layers[0].mlp.down_proj.weight)
    seen = record_autocast(model)
    trainer = lm_trainer(model, tokenizer, tokenized, tmp_path / "run", max_steps=12, save_steps=6)
    assert not model._hf_peft_config_loaded  # marked for Trainer's check only
    trainer.train()
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)  # bf16=True is autocast
    history = losses(trainer)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.5, history
    assert all(p.dtype == torch.float32 for p in lora.lora_state_dict(model).values())
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} >= set(hf.ADAPTER_NAME.split()) | {"adapter_config.json"}
    assert not (tmp_path / "final" / "model.safetensors").exists()

    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.eval()  # every projection is ours: bnb's eval-mode CPU kernel (bf16) never runs
    with torch.no_grad():
        want = model(ids).logits
    ours = patched(quantized(base_dir, torch.float32)).eval()  # a fresh 4-bit load + our adapter file
    lora.load_adapter(ours, tmp_path / "final" / hf.ADAPTER_NAME)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
    peft = pytest.importorskip("peft")
    base = quantized(base_dir, torch.float32)
    for module in base.modules():  # PEFT runs bnb's Linear4bit, whose eval-mode CPU kernel computes in bf16
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "final")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)
