"""LoRA fine-tuning of Phi-3 on a chat-instruction dataset, in one file: config, setup, data, eval, schedule, loop.

    python examples/train_phi3.py                    # embedded tiny Phi-3 + examples/data, ~1 min on 2 CPU cores
    python examples/train_phi3.py --model Phi-3-mini-4k-instruct --data train.jsonl --eval-data test.jsonl
    torchrun --nproc_per_node 2 examples/train_phi3.py ...            # DDP: gloo on CPU, nccl on GPU
    torchrun --nproc_per_node 2 examples/train_phi3.py ... --fsdp     # FSDP2: each process holds 1/N of the model
    python examples/train_phi3.py --resume runs/phi3-lora/checkpoints/step-000100
    python examples/train_phi3.py --model Phi-3-mini-4k-instruct --dtype bfloat16 --load-in-4bit  # QLoRA (NF4)

Only the LoRA adapters train (AdamW, warmup + cosine, accumulation, clipping); the loss covers assistant
tokens only, each turn's `<|end|>` included. Output (rank 0 only): metrics.jsonl, checkpoints/step-N/
(adapter, optimizer, scheduler, RNG, step, config; written atomically), adapter.safetensors (ours),
adapter-peft/ (PEFT's format), loss.png (with matplotlib), merged/ (with --merge).
The last line printed is `eval loss: BEFORE -> AFTER (-P%)`. See docs/training.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lora
from lora.atomic import atomic_directory, atomic_write, replace_directory
from lora.phi3 import (
    DEFAULT_TARGETS,
    Phi3Config,
    Phi3ForCausalLM,
    from_pretrained,
    generate,
    merge_and_save,
    patch,
    save_peft_adapter,
    save_pretrained,
)
from lora.phi3.chat import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatTemplate,
    encode_prompt,
    stop_token_ids,
    template_from_checkpoint,
)
from lora.phi3.data import Example, collate, encode_conversations, pack_examples, read_conversations, step_indices
from lora.phi3.fsdp import from_pretrained_sharded, root_unsharded
from lora.phi3.patch import PatchSummary
from lora.phi3.tokenizer import ByteTokenizer, load_tokenizer
from lora.quant import require_bitsandbytes
from lora.sharding import full_tensor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("train_phi3")

# ---------------------------------------------------------------------------------------------------------------
# Config. Defaults are Microsoft's recipe for LoRA on Phi-3-mini (sample_finetune.py in the model repos):
# lr 5e-6, cosine, warmup 0.2, 1 epoch, batch 4, gradient checkpointing, r 16, alpha 32, dropout 0.05,
# all linear projections, 2048 tokens, bf16 weights. Every key is a command-line option (`--learning-rate`)
# and may be set in a JSON or TOML file (`--config FILE`); precedence: command line > file > defaults.
# ---------------------------------------------------------------------------------------------------------------
training_config: dict[str, Any] = {
    "model": None,  # a Phi-3 checkpoint directory; None: the embedded tiny model
    "data": str(HERE / "data" / "train.jsonl"),
    "eval_data": str(HERE / "data" / "eval.jsonl"),
    "output_dir": "runs/phi3-lora",
    "dtype": "auto",
    "device": "auto",
    "seed": 0,
    "learning_rate": 5.0e-6,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.2,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True,
    "max_seq_length": 2048,
    "truncation": "truncate",
    "packing": False,
    "chat_template": "auto",
    "logging_steps": 20,
    "eval_steps": 100,
    "save_steps": 100,
    "save_total_limit": 1,
    "sample_prompt": "What is 17 + 25?",
    "sample_max_new_tokens": 64,
    "merge": False,
    "progress": True,
    "fsdp": False,
    # QLoRA (transformers' BitsAndBytesConfig names; defaults as lora.phi3.from_pretrained's): the four projections
    # stored in 4 bits, dequantized to --dtype on the fly; needs the qlora extra (bitsandbytes)
    "load_in_4bit": False,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
}
peft_config: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
    "use_rslora": False,
    "use_dora": False,
}
# The embedded model is random, not pretrained: LoRA alone must carry everything it learns, in about a minute
# of CPU. So: rank 32 over all four projections (a fifth of the parameters, enough to learn the templates),
# alpha = r (scaling 1), and a learning rate 600x the recipe's (which is tuned to nudge a pretrained 3.8B
# model), warmup 5%, eight epochs of batch 8 (480 steps). No dropout (the eval set follows the same
# templates; nothing to regularise) and no gradient checkpointing (memory is no issue at this size, and
# recomputing would cost a third more time). Measured on 2 idle CPU cores: about 50 s, eval loss 7.09 ->
# about 0.8, far below the 3.36 of a unigram model; a busy machine can take several times longer.
EMBEDDED_OVERRIDES: dict[str, Any] = {
    "dtype": "float32",
    "learning_rate": 3.0e-3,
    "warmup_ratio": 0.05,
    "num_train_epochs": 8.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "gradient_checkpointing": False,
    "max_seq_length": 512,
    "logging_steps": 40,
    "eval_steps": 160,
    "save_steps": 240,
    "sample_prompt": "What is the capital of Italy?",
    "sample_max_new_tokens": 40,
    "r": 32,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
}
# The tiny model: Phi-3's architecture at small widths (2 layers, hidden 128) over the 264-id byte tokenizer.
EMBEDDED_MODEL = {
    "vocab_size": 264,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "original_max_position_embeddings": 1024,
    "bos_token_id": 257,
    "eos_token_id": [259, 260, 262],
    "pad_token_id": 256,
}
EMBEDDED_SEED = 1234
EMBEDDED_DIR = ROOT / "runs" / "tiny-phi3-v2"

HELP = {
    "model": "Phi-3 checkpoint directory (config.json, safetensors, tokenizer.json); default: the embedded "
             f"tiny model, built on first use in {EMBEDDED_DIR}",
    "data": "training conversations, JSONL: one {\"messages\": [{\"role\": ..., \"content\": ...}]} per line",
    "eval_data": "evaluation conversations, same format",
    "output_dir": "where metrics, checkpoints and adapters are written",
    "dtype": "base weight dtype: auto (the checkpoint's), float32, bfloat16, float16; adapters stay float32",
    "device": "auto (cuda if available), cpu, cuda, or cuda:N",
    "seed": "seed of the adapters' init, data order and dropout",
    "learning_rate": "peak AdamW learning rate",
    "lr_scheduler_type": "cosine, linear or constant decay after the warmup",
    "warmup_ratio": "fraction of the steps with a linear warmup",
    "weight_decay": "AdamW weight decay on the adapters",
    "max_grad_norm": "clip the adapters' gradient norm to this (0: no clipping)",
    "num_train_epochs": "passes over the data (when max_steps is -1)",
    "max_steps": "optimizer steps to run; -1: num_train_epochs passes",
    "per_device_train_batch_size": "conversations (or packed rows) per micro-batch and process",
    "per_device_eval_batch_size": "conversations per evaluation batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "gradient_checkpointing": "recompute each decoder layer in backward (less memory, ~1/3 more compute)",
    "max_seq_length": "longest conversation in tokens (and the packed row length)",
    "truncation": "longer conversations: truncate (keep the start) or drop",
    "packing": "pack conversations into max_seq_length rows, attention kept within each conversation",
    "chat_template": "auto (from the checkpoint's tokenizer_config.json; the current Phi-3 one if none) or "
                     + ", ".join(TEMPLATES),
    "logging_steps": "log (and write metrics.jsonl) every N steps",
    "eval_steps": "evaluate and generate a sample every N steps and at the end",
    "save_steps": "checkpoint every N steps and at the end",
    "save_total_limit": "checkpoints to keep (older ones are removed)",
    "sample_prompt": "user message of the sample generation",
    "sample_max_new_tokens": "length limit of the sample generation",
    "merge": "also write a merged checkpoint (base + adapters) to output_dir/merged",
    "progress": "show a tqdm progress bar (when tqdm is installed); else log lines",
    "fsdp": "under torchrun: shard the base and the adapters across the processes with FSDP2 (each holds 1/N) "
            "instead of replicating them with DDP",
    "load_in_4bit": "QLoRA: store the four projections of every layer in 4 bits (bitsandbytes, pip install "
                    "'purelora[qlora]'); they dequantize to --dtype, which embeddings, norms and lm_head keep. "
                    "On a GPU pass --device cuda (bitsandbytes' CUDA kernels); not with --fsdp or --use-dora",
    "bnb_4bit_quant_type": "4-bit data type with --load-in-4bit: nf4 (NormalFloat, QLoRA's) or fp4",
    "bnb_4bit_use_double_quant": "with --load-in-4bit, quantize the per-block scales too (0.127 bits per weight "
                                 "instead of 0.5; the QLoRA notebooks set it)",
    "r": "LoRA rank",
    "lora_alpha": "LoRA alpha: the update is (alpha / r) * B @ A",
    "lora_dropout": "dropout on the adapters' input",
    "bias": "which biases train: none (Phi-3 has no biases)",
    "task_type": "CAUSAL_LM (what PEFT's adapter_config.json records)",
    "target_modules": "all-linear, or names among qkv_proj, o_proj, gate_up_proj, down_proj, q, k, v, gate, up",
    "use_rslora": "scale by alpha / sqrt(r) instead of alpha / r",
    "use_dora": "DoRA: a trainable magnitude per adapted row on top of LoRA (docs/layers.md)",
}
CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "lr_scheduler_type": ("cosine", "linear", "constant"),
    "truncation": ("truncate", "drop"),
    "chat_template": ("auto", *TEMPLATES),
    "bias": ("none",),
    "task_type": ("CAUSAL_LM",),
    "bnb_4bit_quant_type": ("nf4", "fp4"),
}
# Settings that may change when resuming: where things go and how they are shown, not what is computed; and
# the length of the run (a larger --max-steps extends a finished run, the schedule re-planned for the new total).
RESUMABLE_CHANGES = {"output_dir", "device", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                     "sample_prompt", "sample_max_new_tokens", "merge", "progress", "max_steps", "num_train_epochs"}


def option_name(key: str) -> str:
    """`--learning-rate` for `learning_rate`; `--lora-r` for `r` (torchrun would read `--r` as its own `--rdzv-*`)."""
    return "--lora-r" if key == "r" else "--" + key.replace("_", "-")


def option_names(key: str) -> list[str]:
    """`option_name(key)` and its transformers spelling (`--learning_rate`, `--lora_r`), as pasted from HF recipes."""
    name = option_name(key)
    return list(dict.fromkeys([name, "--" + name[2:].replace("-", "_")]))


def build_parser() -> argparse.ArgumentParser:
    """`--key` for every config key (`--no-key` for switches), documented from HELP, default from the dicts."""
    # SUPPRESS: only what the user gave appears, so a config file or a checkpoint's settings fill the rest.
    # No abbreviations: `--r 8` must not mean `--resume 8`.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                                     allow_abbrev=False)
    parser.add_argument("--config", help="JSON or TOML file of settings (flat, or [training_config] and "
                                         "[peft_config] tables)")
    parser.add_argument("--resume", help="checkpoint directory (or an output_dir: its latest checkpoint) to "
                                         "continue from, with its settings")
    parser.add_argument("--overwrite-output-dir", "--overwrite_output_dir", action="store_true",
                        help="let an explicit --output-dir that holds another run be replaced (only once this "
                             "run has completed; until then the old run stays)")
    for group_name, group in (("training_config", training_config), ("peft_config", peft_config)):
        options = parser.add_argument_group(group_name)
        for key, default in group.items():
            flags = option_names(key)
            shown = EMBEDDED_OVERRIDES.get(key)
            text = HELP[key] + (f" (default {default}; embedded model: {shown})" if shown is not None
                                else f" (default {default})")
            if isinstance(default, bool):
                options.add_argument(*flags, dest=key, action=argparse.BooleanOptionalAction, help=text)
            elif key == "target_modules":
                options.add_argument(*flags, dest=key, nargs="+", help=text)
            else:
                kind = type(default) if default is not None else str
                options.add_argument(*flags, dest=key, type=kind, choices=CHOICES.get(key), help=text)
    return parser


def check_types(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with each setting of its default's type (a bool a bool, an int an int); else a ValueError naming
    `source` and the key. Ints are accepted (and converted) where a float is expected."""
    defaults = {**training_config, **peft_config}
    checked = {}
    for key, value in values.items():
        default = defaults[key]
        if key == "target_modules":
            ok = value == "all-linear" or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
            expected = "a list of module names (or \"all-linear\")"
            if isinstance(value, str) and not ok:
                expected += f"; write [\"{value}\"] for one name"
        elif key == "model":
            ok, expected = value is None or isinstance(value, str), "a directory name (a string) or null"
        elif isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false (a boolean, not a string)"
        elif isinstance(default, int):
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            value = float(value) if ok else value
        else:
            ok, expected = isinstance(value, str), "a string"
        if not ok:
            raise ValueError(f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__})")
        checked[key] = value
    return checked


