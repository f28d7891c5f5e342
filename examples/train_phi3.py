"""LoRA fine-tuning of Phi-3 on a chat-instruction dataset, in one file: config, setup, data, eval, schedule, loop.

    python examples/train_phi3.py                    # embedded tiny Phi-3 + examples/data, ~1 min on 2 CPU cores
    python examples/train_phi3.py --model Phi-3-mini-4k-instruct --data train.jsonl --eval-data test.jsonl
    torchrun --nproc_per_node 2 examples/train_phi3.py ...            # DDP: gloo on CPU, nccl on GPU
    torchrun --nproc_per_node 2 examples/train_phi3.py ... --fsdp     # FSDP2: each process holds 1/N of the model
    python examples/train_phi3.py --resume runs/phi3-lora/checkpoints/step-000100
    python examples/train_phi3.py --model Phi-3-mini-4k-instruct --dtype bfloat16 --load-in-4bit  # QLoRA (NF4)

Only the LoRA adapters train (AdamW, warmup + cosine, accumulation, clipping); the loss covers assistant tokens
only, each turn's `<|end|>` included. Output (rank 0 only): metrics.jsonl, checkpoints/step-N/ (adapter, optimizer,
scheduler, RNG, step, config; written atomically), adapter.safetensors (ours), adapter-peft/ (PEFT's format),
loss.png (with matplotlib), merged/ (with --merge). Last line: `eval loss: BEFORE -> AFTER (-P%)` (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import lora
from lora import phi3
from lora.atomic import atomic_directory
from lora.phi3 import PatchSummary, Phi3Config, Phi3ForCausalLM
from lora.phi3 import run_directory as runs
from lora.phi3.chat import TEMPLATES, ChatTemplate, stop_token_ids, template_from_checkpoint
from lora.phi3.data import LENGTH_POLICIES, Example, step_indices, unigram_loss
from lora.phi3.distributed import Processes, check_device, check_replicas_agree, setup_processes, shutdown_processes
from lora.phi3.evaluation import Evaluation
from lora.phi3.fsdp import from_pretrained_sharded
from lora.phi3.model import checked_checkpoint_keep
from lora.phi3.patch import resolve_targets
from lora.phi3.schedule import SCHEDULES, make_schedule
from lora.phi3.settings import Setting, Settings
from lora.phi3.tokenizer import ByteTokenizer, load_tokenizer
from lora.quant import require_bitsandbytes
from lora.sharding import full_tensor

HERE = Path(__file__).resolve().parent
log = logging.getLogger("train_phi3")

# ---------------------------------------------------------------------------------------------------------------
# Config. Defaults are Microsoft's recipe for LoRA on Phi-3-mini (sample_finetune.py in the model repos):
# lr 5e-6, cosine, warmup 0.2, 1 epoch, batch 4, gradient checkpointing, r 16, alpha 32, dropout 0.05,
# all linear projections, 2048 tokens, bf16 weights. Every setting is a command-line option (`--learning-rate`)
# and may be set in a JSON or TOML file (`--config FILE`); precedence: command line > file > defaults.
# `resumable` ones may change on --resume: where things go and how they are shown, not what is computed; and the
# length of the run (a larger --max-steps extends a finished run, the schedule re-planned for the new total).
# ---------------------------------------------------------------------------------------------------------------
EMBEDDED_DIR = HERE.parent / "runs" / "tiny-phi3-v2"
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
    S("per_device_train_batch_size", 4, "rows (conversations or packs) per micro-batch and process", bounds="positive"),
    S("per_device_eval_batch_size", 4, "conversations per evaluation batch", bounds="positive"),
    S("gradient_accumulation_steps", 1, "micro-batches per optimizer step", bounds="positive"),
    S("gradient_checkpointing", True, "recompute each decoder layer in backward (less memory, ~1/3 more compute)"),
    S("checkpoint_keep", "none", "with --gradient-checkpointing, the projections (among qkv_proj, o_proj, "
      "gate_up_proj) whose outputs each layer keeps, so backward skips their frozen GEMMs: faster, more memory "
      "(docs/performance.md); the same results bit for bit", many=True, resumable=True),
    S("max_seq_length", 2048, "longest conversation in tokens (and the packed row length)", bounds="positive"),
    S("truncation", "truncate", "longer conversations: truncate (keep the start) or drop", choices=LENGTH_POLICIES),
    S("packing", False, "pack conversations into max_seq_length rows, attention kept within each conversation"),
    S("chat_template", "auto", "auto (from the checkpoint's tokenizer_config.json; the current Phi-3 one if none) "
      "or " + ", ".join(TEMPLATES), choices=("auto", *TEMPLATES)),
    S("logging_steps", 20, "log (and write metrics.jsonl) every N steps", bounds="positive", resumable=True),
    S("eval_steps", 100, "evaluate and write a sample every N steps and at the end", bounds="positive", resumable=True),
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
    S("bnb_4bit_quant_type", "nf4", "4-bit type with --load-in-4bit: nf4 (QLoRA's) or fp4", choices=("nf4", "fp4")),
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
# Without --model: a tiny random Phi-3 (config/tiny-phi3.json: the architecture at small widths, over the 264-id
# byte tokenizer) and the settings of config/embedded.json, with which LoRA alone learns the sample data in about
# a minute of CPU (docs/training.md says why each).
UNSUPPORTED = {  # pairs of switches that do not go together, and why
    ("fsdp", "use_dora"): "DoRA starts its magnitude from each whole row of the base weight, which a sharded load "
                          "never holds; train DoRA with DDP (torchrun without --fsdp)",
    ("load_in_4bit", "fsdp"): "FSDP2 shards each parameter along its rows, which a packed 4-bit weight and its block "
                              "scales do not allow; train QLoRA with DDP (torchrun without --fsdp)",
    ("load_in_4bit", "use_dora"): "DoRA needs the row norms of the dequantized weight at every step; use plain LoRA "
                                  "on a 4-bit base, or DoRA on a bf16 one",
}
EMBEDDED_OVERRIDES = SETTINGS.read_file(HERE / "config" / "embedded.json")


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


def resolve_config(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """`(settings, request)`: defaults < (embedded overrides) < config file < command line, or on --resume the
    checkpoint's; the request says where from (`checkpoint`) and whether a run may be replaced."""
    args = vars(build_parser().parse_args(argv))
    config_file, resume = args.pop("config", None), args.pop("resume", None)
    given = {**(SETTINGS.read_file(config_file) if config_file else {}), **args}
    request = argparse.Namespace(checkpoint=resume and runs.latest_checkpoint(Path(resume)),
                                 overwrite_output_dir=given.pop("overwrite_output_dir", False),
                                 output_dir_given="output_dir" in given)
    if resume is not None:
        settings = SETTINGS.resumed(request.checkpoint, given)
        if not request.output_dir_given:
            # Where the checkpoint's run is now (a copied or moved run continues there), and as protected as an
            # explicit --output-dir: a run directory it did not come from is never replaced unasked.
            settings["output_dir"] = str(runs.resumed_output_dir(request.checkpoint, Path(settings["output_dir"])))
            request.output_dir_given = True
        return argparse.Namespace(**settings), request
    embedded = EMBEDDED_OVERRIDES if given.get("model") is None else {}
    return argparse.Namespace(**{**SETTINGS.defaults(), **embedded, **given}), request


