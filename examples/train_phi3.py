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
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lora
from lora.atomic import atomic_directory
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
from lora.phi3.chat import TEMPLATES, ChatTemplate, encode_prompt, stop_token_ids, template_from_checkpoint
from lora.phi3.data import (
    Example,
    collate,
    encode_conversations,
    pack_examples,
    read_conversations,
    step_indices,
    unigram_loss,
)
from lora.phi3.fsdp import from_pretrained_sharded, root_unsharded
from lora.phi3.patch import PatchSummary
from lora.phi3.run_directory import (
    RunDirectory,
    data_identity,
    latest_checkpoint,
    load_checkpoint,
    plot_losses,
    save_checkpoint,
)
from lora.phi3.schedule import SCHEDULES, make_schedule, replan
from lora.phi3.settings import Setting, Settings, check_device
from lora.phi3.tokenizer import ByteTokenizer, load_tokenizer
from lora.quant import require_bitsandbytes
from lora.sharding import full_tensor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("train_phi3")

# ---------------------------------------------------------------------------------------------------------------
# Config. Defaults are Microsoft's recipe for LoRA on Phi-3-mini (sample_finetune.py in the model repos):
# lr 5e-6, cosine, warmup 0.2, 1 epoch, batch 4, gradient checkpointing, r 16, alpha 32, dropout 0.05,
# all linear projections, 2048 tokens, bf16 weights. Every setting is a command-line option (`--learning-rate`)
# and may be set in a JSON or TOML file (`--config FILE`); precedence: command line > file > defaults.
# `resumable` ones may change on --resume: where things go and how they are shown, not what is computed; and the
# length of the run (a larger --max-steps extends a finished run, the schedule re-planned for the new total).
# ---------------------------------------------------------------------------------------------------------------
EMBEDDED_DIR = ROOT / "runs" / "tiny-phi3-v2"
S, PEFT = Setting, "peft_config"
SETTINGS = Settings([
    S("model", None, "Phi-3 checkpoint directory (config.json, safetensors, tokenizer.json); default: the embedded "
      f"tiny model, built on first use in {EMBEDDED_DIR}"),
    S("data", str(HERE / "data" / "train.jsonl"),
      "training conversations, JSONL: one {\"messages\": [{\"role\": ..., \"content\": ...}]} per line"),
    S("eval_data", str(HERE / "data" / "eval.jsonl"), "evaluation conversations, same format"),
    S("output_dir", "runs/phi3-lora", "where metrics, checkpoints and adapters are written", resumable=True),
    S("dtype", "auto", "base weight dtype: auto (the checkpoint's), float32, bfloat16, float16; adapters stay "
      "float32", choices=("auto", "float32", "bfloat16", "float16")),
    S("device", "auto", "auto (cuda if available), cpu, cuda, or cuda:N", resumable=True),
    S("seed", 0, "seed of the adapters' init, data order and dropout"),
    S("learning_rate", 5.0e-6, "peak AdamW learning rate", bounds="positive"),
    S("lr_scheduler_type", "cosine", "cosine, linear or constant decay after the warmup", choices=SCHEDULES),
    S("warmup_ratio", 0.2, "fraction of the steps with a linear warmup", bounds="fraction"),
    S("weight_decay", 0.0, "AdamW weight decay on the adapters", bounds="non-negative"),
    S("max_grad_norm", 1.0, "clip the adapters' gradient norm to this (0: no clipping)", bounds="non-negative"),
    S("num_train_epochs", 1.0, "passes over the data (when max_steps is -1)", resumable=True),
    S("max_steps", -1, "optimizer steps to run; -1: num_train_epochs passes", resumable=True),
    S("per_device_train_batch_size", 4, "conversations (or packed rows) per micro-batch and process",
      bounds="positive"),
    S("per_device_eval_batch_size", 4, "conversations per evaluation batch", bounds="positive"),
    S("gradient_accumulation_steps", 1, "micro-batches per optimizer step", bounds="positive"),
    S("gradient_checkpointing", True, "recompute each decoder layer in backward (less memory, ~1/3 more compute)"),
    S("max_seq_length", 2048, "longest conversation in tokens (and the packed row length)", bounds="positive"),
    S("truncation", "truncate", "longer conversations: truncate (keep the start) or drop",
      choices=("truncate", "drop")),
    S("packing", False, "pack conversations into max_seq_length rows, attention kept within each conversation"),
    S("chat_template", "auto", "auto (from the checkpoint's tokenizer_config.json; the current Phi-3 one if none) "
      "or " + ", ".join(TEMPLATES), choices=("auto", *TEMPLATES)),
    S("logging_steps", 20, "log (and write metrics.jsonl) every N steps", bounds="positive", resumable=True),
    S("eval_steps", 100, "evaluate and generate a sample every N steps and at the end", bounds="positive",
      resumable=True),
    S("save_steps", 100, "checkpoint every N steps and at the end", bounds="positive", resumable=True),
    S("save_total_limit", 1, "checkpoints to keep (older ones are removed)", bounds="positive", resumable=True),
    S("sample_prompt", "What is 17 + 25?", "user message of the sample generation", resumable=True),
    S("sample_max_new_tokens", 64, "length limit of the sample generation", bounds="non-negative", resumable=True),
    S("merge", False, "also write a merged checkpoint (base + adapters) to output_dir/merged", resumable=True),
    S("progress", True, "show a tqdm progress bar (when tqdm is installed); else log lines", resumable=True),
    S("fsdp", False, "under torchrun: shard the base and the adapters across the processes with FSDP2 (each holds "
      "1/N) instead of replicating them with DDP"),
    # QLoRA (transformers' BitsAndBytesConfig names; defaults as lora.phi3.from_pretrained's)
    S("load_in_4bit", False, "QLoRA: store the four projections of every layer in 4 bits (bitsandbytes, pip install "
      "'purelora[qlora]'); they dequantize to --dtype, which embeddings, norms and lm_head keep. On a GPU pass "
      "--device cuda (bitsandbytes' CUDA kernels); not with --fsdp or --use-dora"),
    S("bnb_4bit_quant_type", "nf4", "4-bit data type with --load-in-4bit: nf4 (NormalFloat, QLoRA's) or fp4",
      choices=("nf4", "fp4")),
    S("bnb_4bit_use_double_quant", True, "with --load-in-4bit, quantize the per-block scales too (0.127 bits per "
      "weight instead of 0.5; the QLoRA notebooks set it)"),
    # --lora-r: torchrun would read `--r` as its own `--rdzv-*`
    S("r", 16, "LoRA rank", group=PEFT, bounds="positive", flag="--lora-r"),
    S("lora_alpha", 32, "LoRA alpha: the update is (alpha / r) * B @ A", group=PEFT, bounds="positive"),
    S("lora_dropout", 0.05, "dropout on the adapters' input", group=PEFT, bounds="fraction"),
    S("target_modules", "all-linear", "all-linear, or names among qkv_proj, o_proj, gate_up_proj, down_proj, q, k, "
      "v, gate, up", group=PEFT, many=True),
    S("use_rslora", False, "scale by alpha / sqrt(r) instead of alpha / r", group=PEFT),
    S("use_dora", False, "DoRA: a trainable magnitude per adapted row on top of LoRA (docs/layers.md)", group=PEFT),
], fixed={"bias": "none", "task_type": "CAUSAL_LM"})  # PEFT recipe keys with the one value possible here
training_config, peft_config = SETTINGS.defaults("training_config"), SETTINGS.defaults(PEFT)