def read_json(path: Path, what: str) -> Any:
    """`json.loads` of a file, with errors that name it."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path}: cannot read it ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from err


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a JSON or TOML file: flat keys, or `training_config` / `peft_config` sections."""
    file = Path(path)
    try:
        if file.suffix == ".toml":
            try:
                import tomllib
            except ImportError as err:  # Python 3.10
                raise ValueError(f"{file}: TOML needs Python 3.11 (tomllib); use a JSON file") from err
            data = tomllib.loads(file.read_text())
        else:
            data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--config {file}: cannot read it ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"--config {file}: expected an object of settings")
    flat = {k: v for k, v in data.items() if k not in ("training_config", "peft_config")}
    for section in ("training_config", "peft_config"):
        if not isinstance(data.get(section, {}), dict):
            raise ValueError(f"--config {file}: {section} must be a table of settings")
        flat.update(data.get(section, {}))
    unknown = sorted(set(flat) - set(training_config) - set(peft_config))
    if unknown:
        raise ValueError(f"--config {file}: unknown settings {unknown}; known: "
                         f"{', '.join([*training_config, *peft_config])}")
    return check_types(flat, f"--config {file}")


def latest_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest `checkpoints/step-N` under it."""
    if (path / "trainer_state.pt").is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step-*"))
    if not steps:
        raise FileNotFoundError(f"--resume {path}: not a checkpoint directory and no checkpoints/step-* inside")
    return steps[-1]


@dataclass
class RunOptions:
    """What this invocation asked for beyond the settings: where from, and whether it may replace a run."""

    checkpoint: Path | None = None
    output_dir_given: bool = False
    overwrite_output_dir: bool = False


def resolve_config(argv: list[str] | None) -> tuple[dict[str, Any], RunOptions]:
    """Defaults < (embedded overrides) < config file < command line; on --resume the checkpoint's settings."""
    args = vars(build_parser().parse_args(argv))
    config_file, resume = args.pop("config", None), args.pop("resume", None)
    run = RunOptions(overwrite_output_dir=args.pop("overwrite_output_dir", False))
    explicit = {**(read_config_file(config_file) if config_file else {}), **args}
    run.output_dir_given = "output_dir" in explicit
    if resume is not None:
        run.checkpoint = latest_checkpoint(Path(resume))
        path = run.checkpoint / "train_config.json"
        saved = read_json(path, "--resume")
        if not isinstance(saved, dict) or set(saved) != {*training_config, *peft_config}:
            raise ValueError(f"--resume {path}: not the settings of a run of this script")
        saved = check_types(saved, f"--resume {path}")
        changed = sorted(k for k, v in explicit.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if changed:
            raise ValueError(f"--resume {run.checkpoint}: {', '.join(f'{k}={explicit[k]!r}' for k in changed)} "
                             f"contradict the checkpoint's settings "
                             f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); resuming keeps them")
        return {**saved, **explicit}, run
    config = {**training_config, **peft_config}
    if explicit.get("model") is None:
        config.update(EMBEDDED_OVERRIDES)
    config.update(explicit)
    return config, run


def check_config(config: dict[str, Any]) -> None:
    """Every value in range and no two that contradict each other: a ValueError naming the options."""
    positive = ["learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "max_seq_length", "logging_steps", "eval_steps", "save_steps",
                "save_total_limit", "r", "lora_alpha"]
    for key in positive:
        if not config[key] > 0:
            raise ValueError(f"{option_name(key)} must be positive, got {config[key]}")
    for key in ("weight_decay", "max_grad_norm", "sample_max_new_tokens"):
        if config[key] < 0:
            raise ValueError(f"{option_name(key)} must be >= 0, got {config[key]}")
    if not 0 <= config["warmup_ratio"] < 1:
        raise ValueError(f"--warmup-ratio must be in [0, 1), got {config['warmup_ratio']}")
    if not 0 <= config["lora_dropout"] < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {config['lora_dropout']}")
    if config["max_steps"] == 0 or config["max_steps"] < -1:
        raise ValueError(f"--max-steps must be positive, or -1 to use --num-train-epochs; got {config['max_steps']}")
    if config["max_steps"] == -1 and config["num_train_epochs"] <= 0:
        raise ValueError("--max-steps -1 trains for --num-train-epochs, which must then be positive, "
                         f"got {config['num_train_epochs']}")
    for key, choices in CHOICES.items():
        if config[key] not in choices:
            raise ValueError(f"{option_name(key)} must be one of {', '.join(choices)}, got {config[key]!r}")
    check_device(config["device"])
    if config["fsdp"] and config["use_dora"]:
        raise ValueError("--fsdp with --use-dora is not supported: DoRA starts its magnitude from each whole row of "
                         "the base weight, which a sharded load never holds; train DoRA with DDP (torchrun without "
                         "--fsdp)")
    if config["load_in_4bit"]:
        for key in ("fsdp", "use_dora"):
            if config[key]:
                raise ValueError(f"--load-in-4bit with {option_name(key)} is not supported: "
                                 + ("FSDP2 shards each parameter along its rows, which a packed 4-bit weight and its "
                                    "block scales do not allow; train QLoRA with DDP (torchrun without --fsdp)"
                                    if key == "fsdp" else "DoRA needs the row norms of the dequantized weight at every "
                                    "step; use plain LoRA on a 4-bit base, or DoRA on a bf16 one"))
        require_bitsandbytes()  # an ImportError naming the qlora extra, before anything is loaded
    if config["fsdp"] and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards the model across processes: run the script under torchrun with two or more "
                         "(torchrun --nproc_per_node N examples/train_phi3.py ... --fsdp)")
    if Path(config["output_dir"]).resolve() == Path(config["model"] or EMBEDDED_DIR).resolve():
        raise ValueError("--output-dir must differ from --model: the base checkpoint would be overwritten")


