"""Our LoRA layers inside transformers' `Trainer` and TRL's `SFTTrainer`: adapter-only checkpoints.

Patch transformers' `Phi3ForCausalLM` with `lora.phi3.patch` and train it with `LoRATrainer` (or
`LoRASFTTrainer`, which needs TRL) instead of `Trainer`: everything else is the trainer's own. Every
`checkpoint-N`, and the final `save_model()`, then holds the adapters only, never the frozen base:

- `adapter.safetensors`: our adapter file (`lora.load_adapter` reads it, checking shapes, ranks and the
  base model's fingerprint); `trainer.train(resume_from_checkpoint=...)` resumes from it;
- `adapter_config.json` + `adapter_model.safetensors`: PEFT's format, so the directory itself loads
  with `peft.PeftModel.from_pretrained(base, path)` and serves with vLLM;
- the trainer's own files (optimizer, scheduler, RNG and trainer state, training arguments, tokenizer).

>>> model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # doctest: +SKIP
>>> patch(model, r=16, lora_alpha=32, lora_dropout=0.05)                                  # doctest: +SKIP
>>> LoRASFTTrainer(model=model, args=SFTConfig(bf16=True), train_dataset=data).train()     # doctest: +SKIP

A `TrainerCallback` cannot do this: its `on_save` runs after the trainer has written the full
`model.safetensors`, and resuming reads that file. So the trainers here override the three methods that
write and read model weights (`_save`, `_load_from_checkpoint`, `_load_best_model`); transformers 5.24
and TRL 1.x call nothing else for it.

`TrainerModel` puts our own `lora.phi3.Phi3ForCausalLM` under these trainers (see docs/hf-trainer.md).

This module imports transformers (TRL only for `LoRASFTTrainer`): `pip install "purelora[hf]"`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from lora.adapter import load_adapter, save_adapter
from lora.layers import lora_layers
from lora.phi3.config import architecture
from lora.phi3.model import Phi3ForCausalLM, document_ids_from_positions
from lora.phi3.peft_format import save_peft_adapter

# LoRASFTTrainer is built by the module's __getattr__ on first use
__all__ = ["ADAPTER_NAME", "LoRASFTTrainer", "LoRATrainer", "LoRATrainerMixin", "TrainerModel", "save_adapters"]  # noqa: F822

ADAPTER_NAME = "adapter.safetensors"


def _adapted_model(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, TrainerModel) else model


def _has_trainable_adapters(model: nn.Module) -> bool:
    return any(layer.lora_A.requires_grad for _, layer in lora_layers(model, adapted_only=True))


def save_adapters(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write `model`'s adapters into the directory `path` in both formats (our file, PEFT's pair).

    The PEFT pair replaces its old version as a whole, keeping every other entry of `path`; our file is
    written after it, atomically too. A crash in between leaves a consistent PEFT pair and the previous
    `adapter.safetensors` (or none); resuming then refuses the checkpoint by name.
    """
    model = _adapted_model(model)
    path = Path(path)
    save_peft_adapter(model, path)
    save_adapter(model, path / ADAPTER_NAME, architecture=architecture(model.config))


