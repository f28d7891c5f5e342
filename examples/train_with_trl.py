"""Fine-tune transformers' Phi-3 with our LoRA layers under TRL's SFTTrainer (or transformers' Trainer).

The recipe of the Phi-3 model card's sample_finetune.py with `lora.phi3.patch` in place of PEFT's
`get_peft_model`: bf16 autocast, gradient (activation) checkpointing, packing. Checkpoints and the final
save hold only the adapters, in our format and PEFT's (see docs/hf-trainer.md).

    pip install -e ".[hf]"
    python examples/train_with_trl.py     # a tiny random Phi-3 and the sample chat data: a quick demo
    python examples/train_with_trl.py --model Phi-3-mini-4k-instruct --data train.jsonl --max-steps 1000
    python examples/train_with_trl.py --trainer trainer     # transformers' Trainer on pre-tokenised rows
    python examples/train_with_trl.py --resume runs/trl-lora/checkpoint-20

Without --model, a tiny Phi-3 (2 layers, hidden 128, random weights) with a byte-level tokenizer and Phi-3's
chat template is written to runs/tiny-phi3-hf/ on first use.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_DIR = ROOT / "runs" / "tiny-phi3-hf"
TINY_SEED = 1234
SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
# Phi-3-mini-4k-instruct's current chat template (the `chat_template` of its tokenizer_config.json on the Hub).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

log = logging.getLogger("train_with_trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", type=Path, help=f"transformers Phi-3 checkpoint directory (default: {TINY_DIR})")
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "train.jsonl",
                        help="JSONL, one {\"messages\": [...]} per line")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "trl-lora")
    parser.add_argument("--trainer", choices=("sft", "trainer"), default="sft",
                        help="TRL's SFTTrainer (tokenises and packs itself) or transformers' Trainer")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, help="default: 5e-6 for --model (the model card's), 3e-3 "
                        "for the tiny random model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--no-packing", dest="packing", action="store_false")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 (no autocast)")
    parser.add_argument("--resume", type=Path, help="a checkpoint-N directory of an earlier run")
    return parser.parse_args(argv)


def tiny_checkpoint() -> Path:
    """A tiny random Phi-3 and a byte-level tokenizer with Phi-3's specials and chat template, built once."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lora.atomic import atomic_directory

    if (TINY_DIR / "config.json").is_file():
        return TINY_DIR
    byte_symbols = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for the bytes
    tokenizer = Tokenizer(models.BPE({s: i for i, s in enumerate(sorted(byte_symbols))}, [], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>", chat_template=PHI3_CHAT_TEMPLATE)
    config = transformers.Phi3Config(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, original_max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        initializer_range=0.2)
    with torch.random.fork_rng():  # the run's own seed decides adapters and data order, whether built or found
        torch.manual_seed(TINY_SEED)
        model = transformers.Phi3ForCausalLM(config)
    with atomic_directory(TINY_DIR, replace=False) as tmp:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
    return TINY_DIR


def read_conversations(path: Path):
    import datasets

    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append({"messages": json.loads(line)["messages"]})
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise SystemExit(f"{path}:{number}: not a {{\"messages\": [...]}} line ({error})") from error
    return datasets.Dataset.from_list(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import transformers

    from lora.phi3 import patch
    from lora.phi3.hf import LoRASFTTrainer, LoRATrainer

    model_dir = args.model or tiny_checkpoint()
    learning_rate = args.learning_rate or (5e-6 if args.model else 3e-3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    log.info("LoRA:\n%s", patch(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout))
    conversations = read_conversations(args.data)
    settings = dict(output_dir=str(args.output_dir), max_steps=args.max_steps, learning_rate=learning_rate,
                    per_device_train_batch_size=args.batch_size, lr_scheduler_type="cosine", warmup_steps=0.05,
                    bf16=args.bf16, activation_checkpointing=True, save_steps=args.save_steps,
                    logging_steps=max(1, min(10, args.max_steps // 10)),
                    report_to="none", seed=0, use_cpu=not torch.cuda.is_available())
    if args.trainer == "sft":
        from trl import SFTConfig

        config = SFTConfig(packing=args.packing, max_length=args.max_length, **settings)
        trainer = LoRASFTTrainer(model=model, args=config, train_dataset=conversations, processing_class=tokenizer)
    else:
        def encode(row):
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=args.max_length)["input_ids"]
            return {"input_ids": ids, "labels": ids}

        data = conversations.map(encode, remove_columns=["messages"])
        trainer = LoRATrainer(model=model, args=transformers.TrainingArguments(**settings), train_dataset=data,
                              processing_class=tokenizer,
                              data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True))
    trainer.train(resume_from_checkpoint=str(args.resume) if args.resume else None)
    trainer.save_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    log.info("wrote adapters (ours and PEFT's) to %s", args.output_dir)
    print(f"train loss: {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"({100 * (losses[-1] / losses[0] - 1):+.1f}%); adapter: {args.output_dir / 'adapter.safetensors'}")


if __name__ == "__main__":
    main()