def check_config(c: argparse.Namespace) -> None:
    """Every value in range and no two that contradict each other: a ValueError naming the options."""
    SETTINGS.check_values(vars(c))
    if c.max_steps == 0 or c.max_steps < -1:
        raise ValueError(f"--max-steps must be positive, or -1 to use --num-train-epochs; got {c.max_steps}")
    if c.max_steps == -1 and c.num_train_epochs <= 0:
        raise ValueError("--max-steps -1 trains for --num-train-epochs, which must then be positive, "
                         f"got {c.num_train_epochs}")
    check_device(c.device)
    if checkpoint_keep(c) and not c.gradient_checkpointing:
        raise ValueError("--checkpoint-keep chooses what a checkpointed layer keeps: it needs --gradient-checkpointing")
    for (a, b), why in UNSUPPORTED.items():
        if getattr(c, a) and getattr(c, b):
            raise ValueError(f"{SETTINGS[a].option} with {SETTINGS[b].option} is not supported: {why}")
    if c.load_in_4bit:
        require_bitsandbytes()  # an ImportError naming the qlora extra, before anything is loaded
    if c.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards the model across processes: run the script under torchrun with two or more "
                         "(torchrun --nproc_per_node N examples/train_phi3.py ... --fsdp)")
    if Path(c.output_dir).resolve() == Path(c.model or EMBEDDED_DIR).resolve():
        raise ValueError("--output-dir must differ from --model: the base checkpoint would be overwritten")