def check_device(name: str) -> None:
    """A ValueError unless `name` is auto or a device this PyTorch build has and this machine can use."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N, ...): {err}") from err
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    if backend is None or not hasattr(backend, "is_available"):
        raise ValueError(f"--device {name}: this PyTorch build has no {device.type} support; use cpu or auto")
    if not backend.is_available():
        raise ValueError(f"--device {name}: {device.type.upper()} is not available on this machine "
                         "(or this PyTorch build lacks it); use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


# ---------------------------------------------------------------------------------------------------------------
# Setup: processes, device, model, tokenizer.
# ---------------------------------------------------------------------------------------------------------------
def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """`(rank, world size, device)`; under torchrun (WORLD_SIZE > 1) joins the process group first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1 and device_name == "cuda":
        device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(device_name)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def embedded_model_dir() -> Path:
    """The tiny random Phi-3 checkpoint (float32, seed 1234), written once as a real checkpoint directory."""
    if (EMBEDDED_DIR / "config.json").is_file():
        return EMBEDDED_DIR
    # On a forked RNG: the run's own stream (adapter init, data order, dropout) must not depend on whether
    # this call found the checkpoint already written.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDED_SEED)
        model = Phi3ForCausalLM(Phi3Config(**EMBEDDED_MODEL))
    # A frozen random head behind RMSNorm can only reach logits up to |w| sqrt(hidden): with nn.Linear's init
    # that is ~6, too flat to ever be confident. 3x wider rows let LoRA reach sharp predictions; the untrained
    # loss is then above uniform (about 7.1 vs ln 264 = 5.6), so the unigram loss is printed as the reference.
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    try:
        with atomic_directory(EMBEDDED_DIR, replace=False) as tmp:  # another process may win the race: keep its
            save_pretrained(model, tmp)
            ByteTokenizer().save(tmp)
    except FileExistsError:
        if not (EMBEDDED_DIR / "config.json").is_file():
            raise
    return EMBEDDED_DIR


