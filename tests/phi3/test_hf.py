"""Our patcher under transformers' Trainer and TRL's SFTTrainer (bf16 autocast on CPU, gradient checkpointing,
packing): adapter-only checkpoints that load with load_adapter and PEFT, and bit-identical resume."""

from __future__ import annotations

import copy

import pytest
import torch
from phi3_tiny import TINY, tiny_config
from phi3_tokenizer import write_tokenizer_dir

import lora
from lora.phi3 import Phi3ForCausalLM, patch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
hf = pytest.importorskip("lora.phi3.hf")

ADAPTERS_ONLY = {"adapter.safetensors", "adapter_config.json", "adapter_model.safetensors"}
FULL_MODEL = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(write_tokenizer_dir(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def conversations():
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(48)]
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tokenized(tokenizer, conversations):
    def encode(row):
        ids = tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)
        return {"input_ids": ids["input_ids"], "labels": ids["input_ids"]}

    return conversations.map(encode, remove_columns=["messages"])


def base_model(tokenizer):
    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**TINY, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                        "eos_token_id": tokenizer.eos_token_id})
    return transformers.Phi3ForCausalLM(config)


def patched(model, use_dora=False):
    patch(model, r=4, lora_alpha=8, lora_dropout=0.05, use_dora=use_dora)
    return model


def training_args(cls, output_dir, **overrides):
    settings = {"per_device_train_batch_size": 4, "max_steps": 6, "save_steps": 3, "use_cpu": True,
                "logging_steps": 1, "report_to": "none", "learning_rate": 1e-2, "seed": 0, "bf16": True,
                "activation_checkpointing": True, "dataloader_num_workers": 0, **overrides}
    return cls(str(output_dir), **settings)


def lm_trainer(model, tokenizer, data, output_dir, **overrides):
    return hf.LoRATrainer(model=model, args=training_args(transformers.TrainingArguments, output_dir, **overrides),
                          train_dataset=data, processing_class=tokenizer,
                          data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True))


def sft_trainer(model, tokenizer, data, output_dir, **overrides):
    from trl import SFTConfig

    args = training_args(SFTConfig, output_dir, packing=True, max_length=64, **overrides)
    return hf.LoRASFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def adapters(model):
    return {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}


def record_autocast(model):
    """Forward hooks on every LoRA layer: (autocast on, output dtype) per call."""
    seen = []
    for module in model.modules():
        if isinstance(module, lora.LoRALayer):
            module.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    return seen


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("make_trainer", "dora"), [(lm_trainer, False), (sft_trainer, False), (lm_trainer, True)],
                         ids=["Trainer", "SFTTrainer", "Trainer-DoRA"])
def test_trainers_train_under_bf16_autocast_and_save_adapters_only(make_trainer, dora, tokenizer, conversations,
                                                                   tokenized, tmp_path):
    base = base_model(tokenizer)
    model = patched(copy.deepcopy(base), use_dora=dora)
    seen = record_autocast(model)
    data = tokenized if make_trainer is lm_trainer else conversations
    trainer = make_trainer(model, tokenizer, data, tmp_path / "run", max_steps=12, save_steps=6)
    trainer.train()
    assert seen and all(seen_on and dtype == torch.bfloat16 for seen_on, dtype in seen)  # bf16=True is autocast
    history = losses(trainer)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.5, history
    assert all(p.dtype == torch.float32 for p in lora.lora_state_dict(model).values())
    for step in (6, 12):
        files = {p.name for p in (tmp_path / "run" / f"checkpoint-{step}").iterdir()}
        assert ADAPTERS_ONLY <= files and not files & FULL_MODEL, files
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert ADAPTERS_ONLY <= files and not files & FULL_MODEL, files

    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # accelerate wraps forward in autocast
    want = logits(model, ids)
    assert not torch.allclose(want, logits(base, ids), atol=1e-3)  # the adapters changed something
    ours = patched(copy.deepcopy(base), use_dora=dora)
    lora.load_adapter(ours, tmp_path / "final" / hf.ADAPTER_NAME)
    torch.testing.assert_close(logits(ours, ids), want, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "final"))
    torch.testing.assert_close(logits(theirs, ids), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("make_trainer", "bf16", "dora"),
                         [(lm_trainer, False, False), (lm_trainer, True, False), (sft_trainer, True, False),
                          (lm_trainer, False, True)],
                         ids=["Trainer-float32", "Trainer-bf16", "SFTTrainer-bf16", "Trainer-float32-DoRA"])
def test_resume_from_an_adapter_checkpoint_matches_an_uninterrupted_run(make_trainer, bf16, dora, tokenizer,
                                                                        conversations, tokenized, tmp_path):
    data = tokenized if make_trainer is lm_trainer else conversations
    whole = patched(base_model(tokenizer), use_dora=dora)
    make_trainer(whole, tokenizer, data, tmp_path / "whole", bf16=bf16).train()
    resumed = patched(base_model(tokenizer), use_dora=dora)
    with torch.no_grad():  # a different start, so only the checkpoint can make the runs agree
        for name, p in resumed.named_parameters():
            if name.endswith("lora_A"):
                p.mul_(-1)
    make_trainer(resumed, tokenizer, data, tmp_path / "resumed", bf16=bf16).train(
        resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    want, got = adapters(whole), adapters(resumed)
    assert want.keys() == got.keys()
    for name in want:
        if bf16:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(got[name], want[name]), name


def test_resuming_from_a_checkpoint_without_our_adapter_file_names_it(tokenizer, tokenized, tmp_path):
    plain = tmp_path / "checkpoint-3"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"")
    trainer = lm_trainer(patched(base_model(tokenizer)), tokenizer, tokenized, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=rf"^{plain / hf.ADAPTER_NAME}: no adapter file in the checkpoint "):
        trainer.train(resume_from_checkpoint=str(plain))