# The embedded model is random, not pretrained: LoRA alone must carry everything it learns, in about a minute
# of CPU. So: rank 32 over all four projections (a fifth of the parameters, enough to learn the templates),
# alpha = r (scaling 1), and a learning rate 600x the recipe's (which is tuned to nudge a pretrained 3.8B
# model), warmup 5%, eight epochs of batch 8 (480 steps). No dropout (the eval set follows the same
# templates; nothing to regularise) and no gradient checkpointing (memory is no issue at this size, and
# recomputing would cost a third more time). Measured on 2 idle CPU cores: about 50 s, eval loss 7.09 ->
# about 0.8, far below the 3.36 of a unigram model; a busy machine can take several times longer.
EMBEDDED_OVERRIDES: dict[str, Any] = {
    "dtype": "float32", "learning_rate": 3.0e-3, "warmup_ratio": 0.05, "num_train_epochs": 8.0,
    "per_device_train_batch_size": 8, "per_device_eval_batch_size": 32, "gradient_checkpointing": False,
    "max_seq_length": 512, "logging_steps": 40, "eval_steps": 160, "save_steps": 240,
    "sample_prompt": "What is the capital of Italy?", "sample_max_new_tokens": 40,
    "r": 32, "lora_alpha": 32, "lora_dropout": 0.0,
}
# The tiny model: Phi-3's architecture at small widths (2 layers, hidden 128) over the 264-id byte tokenizer.
EMBEDDED_MODEL = {
    "vocab_size": 264, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    "original_max_position_embeddings": 1024, "bos_token_id": 257, "eos_token_id": [259, 260, 262],
    "pad_token_id": 256,
}
EMBEDDED_SEED = 1234