def load_model(path: Path, config: dict[str, Any], device: torch.device) -> Phi3ForCausalLM:
    """`from_pretrained` (4-bit with --load-in-4bit), with errors that say what a Phi-3 directory is."""
    if not path.is_dir():
        raise ValueError(f"--model {path}: not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json; expected a Phi-3 checkpoint directory")
    dtype = None if config["dtype"] == "auto" else config["dtype"]
    quantize = config["bnb_4bit_quant_type"] if config["load_in_4bit"] else None
    try:
        return from_pretrained(path, dtype=dtype, device=device, quantize=quantize,
                               double_quant=config["bnb_4bit_use_double_quant"])
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--model {path}: not a loadable Phi-3 checkpoint: {err}") from err


def patch_model(model: Phi3ForCausalLM, config: dict[str, Any]) -> PatchSummary:
    """LoRA on the configured targets (`all-linear`: the four projections); only the adapters train."""
    targets = config["target_modules"]
    targets = DEFAULT_TARGETS if targets in ("all-linear", ["all-linear"]) else tuple(targets)
    return patch(model, r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                 targets=targets, use_rslora=config["use_rslora"], use_dora=config["use_dora"])


def load_sharded_model(path: Path, config: dict[str, Any],
                       device: torch.device) -> tuple[Phi3ForCausalLM, PatchSummary]:
    """The patched model sharded with FSDP2, each rank reading only its rows (see lora.phi3.fsdp)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json; expected a Phi-3 checkpoint directory")
    summary = []  # errors name the file or the layer at fault
    model = from_pretrained_sharded(path, dtype=None if config["dtype"] == "auto" else config["dtype"],
                                    device=device, prepare=lambda m: summary.append(patch_model(m, config)))
    return model, summary[0]


class SummedLoss(nn.Module):
    """The model's summed next-token loss on a batch, as a module's forward so DDP can wrap it (under FSDP2
    `loss` itself runs FSDP2's hooks: lora.phi3.fsdp registers it as a forward method)."""

    def __init__(self, model: Phi3ForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None):
        """`sum over labelled t of -log p(labels[t + 1] | ids[:t + 1])`; packed rows when position_ids are given."""
        return self.model.loss(input_ids, labels, position_ids=position_ids, packed=position_ids is not None,
                               reduction="sum")


# ---------------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------------
def load_rows(path: str, tokenizer: Any, template: ChatTemplate, config: dict[str, Any], name: str) -> list[Example]:
    """Read, check and tokenise a JSONL file; log what the length policy did."""
    examples, stats = encode_conversations(read_conversations(path), tokenizer, template,
                                           max_length=config["max_seq_length"], policy=config["truncation"])
    log.info("%s (%s): %s (max %d tokens)", name, path, stats, config["max_seq_length"])
    if stats.dropped:
        log.warning("%s: dropped lines %s%s", name, stats.dropped_lines[:10], " ..." if stats.dropped > 10 else "")
    if not examples:
        raise ValueError(f"{path}: no conversation left after the length policy ({stats})")
    return examples


def unigram_loss(train: list[Example], evaluation: list[Example], vocab_size: int) -> float:
    """Cross-entropy of the eval assistant tokens under add-one unigram frequencies of the train ones.

    `-mean(log((count[t] + 1) / (N + V)))`: what a model that ignores context can reach.
    """
    def targets(rows: list[Example]) -> torch.Tensor:
        return torch.tensor([t for r in rows for t in r.labels[1:] if t != IGNORE_INDEX])

    counts = torch.bincount(targets(train), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[targets(evaluation)].mean())


# ---------------------------------------------------------------------------------------------------------------
# Eval: loss and perplexity over the eval set, a greedy sample from a fixed prompt.
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: Phi3ForCausalLM, rows: list[Example], config: dict[str, Any], pad_id: int,
             device: torch.device, rank: int, world: int) -> float:
    """Mean loss over every assistant token of the eval set (each rank a shard, summed across ranks).

    Under FSDP every forward is collective, so each rank runs as many batches as rank 0 (whose shard is the
    largest); a rank out of rows runs its first row again and does not count it.
    """
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, token count)
    shard = rows[rank::world]
    size = config["per_device_eval_batch_size"]
    batches = math.ceil(len(rows[0::world] if config["fsdp"] else shard) / size)
    for k in range(batches):
        part, weight = shard[k * size : (k + 1) * size], 1
        if not part:
            part, weight = rows[:1], 0
        batch = collate(part, pad_id).to(device)
        total[0] += weight * model.loss(batch.input_ids, batch.labels, position_ids=batch.position_ids,
                                        packed=batch.position_ids is not None, reduction="sum").double()
        total[1] += weight * batch.num_targets
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def sample_answer(model: Phi3ForCausalLM, tokenizer: Any, template: ChatTemplate, config: dict[str, Any],
                  device: torch.device) -> str:
    """Greedy answer to `sample_prompt` (KV cache; stops on Phi-3's stop tokens)."""
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": config["sample_prompt"]}], template)
    ids = torch.tensor([prompt], device=device)
    with root_unsharded(model):  # under FSDP every rank decodes the same answer
        out = generate(model, ids, max_new_tokens=config["sample_max_new_tokens"],
                       stop_token_ids=stop_token_ids(tokenizer))
    model.train()
    return tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------------------