def test_our_model_trains_under_the_trainer_through_trainer_model(tokenizer, tokenized, tmp_path):
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    ours = Phi3ForCausalLM(config)
    patched(ours)
    model = hf.TrainerModel(ours)
    trainer = lm_trainer(model, tokenizer, tokenized, tmp_path / "run", max_steps=12, save_steps=6)
    trainer.train()
    history = losses(trainer)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3 - 0.5, history
    assert ours.gradient_checkpointing  # TrainingArguments(activation_checkpointing=True) reached our model
    files = {p.name for p in (tmp_path / "run" / "checkpoint-12").iterdir()}
    assert ADAPTERS_ONLY <= files and not files & FULL_MODEL, files
    fresh = Phi3ForCausalLM(config)
    fresh.load_state_dict(ours.state_dict(), strict=False)
    patched(fresh)
    lora.load_adapter(fresh, tmp_path / "run" / "checkpoint-12" / hf.ADAPTER_NAME)
    ids = torch.randint(3, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(2))
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids), ours(ids), rtol=0, atol=0)
        output = model.eval()(ids, labels=ids)
    assert output.logits.shape == (2, 10, len(tokenizer)) and torch.isfinite(output.loss)


def one_sgd_step(model, tokenizer, data, output_dir, batch, accumulation, *, trainer_model=False):
    """(update of the adapters, logged loss) of one plain SGD step, lr 1, over `batch * accumulation` rows;
    `trainer_model` trains our `model` through `TrainerModel`."""
    before = adapters(model)
    trainer = lm_trainer(hf.TrainerModel(model) if trainer_model else model, tokenizer, data, output_dir,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                         save_strategy="no", bf16=False, activation_checkpointing=False, optim="sgd",
                         learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant")
    trainer.train()
    after = adapters(model)
    return {name: after[name] - before[name] for name in after}, losses(trainer)[0]


def test_trainer_model_weighs_every_token_alike_however_gradient_accumulation_splits_the_step(tokenizer, tmp_path):
    """4 rows with 2, 46, 3 and 13 labelled tokens, one step in 1, 2 or 4 micro-batches: each gives transformers'
    update and logged loss, from the mean over the step's 64 predicted tokens (not a mean of micro-batch means;
    a row's first label, predicted by nothing, is not counted)."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in ((3, 0), (48, 2), (6, 3), (30, 17)):  # the first `prompt` labels are -100
        ids = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    data = datasets.Dataset.from_list(rows)

    def with_adapters(model):
        patch(model, r=4, lora_alpha=8, lora_dropout=0.0)
        init = torch.Generator().manual_seed(1)
        with torch.no_grad():  # lora_B starts at zero; random adapters give lora_A a gradient too
            for name, p in sorted(model.named_parameters()):
                if name.endswith(("lora_A", "lora_B")):
                    p.copy_(torch.randn(p.shape, generator=init) * 0.2)
        return model

    theirs = base_model(tokenizer)
    want, want_loss = one_sgd_step(with_adapters(copy.deepcopy(theirs)), tokenizer, data, tmp_path / "theirs", 4, 1)
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        ours = Phi3ForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
        ours.load_state_dict(theirs.state_dict())
        got, got_loss = one_sgd_step(with_adapters(ours), tokenizer, data, tmp_path / f"ours-{batch}x{accumulation}",
                                     batch, accumulation, trainer_model=True)
        split = f"{batch} rows x {accumulation} micro-batches"
        assert got_loss == pytest.approx(want_loss, rel=1e-6), split
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda text, split=split: f"{split}: {text}")


def test_trainer_model_refuses_transformers_model_and_checkpointing_it_cannot_do(tokenizer):
    with pytest.raises(TypeError, match=r"^TrainerModel wraps a lora.phi3.Phi3ForCausalLM; got Phi3ForCausalLM"):
        hf.TrainerModel(base_model(tokenizer))
    model = hf.TrainerModel(Phi3ForCausalLM(tiny_config()))
    refused = ({"every_n_layers": 2}, {"offload": True}, {"activation_checkpointing_kwargs": {"use_reentrant": True}})
    for kwargs in refused:
        with pytest.raises(ValueError, match=r"^lora.phi3's model checkpoints every decoder layer with the non-reentr"):
            model.activation_checkpointing_enable(**kwargs)
    assert not model.model.gradient_checkpointing
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    with pytest.raises(TypeError, match=r"^LoRASFTTrainer needs transformers' Phi3ForCausalLM patched with lora"):
        hf.LoRASFTTrainer(model=model)  # TRL reads model.config and calls it with its own arguments
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^TrainerModel: shift_labels \(context parallelism\) is not supported"):
        model(ids, labels=ids, shift_labels=ids)


def test_save_adapters_writes_both_formats_and_nothing_else(tokenizer, tmp_path):
    model = patched(base_model(tokenizer))
    hf.save_adapters(model, tmp_path / "a")
    assert {p.name for p in (tmp_path / "a").iterdir()} == ADAPTERS_ONLY
