"""Per-rank peak memory and step time of FSDP2 (`train_phi3.py --fsdp`) against one process and DDP.

Writes a full-width Phi-3 checkpoint (Phi-3-mini's widths, `--layers` decoder layers, random bf16 weights) into
a temporary directory, then runs, each in fresh processes on this machine: one process, DDP over 2 processes
(torchrun, gloo) and FSDP2 over 2 processes, each loading the checkpoint, patching LoRA (r 16, the four
projections) and training `--steps` AdamW steps on a global batch of 2 rows of `--seq` tokens. Memory is each
process's unique set size (USS: private pages, file-backed or anonymous; RSS would count the page cache that
ranks share once per rank), sampled every 50 ms: the peak while loading and the peak while training, each as
a fraction of one process's. Step time is the median step after the first, against DDP's; the three modes run
once each, one after another (not interleaved), so the step times are indicative, the memory is the point. The
base is bf16 where the machine multiplies bf16 natively (avx512_bf16 / amx_bf16, or CUDA), else float32 (said so).

    python benchmarks/fsdp.py             # Phi-3-mini: 32 full-width layers (7.6 GB of weights), ~10 minutes and
                                          # ~18 GB of memory (one process, then 2 DDP ranks of the whole model)
    python benchmarks/fsdp.py --layers 16 # half the depth, half the memory
    python benchmarks/fsdp.py --quick     # tiny model, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fullsize import native_bf16  # noqa: E402

from lora.phi3 import Phi3Config, Phi3ForCausalLM, from_pretrained, patch, save_pretrained  # noqa: E402
from lora.phi3.fsdp import from_pretrained_sharded  # noqa: E402

QUICK = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
         "vocab_size": 512}
GOAL = 0.6  # per-rank peak of FSDP over 2 processes, as a fraction of one process's


def uss() -> int:
    """Unique set size of this process in bytes (Private_Clean + Private_Dirty of /proc/self/smaps_rollup)."""
    total = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


class PeakMemory:
    """Highest USS seen by a 50 ms sampling thread since the last `reset` (smaps_rollup costs system time)."""

    def __init__(self) -> None:
        self.peak = uss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, uss())

    def reset(self) -> int:
        peak, self.peak = max(self.peak, uss()), uss()
        return peak


def write_checkpoint(path: Path, layers: int, quick: bool, dtype: torch.dtype) -> Phi3Config:
    config = Phi3Config(num_hidden_layers=layers, **(QUICK if quick else {}))
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.to(dtype).to_empty(device="cpu")  # in its dtype from the start: a float32 copy of bf16 would double the peak
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    save_pretrained(model, path)
    return config


def worker(mode: str, checkpoint: Path, steps: int, seq: int, out: Path) -> None:
    memory = PeakMemory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    lora_args = dict(r=16, lora_alpha=32, lora_dropout=0.0)
    if mode == "fsdp":
        model = trainer = from_pretrained_sharded(checkpoint, prepare=lambda m: patch(m, **lora_args))
    else:
        model = from_pretrained(checkpoint)
        patch(model, **lora_args)
        trainer = model if mode == "one" else nn.parallel.DistributedDataParallel(model)
    load_peak = memory.reset()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    mine = ids if world == 1 else ids[rank::world]  # the same global batch of 2 rows
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer(mine, mine, reduction="sum").backward()  # model(ids, labels): the loss, through DDP's forward
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    train_peak = memory.reset()
    # One file per rank: torchrun interleaves the ranks' stdout.
    (out / f"{mode}-{rank}.json").write_text(json.dumps({"mode": mode, "rank": rank, "load_peak": load_peak,
                                                         "train_peak": train_peak,
                                                         "step_s": statistics.median(times[1:] or times)}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(mode: str, checkpoint: Path, steps: int, seq: int) -> list[dict]:
    script = [str(Path(__file__).resolve()), "--worker", mode, "--checkpoint", str(checkpoint), "--steps",
              str(steps), "--seq", str(seq), "--out", str(checkpoint / "results")]
    (checkpoint / "results").mkdir(exist_ok=True)
    launch = ([sys.executable] if mode == "one" else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    result = subprocess.run([*launch, *script], capture_output=True, text=True, timeout=3000)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows = [json.loads(path.read_text()) for path in (checkpoint / "results").glob(f"{mode}-*.json")]
    return sorted(rows, key=lambda row: row["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths, 2 layers, 2 steps: checks that it runs")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Phi-3-mini has 32)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--worker", choices=("one", "ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint, args.steps, args.seq, args.out)
        return
    layers, steps, seq = (2, 2, 16) if args.quick else (args.layers, args.steps, args.seq)
    native, why = native_bf16()
    dtype = torch.bfloat16 if native else torch.float32  # emulated bf16 GEMMs would take 15-70x longer
    print(f"base weights {'bf16' if native else 'float32'}: {why}")
    with tempfile.TemporaryDirectory(prefix="fsdp-bench-") as tmp:
        config = write_checkpoint(Path(tmp), layers, args.quick, dtype)
        parameters = sum(p.numel() for p in Phi3ForCausalLM(config).parameters()) if args.quick else None
        results = {mode: run(mode, Path(tmp), steps, seq) for mode in ("one", "ddp", "fsdp")}
    one, ddp = results["one"][0], max(row["step_s"] for row in results["ddp"])
    size = f"{parameters:,} parameters" if parameters else f"{layers} full-width layers"
    base = "bf16" if native else "float32"
    print(f"Phi-3 with {config.num_hidden_layers} layers (hidden {config.hidden_size}, {size}), {base} base, "
          f"LoRA r 16 on the four projections; global batch 2 x {seq} tokens, {steps} steps; torch {torch.__version__}")
    print(f"{'mode':<6} {'rank':>4} {'load peak MiB':>14} {'x one':>6} {'train peak MiB':>15} {'x one':>6} "
          f"{'step s':>8} {'x ddp':>6}")
    for mode, rows in results.items():
        for row in rows:
            print(f"{mode:<6} {row['rank']:>4} {row['load_peak'] / 2**20:>14,.0f} "
                  f"{row['load_peak'] / one['load_peak']:>6.2f} {row['train_peak'] / 2**20:>15,.0f} "
                  f"{row['train_peak'] / one['train_peak']:>6.2f} {row['step_s']:>8.3f} {row['step_s'] / ddp:>6.2f}")
    # Overall peaks: one process maps the checkpoint lazily (its pages arrive on first use, in training), so its
    # load peak alone says little.
    overall = max(one["load_peak"], one["train_peak"])
    worst = max(max(row["load_peak"], row["train_peak"]) / overall for row in results["fsdp"])
    print(f"FSDP per-rank overall peak (USS) at most {worst:.2f}x one process's (goal <= {GOAL}): "
          f"{'met' if worst <= GOAL else 'not met'}")


if __name__ == "__main__":
    main()