# Schedule: linear warmup to the peak, then cosine (or linear, or constant) decay to 0.
# ---------------------------------------------------------------------------------------------------------------
def make_schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor of step s: `(s + 1) / warmup` in the warmup, then e.g. `0.5 (1 + cos(pi p))`.

    `p = (s - warmup) / (total - warmup)` is the progress through the decay.
    """
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress if kind == "linear" else 1.0

    return factor


# ---------------------------------------------------------------------------------------------------------------
# Output directory. Nothing there is deleted before this run has written something complete that replaces it:
# - output_dir new or empty, or the run being resumed: written in place. Later metrics lines and checkpoints
#   of an earlier trajectory (resuming step 20 of a finished 40-step run) stay until this run writes the same
#   step or completes;
# - output_dir holding another run (the default one, or an explicit one with --overwrite-output-dir): this run
#   writes a sibling OUTPUT_DIR.next-XXXX and, once complete, takes output_dir's place in one rename; the old
#   run is deleted only then. An interrupted one stays there, to --resume.
# Every file and directory is written with lora.atomic (temporary sibling, fsync, rename): all or nothing.
# ---------------------------------------------------------------------------------------------------------------
def write_config(path: Path, config: dict[str, Any]) -> None:
    """train_config.json: every setting of the run, as `--resume` reads them back."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def holds_a_run(path: Path) -> bool:
    """True if `path` has what this script writes (train_config.json, metrics.jsonl or checkpoints/)."""
    return any((path / name).exists() for name in ("train_config.json", "metrics.jsonl", "checkpoints"))


def is_replacement_of(path: Path, out: Path) -> bool:
    """True if `path` is an `out.next-XXXX` directory: a run that replaces `out` when it completes."""
    return path.parent.resolve() == out.parent.resolve() and path.name.startswith(f"{out.name}.next-")


def plan_output(out: Path, run: RunOptions) -> Path | None:
    """The directory this run writes in place, or None: a new `out.next-XXXX` that replaces `out` at the end."""
    if run.checkpoint is not None and run.checkpoint.parent.name == "checkpoints":
        source = run.checkpoint.parent.parent
        if source.resolve() == out.resolve() or is_replacement_of(source, out):
            return source
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if not out.is_dir() or not holds_a_run(out):
        raise ValueError(f"--output-dir {out}: exists and is not the directory of a training run; choose another")
    if run.output_dir_given and not run.overwrite_output_dir:
        raise ValueError(f"--output-dir {out} holds another run: continue it with --resume {out}, replace it "
                         "with --overwrite-output-dir (it is deleted only once this run has completed), or "
                         "choose another directory")
    return None