@dataclass
class RunOptions:
    """What this invocation asked for beyond the settings: where from, and whether it may replace a run."""

    checkpoint: Path | None = None
    output_dir_given: bool = False
    overwrite_output_dir: bool = False


def build_parser() -> argparse.ArgumentParser:
    """An option per setting, plus --config, --resume and --overwrite-output-dir."""
    parser = SETTINGS.parser(__doc__.split("\n\n")[0], notes={"embedded model": EMBEDDED_OVERRIDES})
    parser.add_argument("--config", help="JSON or TOML file of settings (flat, or [training_config] and "
                                         "[peft_config] tables)")
    parser.add_argument("--resume", help="checkpoint directory (or an output_dir: its latest checkpoint) to "
                                         "continue from, with its settings")
    parser.add_argument("--overwrite-output-dir", "--overwrite_output_dir", action="store_true",
                        help="let an explicit --output-dir that holds another run be replaced (only once this "
                             "run has completed; until then the old run stays)")
    return parser


def resolve_config(argv: list[str] | None) -> tuple[argparse.Namespace, RunOptions]:
    """Defaults < (embedded overrides) < config file < command line; on --resume the checkpoint's settings."""
    args = vars(build_parser().parse_args(argv))
    config_file, resume = args.pop("config", None), args.pop("resume", None)
    run = RunOptions(overwrite_output_dir=args.pop("overwrite_output_dir", False))
    given = {**(SETTINGS.read_file(config_file) if config_file else {}), **args}
    run.output_dir_given = "output_dir" in given
    if resume is not None:
        run.checkpoint = latest_checkpoint(Path(resume))
        return argparse.Namespace(**SETTINGS.resumed(run.checkpoint, given)), run
    embedded = EMBEDDED_OVERRIDES if given.get("model") is None else {}
    return argparse.Namespace(**{**SETTINGS.defaults(), **embedded, **given}), run