def checkpoint_keep(c: argparse.Namespace) -> tuple[str, ...]:
    """--checkpoint-keep's projection names (none: an empty tuple); a ValueError for any other name, or for one
    that --target-modules leaves frozen (a plain nn.Linear keeps nothing)."""
    names = checked_checkpoint_keep([] if c.checkpoint_keep in ("none", ["none"]) else c.checkpoint_keep,
                                    what="--checkpoint-keep")
    if c.target_modules not in ("all-linear", ["all-linear"]):
        frozen = [name for name in names if name not in resolve_targets(c.target_modules)]
        if frozen:
            raise ValueError(f"--checkpoint-keep {' '.join(frozen)}: not adapted by --target-modules "
                             f"{' '.join(c.target_modules)}; only LoRA layers keep their outputs")
    return names


# --- Setup: model and tokenizer.
def embedded_model_dir() -> Path:
    """The tiny random Phi-3 (config/tiny-phi3.json, float32, seed 1234), written once as a checkpoint directory."""
    tiny = json.loads((HERE / "config" / "tiny-phi3.json").read_text())
    if (EMBEDDED_DIR / "config.json").is_file():
        cached = Phi3Config.from_json(EMBEDDED_DIR / "config.json")
        if any(getattr(cached, key) != value for key, value in tiny.items()):
            raise ValueError(f"{EMBEDDED_DIR} was built from another config/tiny-phi3.json: delete it to rebuild it")
        return EMBEDDED_DIR
    # On a forked RNG: the run's own stream (adapter init, data order, dropout) must not depend on whether
    # this call found the checkpoint already written.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = Phi3ForCausalLM(Phi3Config(**tiny))
    # A frozen random head behind RMSNorm can only reach logits up to |w| sqrt(hidden): with nn.Linear's init
    # that is ~6, too flat to ever be confident. 3x wider rows let LoRA reach sharp predictions; the untrained
    # loss is then above uniform (about 7.1 vs ln 264 = 5.6), so the unigram loss is printed as the reference.
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    try:
        with atomic_directory(EMBEDDED_DIR, replace=False) as tmp:  # another process may win the race: keep its
            phi3.save_pretrained(model, tmp)
            ByteTokenizer().save(tmp)
    except FileExistsError:
        if not (EMBEDDED_DIR / "config.json").is_file():
            raise
    return EMBEDDED_DIR


def patch_model(model: Phi3ForCausalLM, c: argparse.Namespace) -> PatchSummary:
    """LoRA on the configured targets (`all-linear`: the four projections); only the adapters train."""
    targets = phi3.DEFAULT_TARGETS if c.target_modules in ("all-linear", ["all-linear"]) else tuple(c.target_modules)
    return phi3.patch(model, r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, targets=targets,
                      use_rslora=c.use_rslora, use_dora=c.use_dora)


def load_model(path: Path, c: argparse.Namespace, device: torch.device) -> tuple[Phi3ForCausalLM, PatchSummary]:
    """The base (4-bit with --load-in-4bit) with its adapters; with --fsdp sharded, each rank reading only its
    rows (lora.phi3.fsdp). Errors say what a Phi-3 directory is."""
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: " + ("no config.json; expected a Phi-3 checkpoint directory"
                                                if path.is_dir() else "not a directory"))
    dtype = None if c.dtype == "auto" else c.dtype
    if c.fsdp:
        summary = []  # errors name the file or the layer at fault
        model = from_pretrained_sharded(path, dtype=dtype, device=device,
                                        prepare=lambda m: summary.append(patch_model(m, c)))
        return model, summary[0]
    try:
        model = phi3.from_pretrained(path, dtype=dtype, device=device, double_quant=c.bnb_4bit_use_double_quant,
                                     quantize=c.bnb_4bit_quant_type if c.load_in_4bit else None)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--model {path}: not a loadable Phi-3 checkpoint: {err}") from err
    return model, patch_model(model, c)


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