def data_identity(path: str) -> dict[str, Any]:
    """Size and SHA-256 of the training data file, stored in each checkpoint to notice a changed file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def save_checkpoint(path: Path, step: int, total_steps: int, model: Phi3ForCausalLM,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    config: dict[str, Any], data: dict[str, Any], rank: int = 0) -> None:
    """Adapter (our format), optimizer, scheduler, RNG states, step, plan, data identity and config at `path`;
    the directory is replaced as a whole (lora.atomic.atomic_directory).

    Under FSDP every rank calls it: the adapters and the optimizer state are gathered whole (the optimizer's
    keyed by parameter name, torch.distributed.checkpoint's full state dict; resuming is tested with the same
    world size) and rank 0 writes.
    """
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if config["fsdp"]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(model, optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optimizer_state = optimizer.state_dict()
    state = {"step": step, "total_steps": total_steps, "optimizer": optimizer_state,
             "scheduler": scheduler.state_dict(), "rng": rng, "data": data}
    if rank != 0:  # FSDP: the adapters' gather; rank 0 writes
        lora.save_adapter(model, path / "adapter.safetensors")
        return
    with atomic_directory(path) as tmp:
        lora.save_adapter(model, tmp / "adapter.safetensors")
        torch.save(state, tmp / "trainer_state.pt")
        write_config(tmp / "train_config.json", config)


def prune_checkpoints(ours: list[Path], limit: int, keep: Path | None) -> list[Path]:
    """Delete the oldest of this run's checkpoints beyond `limit`, never `keep` (the last good one)."""
    ours = sorted(set(ours))
    for old in ours[:-limit]:
        if old != keep:
            shutil.rmtree(old)
            ours.remove(old)
    return ours