def check_config(c: argparse.Namespace) -> None:
    """Every value in range and no two that contradict each other: a ValueError naming the options."""
    SETTINGS.check_values(vars(c))
    if c.max_steps == 0 or c.max_steps < -1:
        raise ValueError(f"--max-steps must be positive, or -1 to use --num-train-epochs; got {c.max_steps}")
    if c.max_steps == -1 and c.num_train_epochs <= 0:
        raise ValueError("--max-steps -1 trains for --num-train-epochs, which must then be positive, "
                         f"got {c.num_train_epochs}")
    check_device(c.device)
    if c.fsdp and c.use_dora:
        raise ValueError("--fsdp with --use-dora is not supported: DoRA starts its magnitude from each whole row of "
                         "the base weight, which a sharded load never holds; train DoRA with DDP (torchrun without "
                         "--fsdp)")
    if c.load_in_4bit and c.fsdp:
        raise ValueError("--load-in-4bit with --fsdp is not supported: FSDP2 shards each parameter along its rows, "
                         "which a packed 4-bit weight and its block scales do not allow; train QLoRA with DDP "
                         "(torchrun without --fsdp)")
    if c.load_in_4bit and c.use_dora:
        raise ValueError("--load-in-4bit with --use-dora is not supported: DoRA needs the row norms of the "
                         "dequantized weight at every step; use plain LoRA on a 4-bit base, or DoRA on a bf16 one")
    if c.load_in_4bit:
        require_bitsandbytes()  # an ImportError naming the qlora extra, before anything is loaded
    if c.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards the model across processes: run the script under torchrun with two or more "
                         "(torchrun --nproc_per_node N examples/train_phi3.py ... --fsdp)")
    if Path(c.output_dir).resolve() == Path(c.model or EMBEDDED_DIR).resolve():
        raise ValueError("--output-dir must differ from --model: the base checkpoint would be overwritten")


# ---------------------------------------------------------------------------------------------------------------
# Setup: processes, device, model, tokenizer.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Processes:
    """This process's place: `rank` of `world`, its `device`, and whether the model is `sharded` (FSDP2)."""

    rank: int
    world: int
    device: torch.device
    sharded: bool

    @property
    def rng_devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []


def setup_distributed(device_name: str, sharded: bool) -> Processes:
    """Under torchrun (WORLD_SIZE > 1) joins the process group first; logging shows the rank then."""
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
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s" if world > 1
                        else "%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
    return Processes(rank, world, device, sharded)


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


def load_model(path: Path, c: argparse.Namespace, device: torch.device) -> Phi3ForCausalLM:
    """`from_pretrained` (4-bit with --load-in-4bit), with errors that say what a Phi-3 directory is."""
    if not path.is_dir():
        raise ValueError(f"--model {path}: not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json; expected a Phi-3 checkpoint directory")
    try:
        return from_pretrained(path, dtype=None if c.dtype == "auto" else c.dtype, device=device,
                               quantize=c.bnb_4bit_quant_type if c.load_in_4bit else None,
                               double_quant=c.bnb_4bit_use_double_quant)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--model {path}: not a loadable Phi-3 checkpoint: {err}") from err


def patch_model(model: Phi3ForCausalLM, c: argparse.Namespace) -> PatchSummary:
    """LoRA on the configured targets (`all-linear`: the four projections); only the adapters train."""
    targets = DEFAULT_TARGETS if c.target_modules in ("all-linear", ["all-linear"]) else tuple(c.target_modules)
    return patch(model, r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, targets=targets,
                 use_rslora=c.use_rslora, use_dora=c.use_dora)


def load_patched_model(path: Path, c: argparse.Namespace, device: torch.device) -> tuple[Phi3ForCausalLM, PatchSummary]:
    """The base with its adapters; with --fsdp sharded, each rank reading only its rows (lora.phi3.fsdp)."""
    if not c.fsdp:
        model = load_model(path, c, device)
        return model, patch_model(model, c)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json; expected a Phi-3 checkpoint directory")
    summary = []  # errors name the file or the layer at fault
    model = from_pretrained_sharded(path, dtype=None if c.dtype == "auto" else c.dtype, device=device,
                                    prepare=lambda m: summary.append(patch_model(m, c)))
    return model, summary[0]


def load_chat_tokenizer(path: Path, vocab_size: int, template_name: str) -> tuple[Any, ChatTemplate, int]:
    """`(tokenizer, chat template, pad id)` of the checkpoint, checked against the model's vocabulary."""
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"--model {path}: tokenizer has {tokenizer.vocab_size} ids, the model {vocab_size} rows; "
                         "not the model's tokenizer")
    template = template_from_checkpoint(path) if template_name == "auto" else TEMPLATES[template_name]
    # Recipe: pad with <unk>, not <|endoftext|>, so padding never looks like a stop token.
    pad_id = tokenizer.token_to_id("<unk>")
    if pad_id is None or pad_id in stop_token_ids(tokenizer):
        raise ValueError(f"--model {path}: the tokenizer has no <unk> to pad with, distinct from the stop tokens")
    return tokenizer, template, pad_id