# --- Data and eval.
def load_data(c: argparse.Namespace, tokenizer: Any, template: ChatTemplate) -> tuple[list[Example], list[Example]]:
    """The train rows (packed with --packing) and the eval rows: read, checked, tokenised, logged."""
    rows = []
    for path, name in ((c.data, "train"), (c.eval_data, "eval")):
        examples, stats = phi3.encode_conversations(phi3.read_conversations(path), tokenizer, template,
                                                    max_length=c.max_seq_length, policy=c.truncation)
        log.info("%s (%s): %s (max %d tokens)", name, shown(path), stats, c.max_seq_length)
        if stats.dropped:
            log.warning("%s: dropped lines %s%s", name, stats.dropped_lines[:10], " ..." if stats.dropped > 10 else "")
        if not examples:
            raise ValueError(f"{path}: no conversation left after the length policy ({stats})")
        rows.append(examples)
    if c.packing:
        rows[0] = phi3.pack_examples(rows[0], c.max_seq_length)
        log.info("packed into %d rows of at most %d tokens", len(rows[0]), c.max_seq_length)
    return rows[0], rows[1]


def plan_steps(rows: int, c: argparse.Namespace, world: int) -> tuple[int, int, int]:
    """`(rows per rank and step, steps per epoch, total steps)`; a ValueError if not one global batch fits."""
    per_rank = c.per_device_train_batch_size * c.gradient_accumulation_steps
    steps_per_epoch = rows // (per_rank * world)
    if steps_per_epoch == 0:
        raise ValueError(f"{c.data}: {rows} rows are fewer than one global batch of {per_rank * world} "
                         "(batch x accumulation x processes)")
    total = c.max_steps if c.max_steps > 0 else math.ceil(c.num_train_epochs * steps_per_epoch)
    return per_rank, steps_per_epoch, total


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN or infinite."""


def evaluate_and_log(step: int, evaluation: Evaluation, model: Phi3ForCausalLM, procs: Processes,
                     run: runs.RunDirectory, record: bool = True) -> tuple[float, str]:
    """Eval loss and sample after `step`, logged and (rank 0, `record`) written to metrics; NonFiniteLoss if
    the loss is not finite."""
    loss, sample = evaluation(model, procs)
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"step {step}: eval loss {loss}")
    log.info("step %d: eval loss %.4f (perplexity %.2f); sample: %r", step, loss, math.exp(loss), sample)
    if procs.rank == 0 and record:
        run.metrics.write({"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss), "sample": sample})
    return loss, sample


# --- Schedule and step: linear warmup then decay (lora.phi3.schedule); micro-batches accumulated.
def make_optimizer(model: Phi3ForCausalLM, c: argparse.Namespace, total_steps: int) -> tuple[list, Any, Any, int]:
    """`(trainable parameters, AdamW, LambdaLR, warmup steps)`. Fused AdamW: one kernel per step instead of a
    dozen passes over the adapters (transformers' Trainer's default); FSDP's sharded parameters take foreach."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay, fused=not c.fsdp)
    warmup = math.ceil(c.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(c.lr_scheduler_type, warmup, total_steps))
    return params, optimizer, scheduler, warmup


def train_step(trainer: torch.nn.Module, model: Phi3ForCausalLM, rows: list[Example], size: int, pad_id: int,
               procs: Processes) -> tuple[float, int]:
    """Forward and backward over this rank's rows of a step in micro-batches of `size` (gradients accumulated,
    synced on the last); `(mean loss per target token, real tokens)` over all ranks."""
    micro = [phi3.collate(rows[k : k + size], pad_id) for k in range(0, len(rows), size)]
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
                           document_ids=batch.document_ids, reduction="sum")
            (loss * scale).backward()
        step_loss += loss.detach().double()
    if procs.world > 1:
        dist.all_reduce(step_loss)
    return float(step_loss) / max(float(counts[0]), 1.0), int(counts[1])


def report(record: dict[str, Any], total: int, bar: Any, run: runs.RunDirectory, logged: bool, eta: float) -> None:
    """A step on the progress bar; when `logged`, in metrics.jsonl too, and as a log line without a bar."""
    if bar is not None:
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
        bar.update()
    if logged:
        if bar is None:
            log.info("step %d/%d | loss %.4f | lr %.3g | %s tok/s | eta %.0fs", record["step"], total, record["loss"],
                     record["lr"], f"{record['tokens_per_s']:,.0f}", eta)
        run.metrics.write(record)