class LoRATrainerMixin:
    """Put before a `transformers.Trainer` subclass: its checkpoints and final save hold adapters only.

    QLoRA: transformers' 4-bit model (`BitsAndBytesConfig(load_in_4bit=True)`) patched with `lora.phi3.patch`
    trains too. `Trainer.__init__` refuses a quantized model without PEFT adapters ("purely quantized"); ours are
    trainable adapters as PEFT's would be, so for that check only the model is marked as carrying adapters.
    """

    _takes_trainer_model = True  # LoRASFTTrainer: False (TRL reads model.config and calls it with its own arguments)

    def __init__(self, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        if isinstance(model, TrainerModel) and not self._takes_trainer_model:
            raise TypeError(f"{type(self).__name__} needs transformers' Phi3ForCausalLM patched with lora.phi3.patch "
                            "(TRL reads the model's config and calls it with its own arguments); TrainerModel, our "
                            "model's wrapper, is for LoRATrainer")
        adapted = _adapted_model(model) if model is not None else None
        vouch = (adapted is not None and getattr(adapted, "is_quantized", False)
                 and not getattr(adapted, "_hf_peft_config_loaded", False) and _has_trainable_adapters(adapted))
        if vouch:
            adapted._hf_peft_config_loaded = True  # what transformers' validate_quantization_for_training reads
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if vouch:  # transformers' save_pretrained reads it as "PEFT's adapters are loaded": not ours
                adapted._hf_peft_config_loaded = False

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapters(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        # What Trainer writes beside every model; read by its own tools, never loaded by this library.
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        adapter = Path(resume_from_checkpoint) / ADAPTER_NAME
        if not adapter.is_file():
            raise FileNotFoundError(
                f"{adapter}: no adapter file in the checkpoint {resume_from_checkpoint} (a {type(self).__name__} "
                "checkpoint holds one; a checkpoint of a plain Trainer holds the whole model instead)"
            )
        model = _adapted_model(model if model is not None else self.model)
        load_adapter(model, adapter, architecture=architecture(model.config))

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


class LoRATrainer(LoRATrainerMixin, transformers.Trainer):
    """`transformers.Trainer` whose checkpoints and `save_model()` hold only the adapters."""


class TrainerModel(nn.Module):
    """Our `Phi3ForCausalLM` with the forward a `Trainer` calls: `(input_ids, attention_mask, labels)` in,
    an object with `.loss` and `.logits` out.

    In training the loss is our chunked one, which never builds the (B, T, vocab) float32 logits, and
    `.logits` is None (a training step reads only the loss); in eval mode both are computed. Rows packed
    without an attention mask (position ids restarting at 0, as TRL's padding-free packing gives them) attend
    within their own document only.

    The loss is the mean over the batch's labelled tokens or, given `num_items_in_batch` (the labelled tokens
    of the whole optimizer step, which the Trainer passes), their sum divided by it, as transformers' causal
    models do: under gradient accumulation each micro-batch then weighs by its tokens, and the step's update
    and logged loss do not depend on how the batch is split.

    >>> trainer = LoRATrainer(model=TrainerModel(patched_phi3), args=args, train_dataset=data)  # doctest: +SKIP
    """

    # Read by Trainer.__init__: the forward takes `num_items_in_batch` (so the Trainer leaves the gradient
    # accumulation's normalisation to it), and the loss shifts labels (so the Trainer counts `labels[..., 1:]`,
    # the tokens the loss sums over, not the full labels).
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

    def __init__(self, model: Phi3ForCausalLM) -> None:
        if not isinstance(model, Phi3ForCausalLM):
            raise TypeError(f"TrainerModel wraps a lora.phi3.Phi3ForCausalLM; got {type(model).__name__} "
                            "(transformers' model goes to the trainer as it is)")
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **unused: Any,
    ) -> CausalLMOutput:
        if unused.get("shift_labels") is not None:  # the Trainer's context parallelism would count those tokens
            raise ValueError("TrainerModel: shift_labels (context parallelism) is not supported; our loss shifts "
                             "`labels` itself, over whole sequences")
        packed = position_ids is not None and attention_mask is None
        documents = document_ids_from_positions(position_ids.expand(input_ids.shape[0], -1)) if packed else None
        inputs = {"position_ids": position_ids, "attention_mask": attention_mask, "document_ids": documents}
        loss = logits = None
        if labels is not None and num_items_in_batch is None:
            loss = self.model.loss(input_ids, labels, **inputs)
        elif labels is not None:  # a step without labelled tokens has a zero sum: 0, not 0 / 0
            loss = self.model.loss(input_ids, labels, **inputs, reduction="sum")
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1)
        if labels is None or not self.training:
            logits = self.model(input_ids, **inputs)
        return CausalLMOutput(loss=loss, logits=logits)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """What `TrainingArguments(activation_checkpointing=True)` calls: recompute every decoder layer in
        backward (our model's non-reentrant `torch.utils.checkpoint`; no other variant is offered)."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False) or kwargs or every_n_layers != 1 or offload:
            raise ValueError(
                "lora.phi3's model checkpoints every decoder layer with the non-reentrant torch.utils.checkpoint "
                f"and nothing else; got activation_checkpointing_kwargs={activation_checkpointing_kwargs!r}, "
                f"every_n_layers={every_n_layers!r}, offload={offload!r}"
            )
        self.model.gradient_checkpointing = True

    def activation_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False


def __getattr__(name: str) -> Any:
    # TRL is heavy to import and optional: LoRASFTTrainer is built on first use.
    if name == "LoRASFTTrainer":
        from trl import SFTTrainer

        trainer = type("LoRASFTTrainer", (LoRATrainerMixin, SFTTrainer), {
            "__doc__": "TRL's `SFTTrainer` whose checkpoints and `save_model()` hold only the adapters.",
            "_takes_trainer_model": False,
            "__module__": __name__,
        })
        globals()[name] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