def load_checkpoint(path: Path, model: Phi3ForCausalLM, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, *, sharded: bool) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote (no pickle: `weights_only=True`); returns the trainer state.

    `sharded` (FSDP): every rank reads the whole files and keeps its slice of the adapters and optimizer state.
    """
    lora.load_adapter(model, path / "adapter.safetensors")
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors for a damaged file
        raise ValueError(f"--resume {path / 'trainer_state.pt'}: cannot be read (truncated or corrupt?): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise ValueError(f"--resume {path / 'trainer_state.pt'}: not a trainer state written by this script")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


class Metrics:
    """metrics.jsonl, one JSON record a line (`{"step": 40, "loss": 1.93, ...}`), rewritten atomically at each
    record: this run's records, then an earlier run's records past the current step, which stay until this
    run passes them (`finish` drops those left)."""

    def __init__(self, path: Path, start: int) -> None:
        records = []
        for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: not a JSON record; it will not be kept", path, number)
        self.path = path
        self.records = [r for r in records if r.get("step", 0) <= start]
        self.later = [r for r in records if r.get("step", 0) > start]

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.later = [r for r in self.later if r["step"] > record["step"]]
        self.save()

    def finish(self) -> None:
        self.later = []
        self.save()

    def save(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in [*self.records, *self.later])
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def plot_losses(metrics: Path, png: Path) -> bool:
    """Train and eval loss against step, when matplotlib is installed; True if the PNG was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train, strict=True), label="train")
    ax.plot(*zip(*evals, strict=True), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


# ---------------------------------------------------------------------------------------------------------------
# Main: setup, data, eval before, the loop, eval after, outputs.
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Train; 0 on success, 1 when the loss became non-finite (bad input raises before training)."""
    config, run = resolve_config(argv)
    check_config(config)
    checkpoint = run.checkpoint
    out = Path(config["output_dir"])
    in_place = plan_output(out, run)  # before anything is loaded: a refused output_dir fails fast
    rank, world, device = setup_distributed(config["device"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s" if world > 1
                        else "%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    torch.manual_seed(config["seed"])

    # Model and tokenizer; everything is checked before the first step.
    model_dir = Path(config["model"]) if config["model"] else embedded_model_dir()
    if config["fsdp"]:
        model, summary = load_sharded_model(model_dir, config, device)
    else:
        model = load_model(model_dir, config, device)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"--model {model_dir}: tokenizer has {tokenizer.vocab_size} ids, the model "
                         f"{model.config.vocab_size} rows; not the model's tokenizer")
    template = (template_from_checkpoint(model_dir) if config["chat_template"] == "auto"
                else TEMPLATES[config["chat_template"]])
    # Recipe: pad with <unk>, not <|endoftext|>, so padding never looks like a stop token.
    pad_id = tokenizer.token_to_id("<unk>")
    if pad_id is None or pad_id in stop_token_ids(tokenizer):
        raise ValueError(f"--model {model_dir}: the tokenizer has no <unk> to pad with, distinct from the stop tokens")
    log.info("model %s (%s, %s), tokenizer %d ids, chat template %s, %d process(es) on %s%s", model_dir,
             "embedded" if config["model"] is None else "checkpoint", model.lm_head.weight.dtype,
             tokenizer.vocab_size, template.name, world, device, ", sharded with FSDP2" if config["fsdp"] else "")

    train_rows = load_rows(config["data"], tokenizer, template, config, "train")
    eval_rows = load_rows(config["eval_data"], tokenizer, template, config, "eval")
    if config["packing"]:
        train_rows = pack_examples(train_rows, config["max_seq_length"])
        log.info("packed into %d rows of at most %d tokens", len(train_rows), config["max_seq_length"])
    per_rank = config["per_device_train_batch_size"] * config["gradient_accumulation_steps"]
    global_batch = per_rank * world
    steps_per_epoch = len(train_rows) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{config['data']}: {len(train_rows)} rows are fewer than one global batch of "
                         f"{global_batch} (batch x accumulation x processes)")
    total_steps = (config["max_steps"] if config["max_steps"] > 0
                   else math.ceil(config["num_train_epochs"] * steps_per_epoch))
    if not config["fsdp"]:
        summary = patch_model(model, config)
    log.info("LoRA:\n%s", summary)
    model.gradient_checkpointing = config["gradient_checkpointing"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused: one kernel per step instead of a dozen passes over the adapters and their temporaries (as
    # transformers' Trainer defaults to); FSDP's sharded parameters keep the foreach implementation.
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=config["weight_decay"],
                                  fused=not config["fsdp"])
    warmup = math.ceil(config["warmup_ratio"] * total_steps)
    schedule = make_schedule(config["lr_scheduler_type"], warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data = data_identity(config["data"]) if rank == 0 else {}
    start = 0
    if checkpoint:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, sharded=config["fsdp"])
        start = state["step"]
        if start >= total_steps:
            raise ValueError(f"--resume {checkpoint}: already at step {start} of {total_steps}; a larger "
                             "--max-steps extends the run")
        if rank == 0 and state.get("data", data) != data:
            log.warning("--resume: %s changed since %s was saved (size %s -> %s bytes, SHA-256 %s... -> %s...); "
                        "the run continues by row index, so it is not the continuation of the saved one",
                        config["data"], checkpoint, state["data"].get("size"), data["size"],
                        str(state["data"].get("sha256"))[:12], data["sha256"][:12])
        planned = state.get("total_steps", total_steps)
        if planned != total_steps:
            # Re-plan: the schedule of a run of total_steps, continued from this step.
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * schedule(start)
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            log.info("schedule re-planned for %d steps (the checkpoint's run planned %d): warmup %d, "
                     "%s decay; lr %.3g at step %d", total_steps, planned, warmup, config["lr_scheduler_type"],
                     optimizer.param_groups[0]["lr"], start + 1)
    trainer: nn.Module = SummedLoss(model)
    if world > 1 and not config["fsdp"]:
        trainer = DistributedDataParallel(trainer, device_ids=[device] if device.type == "cuda" else None)

    work = in_place or out  # where this run writes; only rank 0 writes
    if rank == 0:
        if in_place is None:
            out.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f"{out.name}.next-", dir=out.parent))
            work.chmod(0o755)
            log.info("%s holds an earlier run: this run writes %s, which replaces it once complete (until then "
                     "the earlier run stays; if this run is interrupted, --resume %s continues it)", out, work, work)
        for unfinished in sorted(out.parent.glob(f"{out.name}.next-*")):
            if unfinished.resolve() != work.resolve():
                log.warning("%s: an interrupted run that was to replace %s (--resume it, or delete it)",
                            unfinished, out)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "train_config.json").exists():  # a resumed run's settings are written once it completes
            write_config(work / "train_config.json", config)
    metrics = Metrics(work / "metrics.jsonl", start)
    ours = [p for p in (work / "checkpoints").glob("step-*") if int(p.name.removeprefix("step-")) <= start]
    log.info("%d steps (%d per epoch), global batch %d, warmup %d, lr %.3g %s; %s", total_steps, steps_per_epoch,
             global_batch, warmup, config["learning_rate"], config["lr_scheduler_type"],
             f"resuming after step {start} from {checkpoint}" if checkpoint else "from scratch")

    # Eval before training (its RNG use is forked off, so it never changes the training stream).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loss_before = evaluate(model, eval_rows, config, pad_id, device, rank, world)
        sample_before = sample_answer(model, tokenizer, template, config, device) if rank == 0 or config["fsdp"] else ""
    unigram = unigram_loss(train_rows, eval_rows, tokenizer.vocab_size)
    log.info("eval loss %.4f (perplexity %.2f); unigram loss of assistant tokens %.4f; sample: %r",
             loss_before, math.exp(loss_before), unigram, sample_before)
    if rank == 0 and not checkpoint:
        metrics.write({"step": 0, "eval_loss": loss_before, "eval_ppl": math.exp(loss_before),
                       "sample": sample_before})

    bar = None
    if config["progress"] and rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)
        except ImportError:
            log.info("tqdm is not installed: progress as log lines (pip install 'purelora[progress]')")
    # A checkpoint is good once a loss computed with its weights was finite: an eval at the step it was saved,
    # or the next step's training loss (`pending` until then). At lr 1e30 a step can leave finite but exploded
    # weights; the loss of the step after shows it.
    last_good = checkpoint if math.isfinite(loss_before) else None
    pending = None
    loss_after = loss_before
    t_start, tokens_seen = time.perf_counter(), 0
    try:
        for step in range(start, total_steps):
            # The global batch of this step; this rank's share, split into micro-batches.
            indices = step_indices(len(train_rows), step=step, global_batch=global_batch, seed=config["seed"])
            mine = indices[rank * per_rank : (rank + 1) * per_rank]
            size = config["per_device_train_batch_size"]
            micro = [collate([train_rows[i] for i in mine[k : k + size]], pad_id) for k in range(0, per_rank, size)]
            # Normalise by the global count of target tokens: every token weighs the same whatever the
            # micro-batch, the rank or the padding; DDP averages over ranks, hence the factor `world`.
            counts = torch.tensor([sum(b.num_targets for b in micro), sum(len(train_rows[i].input_ids) for i in mine)],
                                  dtype=torch.float64, device=device)  # (target tokens, real tokens)
            if world > 1:
                dist.all_reduce(counts)
            scale = world / max(float(counts[0]), 1.0)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for k, batch in enumerate(micro):
                batch = batch.to(device)
                sync = k == len(micro) - 1 or world == 1
                if config["fsdp"]:  # FSDP2 reduce-scatters the gradients of the last micro-batch only
                    model.set_requires_gradient_sync(sync)
                with nullcontext() if sync or config["fsdp"] else trainer.no_sync():
                    loss = trainer(batch.input_ids, batch.labels, batch.position_ids)
                    (loss * scale).backward()
                step_loss += loss.detach().double()
            if world > 1:
                dist.all_reduce(step_loss)
            step_loss = float(step_loss) / max(float(counts[0]), 1.0)
            grad_norm = (full_tensor(torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"]))
                         if config["max_grad_norm"] > 0 else torch.zeros(()))
            if not math.isfinite(step_loss) or not math.isfinite(float(grad_norm)):
                raise NonFiniteLoss(f"step {step + 1}: loss {step_loss}, gradient norm {float(grad_norm)}")
            last_good, pending = pending or last_good, None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            done = step + 1
            tokens_seen += int(counts[1])
            rate = tokens_seen / (time.perf_counter() - t_start)
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                bar.update()
            if rank == 0 and (done % config["logging_steps"] == 0 or done == total_steps):
                eta = (total_steps - done) * (time.perf_counter() - t_start) / (done - start)
                if bar is None:
                    log.info("step %d/%d | loss %.4f | lr %.3g | %s tok/s | eta %.0fs", done, total_steps,
                             step_loss, lr, f"{rate:,.0f}", eta)
                metrics.write({"step": done, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                               "tokens_per_s": rate})
            evaluated = done % config["eval_steps"] == 0 or done == total_steps
            if evaluated:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    loss_after = evaluate(model, eval_rows, config, pad_id, device, rank, world)
                    sample = (sample_answer(model, tokenizer, template, config, device)
                              if rank == 0 or config["fsdp"] else "")
                if not math.isfinite(loss_after):
                    raise NonFiniteLoss(f"step {done}: eval loss {loss_after}")
                log.info("step %d: eval loss %.4f (perplexity %.2f); sample: %r", done, loss_after,
                         math.exp(loss_after), sample)
                if rank == 0:
                    metrics.write({"step": done, "eval_loss": loss_after, "eval_ppl": math.exp(loss_after),
                                   "sample": sample})
            if (rank == 0 or config["fsdp"]) and (done % config["save_steps"] == 0 or done == total_steps):
                saved = work / "checkpoints" / f"step-{done:06d}"
                save_checkpoint(saved, done, total_steps, model, optimizer, scheduler, config, data, rank)
                last_good, pending = (saved, None) if evaluated else (last_good, saved)
                ours = prune_checkpoints([*ours, saved], config["save_total_limit"], keep=last_good)
    except NonFiniteLoss as err:
        if bar is not None:
            bar.close()
        log.error("non-finite loss, stopping before the optimizer step: %s. Nothing was written for this step; "
                  "the last good checkpoint (one whose weights gave a finite loss) is %s", err,
                  last_good or "none (no checkpoint had been saved yet)")
        if pending is not None:
            log.error("%s was saved but is not good: the loss computed with its weights is non-finite", pending)
        return 1
    if bar is not None:
        bar.close()

    if world > 1:
        check_replicas_agree(model, rank, world)
    if rank != 0 and config["fsdp"]:  # take part in gathering the adapters that rank 0 writes
        lora.save_adapter(model, work / "adapter.safetensors")
        save_peft_adapter(model, work / "adapter-peft")
    if rank == 0:
        written = write_outputs(work, model, model_dir, config, metrics, last_good)
        write_config(work / "train_config.json", config)
        # Now complete: what is left of an earlier trajectory goes, and a replacement takes output_dir's place.
        metrics.finish()
        for stale in sorted((work / "checkpoints").glob("step-*")):
            if stale not in ours:
                shutil.rmtree(stale)
                log.info("removed %s, left from an earlier run this one replaces", stale)
        if is_replacement_of(work, out):
            replace_directory(work, out)
            log.info("replaced %s with this run (%s)", out, work.name)
        log.info("before training: eval loss %.4f, sample %r", loss_before, sample_before)
        log.info("after training:  eval loss %.4f, sample %r", loss_after, sample)
        log.info("unigram model of the assistant tokens (reference): loss %.4f", unigram)
        final = out if is_replacement_of(work, out) else work
        for label, relative, note in written:
            log.info("wrote %-20s%s%s", label + ":", (final / relative).resolve() if relative else "none", note)
        change = 100.0 * (loss_after - loss_before) / loss_before
        print(f"eval loss: {loss_before:.4f} -> {loss_after:.4f} ({change:+.1f}%)", flush=True)
    if world > 1:
        dist.barrier()  # the other ranks wait for rank 0's writes: no process group torn down under it
        # DDP's reducer holds the process group; freed after it, its C++ side can abort the process at exit
        del trainer
        gc.collect()
        dist.destroy_process_group()
    return 0


def check_replicas_agree(model: Phi3ForCausalLM, rank: int, world: int) -> None:
    """Raise unless every rank holds rank 0's adapters bit for bit (DDP keeps them in step)."""
    for name, tensor in lora.lora_state_dict(model).items():
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, tensor):
            raise RuntimeError(f"rank {rank}: adapter {name} differs from rank 0's")
    # INFO on rank 0 (its level); the other ranks log at WARNING only, so theirs is a warning to be seen.
    (log.info if rank == 0 else log.warning)("rank %d of %d: adapters identical to rank 0's", rank, world)