def progress_bar(enabled: bool, total: int, initial: int) -> Any:
    """A tqdm bar, or None (not enabled, or tqdm missing: progress as log lines)."""
    try:
        from tqdm import tqdm
    except ImportError:
        (log.info if enabled else log.debug)("tqdm is not installed: progress as log lines (pip install "
                                             "'purelora[progress]')")
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if enabled else None


# --- Outputs.
def finish(run: runs.RunDirectory, model: Phi3ForCausalLM, model_dir: Path, c: argparse.Namespace, procs: Processes,
           checkpoint: Path | None, before: tuple[float, str], after: tuple[float, str], unigram: float) -> None:
    """The replica check, then (rank 0) the final adapter in our format and PEFT's, the loss plot and the merged
    model, each replaced as a whole, and the run completed (`RunDirectory.complete`). Under FSDP every rank
    takes part in gathering the adapters, and the merge is of the adapter file just written into the base
    loaded whole on rank 0."""
    if procs.world > 1:
        check_replicas_agree(model, procs)
    work = run.path
    if procs.rank == 0 or procs.sharded:  # under FSDP the other ranks take part in gathering what rank 0 writes
        lora.save_adapter(model, work / "adapter.safetensors")
        phi3.save_peft_adapter(model, work / "adapter-peft")
    if procs.rank != 0:
        return
    run.metrics.finish()
    if checkpoint is not None and checkpoint.resolve().is_relative_to(work.resolve()):
        checkpoint = checkpoint.resolve().relative_to(work.resolve())  # it moves with a replacement run
    written = [("adapter (ours)", "adapter.safetensors", ""), ("adapter (PEFT)", "adapter-peft", ""),
               ("last checkpoint", checkpoint, ""), ("metrics", "metrics.jsonl", ""),
               ("config", "train_config.json", "")]
    if runs.plot_losses(work / "metrics.jsonl", work / "loss.png"):
        written.append(("loss curve", "loss.png", ""))
    if c.merge:
        # merge_and_save copies the base's tokenizer files (byte_tokenizer.json for the embedded model).
        if procs.sharded:
            model, _ = load_model(model_dir, argparse.Namespace(**{**vars(c), "fsdp": False}), torch.device("cpu"))
            lora.load_adapter(model, work / "adapter.safetensors")
        difference = phi3.merge_and_save(model, work / "merged", overwrite=True)
        written.append(("merged checkpoint", "merged", f" (max |logit difference| {difference:.1e})"))
    final = run.complete(vars(c))  # what is left of an earlier trajectory goes; a replacement takes out's place
    for label, path, note in written:
        log.info("wrote %-20s%s%s", label + ":", shown(final / path) if path else "none", note)
    log.info("unigram model of the assistant tokens (reference): loss %.4f", unigram)
    log.info("before training: eval loss %.4f, sample %r; after: %.4f, %r", *before, *after)
    print(f"eval loss: {before[0]:.4f} -> {after[0]:.4f} ({(after[0] / before[0] - 1) * 100:+.1f}%)", flush=True)