# ---------------------------------------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------------------------------------
def load_rows(path: str, tokenizer: Any, template: ChatTemplate, max_length: int, policy: str,
              name: str) -> list[Example]:
    """Read, check and tokenise a JSONL file; log what the length policy did."""
    examples, stats = encode_conversations(read_conversations(path), tokenizer, template, max_length=max_length,
                                           policy=policy)
    log.info("%s (%s): %s (max %d tokens)", name, path, stats, max_length)
    if stats.dropped:
        log.warning("%s: dropped lines %s%s", name, stats.dropped_lines[:10], " ..." if stats.dropped > 10 else "")
    if not examples:
        raise ValueError(f"{path}: no conversation left after the length policy ({stats})")
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Eval: loss over the eval set, a greedy sample from a fixed prompt.
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """The eval set and the sample prompt: `evaluation(model, procs)` is `(eval loss, sample answer)`."""

    rows: list[Example]
    batch_size: int
    pad_id: int
    tokenizer: Any
    template: ChatTemplate
    prompt: str
    max_new_tokens: int

    def __call__(self, model: Phi3ForCausalLM, procs: Processes) -> tuple[float, str]:
        with torch.random.fork_rng(devices=procs.rng_devices):  # the training stream never changes
            loss = self.loss(model, procs)
            sample = self.sample(model, procs.device) if procs.rank == 0 or procs.sharded else ""
        model.train()
        return loss, sample

    @torch.no_grad()
    def loss(self, model: Phi3ForCausalLM, procs: Processes) -> float:
        """Mean loss over every assistant token of the eval set (each rank a shard, summed across ranks).

        Sharded (FSDP), every forward is collective, so each rank runs as many batches as rank 0 (whose shard
        is the largest); a rank out of rows runs its first row again and does not count it.
        """
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=procs.device)  # (loss sum, token count)
        shard, size = self.rows[procs.rank :: procs.world], self.batch_size
        for k in range(math.ceil(len(self.rows[0 :: procs.world] if procs.sharded else shard) / size)):
            part, weight = shard[k * size : (k + 1) * size], 1
            if not part:
                part, weight = self.rows[:1], 0
            batch = collate(part, self.pad_id).to(procs.device)
            total[0] += weight * model.loss(batch.input_ids, batch.labels, position_ids=batch.position_ids,
                                            packed=batch.position_ids is not None, reduction="sum").double()
            total[1] += weight * batch.num_targets
        if procs.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def sample(self, model: Phi3ForCausalLM, device: torch.device) -> str:
        """Greedy answer to the prompt (KV cache; stops on Phi-3's stop tokens)."""
        ids = encode_prompt(self.tokenizer, [{"role": "user", "content": self.prompt}], self.template)
        with root_unsharded(model):  # under FSDP every rank decodes the same answer
            out = generate(model, torch.tensor([ids], device=device), max_new_tokens=self.max_new_tokens,
                           stop_token_ids=stop_token_ids(self.tokenizer))
        return self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