def write_outputs(work: Path, model: Phi3ForCausalLM, model_dir: Path, config: dict[str, Any], metrics: Metrics,
                  checkpoint: Path | None) -> list[tuple[str, Path | None, str]]:
    """The final adapter in our format and PEFT's, the loss plot, the merged model (each replaced as a whole);
    (what, path relative to `work`, note) for each. Under FSDP the merge is of the adapter file just written
    into the base loaded whole in this process (rank 0), not of a gathered model."""
    lora.save_adapter(model, work / "adapter.safetensors")
    save_peft_adapter(model, work / "adapter-peft")
    if checkpoint is not None and checkpoint.resolve().is_relative_to(work.resolve()):
        checkpoint = checkpoint.resolve().relative_to(work.resolve())
    written = [("adapter (ours)", Path("adapter.safetensors"), ""), ("adapter (PEFT)", Path("adapter-peft"), ""),
               ("last checkpoint", checkpoint, ""), ("metrics", Path("metrics.jsonl"), ""),
               ("config", Path("train_config.json"), "")]
    if plot_losses(metrics.path, work / "loss.png"):
        written.append(("loss curve", Path("loss.png"), ""))
    if config["merge"]:
        # merge_and_save copies the base's tokenizer files (byte_tokenizer.json for the embedded model).
        if config["fsdp"]:
            model = load_model(model_dir, config, torch.device("cpu"))
            patch_model(model, config)
            lora.load_adapter(model, work / "adapter.safetensors")
        difference = merge_and_save(model, work / "merged", overwrite=True)
        written.append(("merged checkpoint", Path("merged"), f" (max |logit difference| {difference:.1e})"))
    return written


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