def shown(path: str | Path) -> str:
    """A path as the log shows it: relative to the working directory when it is under it, else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


# --- Main: config, setup, data, eval, schedule, the loop, outputs.
def main(argv: list[str] | None = None) -> int:
    """Train; 0 on success, 1 when the loss became non-finite (bad input raises before training)."""
    c, request = resolve_config(argv)
    check_config(c)
    run = runs.RunDirectory.plan(Path(c.output_dir), resume=request.checkpoint, given=request.output_dir_given,
                                 overwrite=request.overwrite_output_dir)  # before anything loads: fails fast
    procs = setup_processes(c.device, sharded=c.fsdp)
    rank, world, checkpoint = procs.rank, procs.world, request.checkpoint
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, datefmt="%H:%M:%S",
                        format=f"%(asctime)s {f'[rank {rank}] ' if world > 1 else ''}%(levelname)s %(message)s",
                        force=True)
    torch.manual_seed(c.seed)

    # Model, tokenizer, data: everything is checked before the first step.
    model_dir = Path(c.model) if c.model else embedded_model_dir()
    model, summary = load_model(model_dir, c, procs.device)
    tokenizer, template, pad_id = load_chat_tokenizer(model_dir, model.config.vocab_size, c.chat_template)
    log.info("model %s (%s, %s), tokenizer %d ids, chat template %s, %d process(es) on %s%s", shown(model_dir),
             "checkpoint" if c.model else "embedded", model.lm_head.weight.dtype, tokenizer.vocab_size, template.name,
             world, procs.device, ", sharded with FSDP2" if c.fsdp else "")
    train_rows, eval_rows = load_data(c, tokenizer, template)
    per_rank, steps_per_epoch, total_steps = plan_steps(len(train_rows), c, world)
    log.info("LoRA:\n%s", summary)
    evaluation = Evaluation(eval_rows, c.per_device_eval_batch_size, pad_id, tokenizer, template, c.sample_prompt,
                            c.sample_max_new_tokens)

    # Optimizer and schedule.
    model.gradient_checkpointing = c.gradient_checkpointing
    model.checkpoint_keep = checkpoint_keep(c)
    model.train()
    params, optimizer, scheduler, warmup = make_optimizer(model, c, total_steps)
    data = runs.data_identity(c.data) if rank == 0 else {}
    start = runs.resume(checkpoint, model, optimizer, scheduler, total_steps=total_steps, data=data, data_path=c.data,
                        sharded=procs.sharded, rank=rank, processes=world) if checkpoint else 0
    trainer = (DistributedDataParallel(model, device_ids=[procs.device] if procs.device.type == "cuda" else None)
               if world > 1 and not procs.sharded else model)
    run.open(vars(c), start, write=rank == 0)
    log.info("%d steps (%d per epoch), global batch %d, warmup %d, lr %.3g %s; %s", total_steps, steps_per_epoch,
             per_rank * world, warmup, c.learning_rate, c.lr_scheduler_type,
             f"resuming after step {start} from {checkpoint}" if checkpoint else "from scratch")

    # A checkpoint is good once a loss computed with its weights was finite: an eval at the step it was saved,
    # or the next step's training loss (`pending` until then). At lr 1e30 a step can leave finite but exploded
    # weights; the loss of the step after shows it.
    bar, last_good, pending = progress_bar(c.progress and rank == 0, total_steps, start), None, None
    t_start, tokens_seen = time.perf_counter(), 0
    try:
        loss_before, sample_before = evaluate_and_log(start, evaluation, model, procs, run, record=not checkpoint)
        (loss_after, sample), last_good = (loss_before, sample_before), checkpoint
        for step in range(start, total_steps):
            # The global batch of this step; this rank's share, split into micro-batches.
            indices = step_indices(len(train_rows), step=step, global_batch=per_rank * world, seed=c.seed)
            mine = [train_rows[i] for i in indices[rank * per_rank : (rank + 1) * per_rank]]
            step_loss, tokens = train_step(trainer, model, mine, c.per_device_train_batch_size, pad_id, procs)
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
            record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_per_s": tokens_seen / (time.perf_counter() - t_start)}
            if rank == 0:
                report(record, total_steps, bar, run, done % c.logging_steps == 0 or done == total_steps,
                       eta=(total_steps - done) * (time.perf_counter() - t_start) / (done - start))
            evaluated = done % c.eval_steps == 0 or done == total_steps
            if evaluated:
                loss_after, sample = evaluate_and_log(done, evaluation, model, procs, run)
            if (rank == 0 or procs.sharded) and (done % c.save_steps == 0 or done == total_steps):
                saved = run.checkpoint_path(done)
                runs.save_checkpoint(saved, step=done, total_steps=total_steps, model=model, optimizer=optimizer,
                                     scheduler=scheduler, config=vars(c), data=data, sharded=procs.sharded, rank=rank,
                                     processes=world)
                last_good, pending = (saved, None) if evaluated else (last_good, saved)
                if rank == 0:  # pruning deletes: rank 0's directory only
                    run.saved(saved, limit=c.save_total_limit, keep=last_good)
    except NonFiniteLoss as err:
        log.error("non-finite loss, stopping before the optimizer step: %s. Nothing was written for this step; "
                  "the last good checkpoint (one whose weights gave a finite loss) is %s%s", err,
                  last_good or "none (none has given a finite loss yet)", "" if pending is None else
                  f"; {pending} was saved but is not good: the loss computed with its weights is non-finite")
        return 1
    finally:
        if bar is not None:
            bar.close()

    finish(run, model, model_dir, c, procs, last_good, (loss_before, sample_before), (loss_after, sample),
           unigram_loss(train_rows, eval_rows, tokenizer.vocab_size))
    if world > 1:
        del trainer  # DDP's reducer holds the process group; freed after it, its C++ side can abort at exit
        shutdown_processes()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