def evaluate_and_log(step: int, evaluation: Evaluation, model: Phi3ForCausalLM, procs: Processes,
                     run: RunDirectory, record: bool = True) -> tuple[float, str]:
    """Eval loss and sample after `step`, logged and (rank 0, `record`) written to metrics; NonFiniteLoss if
    the loss is not finite."""
    loss, sample = evaluation(model, procs)
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"step {step}: eval loss {loss}")
    log.info("step %d: eval loss %.4f (perplexity %.2f); sample: %r", step, loss, math.exp(loss), sample)
    if procs.rank == 0 and record:
        run.metrics.write({"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss), "sample": sample})
    return loss, sample


# ---------------------------------------------------------------------------------------------------------------
# Schedule and the step: linear warmup then decay (lora.phi3.schedule); micro-batches accumulated.
# ---------------------------------------------------------------------------------------------------------------
def resume(checkpoint: Path, model: Phi3ForCausalLM, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LambdaLR, schedule: Any, total_steps: int, data: dict[str, Any],
           c: argparse.Namespace, procs: Processes) -> int:
    """Restore a checkpoint; warn if the data file changed; re-plan the schedule of an extended run. The step."""
    state = load_checkpoint(checkpoint, model, optimizer, scheduler, sharded=procs.sharded)
    start = state["step"]
    if start >= total_steps:
        raise ValueError(f"--resume {checkpoint}: already at step {start} of {total_steps}; a larger --max-steps "
                         "extends the run")
    if procs.rank == 0 and state.get("data", data) != data:
        log.warning("--resume: %s changed since %s was saved (size %s -> %s bytes, SHA-256 %s... -> %s...); the run "
                    "continues by row index, so it is not the continuation of the saved one", c.data, checkpoint,
                    state["data"].get("size"), data["size"], str(state["data"].get("sha256"))[:12],
                    data["sha256"][:12])
    planned = state.get("total_steps", total_steps)
    if planned != total_steps:
        lr = replan(scheduler, schedule, start)
        log.info("schedule re-planned for %d steps (the checkpoint's run planned %d): %s decay; lr %.3g at step %d",
                 total_steps, planned, c.lr_scheduler_type, lr, start + 1)
    return start


def train_step(trainer: torch.nn.Module, model: Phi3ForCausalLM, micro: list, procs: Processes) -> tuple[float, int]:
    """Forward and backward over one step's micro-batches (gradients accumulated, synced on the last);
    `(mean loss per target token, real tokens)` over all ranks."""
    # Normalise by the global count of target tokens: every token weighs the same whatever the micro-batch,
    # the rank or the padding; DDP averages over ranks, hence the factor `world`.
    counts = torch.tensor([sum(b.num_targets for b in micro), sum(b.num_tokens for b in micro)],
                          dtype=torch.float64, device=procs.device)  # (target tokens, real tokens)
    if procs.world > 1:
        dist.all_reduce(counts)
    scale = procs.world / max(float(counts[0]), 1.0)
    step_loss = torch.zeros((), dtype=torch.float64, device=procs.device)
    for k, batch in enumerate(micro):
        batch = batch.to(procs.device)
        sync = k == len(micro) - 1 or procs.world == 1
        if procs.sharded:  # FSDP2 reduce-scatters the gradients of the last micro-batch only
            model.set_requires_gradient_sync(sync)
        with nullcontext() if sync or procs.sharded else trainer.no_sync():
            loss = trainer(batch.input_ids, batch.labels, position_ids=batch.position_ids,
                           packed=batch.position_ids is not None, reduction="sum")
            (loss * scale).backward()
        step_loss += loss.detach().double()
    if procs.world > 1:
        dist.all_reduce(step_loss)
    return float(step_loss) / max(float(counts[0]), 1.0), int(counts[1])


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    """A tqdm bar, or None (not enabled, or tqdm missing: progress as log lines)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        log.info("tqdm is not installed: progress as log lines (pip install 'purelora[progress]')")
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------------------------------
def check_replicas_agree(model: Phi3ForCausalLM, procs: Processes) -> None:
    """Raise unless every rank holds rank 0's adapters bit for bit (DDP keeps them in step)."""
    for name, tensor in lora.lora_state_dict(model).items():
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(reference, tensor):
            raise RuntimeError(f"rank {procs.rank}: adapter {name} differs from rank 0's")
    # INFO on rank 0 (its level); the other ranks log at WARNING only, so theirs is a warning to be seen.
    (log.info if procs.rank == 0 else log.warning)("rank %d of %d: adapters identical to rank 0's", procs.rank,
                                                   procs.world)


def write_outputs(work: Path, model: Phi3ForCausalLM, model_dir: Path, c: argparse.Namespace,
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
    if plot_losses(work / "metrics.jsonl", work / "loss.png"):
        written.append(("loss curve", Path("loss.png"), ""))
    if c.merge:
        # merge_and_save copies the base's tokenizer files (byte_tokenizer.json for the embedded model).
        if c.fsdp:
            model = load_model(model_dir, c, torch.device("cpu"))
            patch_model(model, c)
            lora.load_adapter(model, work / "adapter.safetensors")
        difference = merge_and_save(model, work / "merged", overwrite=True)
        written.append(("merged checkpoint", Path("merged"), f" (max |logit difference| {difference:.1e})"))
    return written


# ---------------------------------------------------------------------------------------------------------------
# Main: config, setup, data, eval, schedule, the loop, outputs.
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Train; 0 on success, 1 when the loss became non-finite (bad input raises before training)."""
    c, request = resolve_config(argv)
    check_config(c)
    run = RunDirectory.plan(Path(c.output_dir), resume=request.checkpoint, given=request.output_dir_given,
                            overwrite=request.overwrite_output_dir)  # before anything loads: a refusal fails fast
    procs = setup_distributed(c.device, c.fsdp)
    rank, world = procs.rank, procs.world
    torch.manual_seed(c.seed)

    # Model, tokenizer, data: everything is checked before the first step.
    model_dir = Path(c.model) if c.model else embedded_model_dir()
    model, summary = load_patched_model(model_dir, c, procs.device)
    tokenizer, template, pad_id = load_chat_tokenizer(model_dir, model.config.vocab_size, c.chat_template)
    log.info("model %s (%s, %s), tokenizer %d ids, chat template %s, %d process(es) on %s%s", model_dir,
             "embedded" if c.model is None else "checkpoint", model.lm_head.weight.dtype, tokenizer.vocab_size,
             template.name, world, procs.device, ", sharded with FSDP2" if c.fsdp else "")
    train_rows, eval_rows = (load_rows(path, tokenizer, template, c.max_seq_length, c.truncation, name)
                             for path, name in ((c.data, "train"), (c.eval_data, "eval")))
    if c.packing:
        train_rows = pack_examples(train_rows, c.max_seq_length)
        log.info("packed into %d rows of at most %d tokens", len(train_rows), c.max_seq_length)
    per_rank = c.per_device_train_batch_size * c.gradient_accumulation_steps
    steps_per_epoch = len(train_rows) // (per_rank * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{c.data}: {len(train_rows)} rows are fewer than one global batch of {per_rank * world} "
                         "(batch x accumulation x processes)")
    total_steps = c.max_steps if c.max_steps > 0 else math.ceil(c.num_train_epochs * steps_per_epoch)
    log.info("LoRA:\n%s", summary)
    evaluation = Evaluation(eval_rows, c.per_device_eval_batch_size, pad_id, tokenizer, template, c.sample_prompt,
                            c.sample_max_new_tokens)

    # Optimizer and schedule; fused AdamW: one kernel per step instead of a dozen passes over the adapters (as
    # transformers' Trainer defaults to); FSDP's sharded parameters keep the foreach implementation.
    model.gradient_checkpointing = c.gradient_checkpointing
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay, fused=not c.fsdp)
    warmup = math.ceil(c.warmup_ratio * total_steps)
    schedule = make_schedule(c.lr_scheduler_type, warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data = data_identity(c.data) if rank == 0 else {}
    checkpoint = request.checkpoint
    start = resume(checkpoint, model, optimizer, scheduler, schedule, total_steps, data, c, procs) if checkpoint else 0
    trainer = (DistributedDataParallel(model, device_ids=[procs.device] if procs.device.type == "cuda" else None)
               if world > 1 and not c.fsdp else model)
    run.open(vars(c), start, write=rank == 0)
    log.info("%d steps (%d per epoch), global batch %d, warmup %d, lr %.3g %s; %s", total_steps, steps_per_epoch,
             per_rank * world, warmup, c.learning_rate, c.lr_scheduler_type,
             f"resuming after step {start} from {checkpoint}" if checkpoint else "from scratch")
    unigram = unigram_loss(train_rows, eval_rows, tokenizer.vocab_size)
    log.info("unigram loss of the eval assistant tokens (a context-free model's): %.4f", unigram)

    # A checkpoint is good once a loss computed with its weights was finite: an eval at the step it was saved,
    # or the next step's training loss (`pending` until then). At lr 1e30 a step can leave finite but exploded
    # weights; the loss of the step after shows it.
    bar = progress_bar(c.progress and rank == 0, total_steps, start)
    last_good = pending = None
    t_start, tokens_seen = time.perf_counter(), 0
    try:
        loss_before, sample_before = evaluate_and_log(start, evaluation, model, procs, run, record=not checkpoint)
        (loss_after, sample), last_good = (loss_before, sample_before), checkpoint
        for step in range(start, total_steps):
            # The global batch of this step; this rank's share, split into micro-batches.
            indices = step_indices(len(train_rows), step=step, global_batch=per_rank * world, seed=c.seed)
            mine, size = indices[rank * per_rank : (rank + 1) * per_rank], c.per_device_train_batch_size
            micro = [collate([train_rows[i] for i in mine[k : k + size]], pad_id) for k in range(0, per_rank, size)]
            step_loss, tokens = train_step(trainer, model, micro, procs)
            grad_norm = (full_tensor(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
                         if c.max_grad_norm > 0 else torch.zeros(()))
            if not math.isfinite(step_loss) or not math.isfinite(float(grad_norm)):
                raise NonFiniteLoss(f"step {step + 1}: loss {step_loss}, gradient norm {float(grad_norm)}")
            last_good, pending = pending or last_good, None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            done, tokens_seen = step + 1, tokens_seen + tokens
            rate = tokens_seen / (time.perf_counter() - t_start)
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                bar.update()
            if rank == 0 and (done % c.logging_steps == 0 or done == total_steps):
                if bar is None:
                    eta = (total_steps - done) * (time.perf_counter() - t_start) / (done - start)
                    log.info("step %d/%d | loss %.4f | lr %.3g | %s tok/s | eta %.0fs", done, total_steps, step_loss,
                             lr, f"{rate:,.0f}", eta)
                run.metrics.write({"step": done, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                                   "tokens_per_s": rate})
            evaluated = done % c.eval_steps == 0 or done == total_steps
            if evaluated:
                loss_after, sample = evaluate_and_log(done, evaluation, model, procs, run)
            if (rank == 0 or c.fsdp) and (done % c.save_steps == 0 or done == total_steps):
                saved = run.checkpoint_path(done)
                save_checkpoint(saved, step=done, total_steps=total_steps, model=model, optimizer=optimizer,
                                scheduler=scheduler, config=vars(c), data=data, sharded=c.fsdp, rank=rank)
                last_good, pending = (saved, None) if evaluated else (last_good, saved)
                run.saved(saved, limit=c.save_total_limit, keep=last_good)
    except NonFiniteLoss as err:
        log.error("non-finite loss, stopping before the optimizer step: %s. Nothing was written for this step; "
                  "the last good checkpoint (one whose weights gave a finite loss) is %s", err,
                  last_good or "none (no checkpoint had been saved yet)")
        if pending is not None:
            log.error("%s was saved but is not good: the loss computed with its weights is non-finite", pending)
        return 1
    finally:
        if bar is not None:
            bar.close()

    if world > 1:
        check_replicas_agree(model, procs)
    if rank != 0 and c.fsdp:  # take part in gathering the adapters that rank 0 writes
        lora.save_adapter(model, run.path / "adapter.safetensors")
        save_peft_adapter(model, run.path / "adapter-peft")
    if rank == 0:
        run.metrics.finish()
        written = write_outputs(run.path, model, model_dir, c, last_good)
        final = run.complete(vars(c))  # what is left of an earlier trajectory goes; a replacement takes out's place
        log.info("before training: eval loss %.4f, sample %r", loss_before, sample_before)
        log.info("after training:  eval loss %.4f, sample %r", loss_after, sample)
        log.info("unigram model of the assistant tokens (reference): loss %.4f", unigram)
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
