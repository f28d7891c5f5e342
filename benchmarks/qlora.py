"""QLoRA on a full-size Phi-3-mini: quantize-at-load time and peak memory, and the train step against bf16 and PEFT.

Writes the Phi-3-mini-4k-shaped bf16 checkpoint of benchmarks/phi3_load.py (7.64 GB, random weights), then, each
in a fresh process (peak RSS is the process's):

- load: `from_pretrained(path, dtype=bfloat16, quantize="nf4")` (double-quantized scales): time and peak RSS
  as a multiple of the bf16 weight bytes (goal 0.40x, must be <= 0.45x); then `save_pretrained` of it;
- load of that saved 4-bit directory, which skips the quantization (time and peak RSS);
- train step, seq 128 x batch 4 (the recipe's batch), gradient checkpointing, r 16 / alpha 32 / dropout 0.05 on
  the four projections, AdamW: ours on the bf16 base (the floor), ours on the NF4 base, and transformers' 4-bit
  Phi-3 (BitsAndBytesConfig, the same NF4 settings) with PEFT's LoRA; the three in one process, their steps
  interleaved (one round of a step each, repeated), so that the machine's load hits them alike. The step runs on
  the first STEP_LAYERS decoder layers of the same full-width model (a second checkpoint), since a full 32-layer
  step takes minutes on a 2-core CPU. The layers cost the same, but the output head and the loss are a fixed cost
  that these few layers weigh more than 32 would, so the ratios here sit closer to 1 than a whole model's. PEFT's
  side is transformers' `activation_checkpointing_enable`, which also makes the embedding output require grad, as
  its users get it: its step computes layer 0's input gradient too (one more dequantize and GEMM). Median of the
  timed steps after one warm-up. Must reach: ours NF4
  <= 1.5x our bf16 step (goal 1.15x) and faster than PEFT's QLoRA.

The compute dtype is bf16 where the CPU has native bf16 (avx512_bf16 or amx_bf16), else float32 (said so).

    flock /tmp/fullsize.lock python benchmarks/qlora.py   # full size: ~8 GB of RAM, 11 GB of disk, 10-20 min
    python benchmarks/qlora.py --quick                    # tiny config, in one process, targets not checked
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fullsize import native_bf16  # noqa: E402
from phi3_load import FULL, QUICK, write_checkpoint  # noqa: E402

STEP_LAYERS = 4
SEQ, BATCH = 128, 4
R, ALPHA, DROPOUT = 16, 32, 0.05
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
RSS_GOAL, RSS_LIMIT = 0.40, 0.45
STEP_GOAL, STEP_LIMIT = 1.15, 1.5
STEPS = ("ours-bf16", "ours-nf4", "peft-nf4")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_child(path: Path, saved: Path | None, dtype: torch.dtype) -> dict:
    """Quantize at load (and save the result to `saved`), or load an already quantized directory."""
    from lora.phi3 import from_pretrained, save_pretrained

    before = peak_rss()
    start = time.perf_counter()
    model = from_pretrained(path, dtype=dtype, quantize=None if saved is None else "nf4")
    loaded = time.perf_counter() - start
    result = {"load_s": loaded, "rss": peak_rss(), "rss_before": before}
    if saved is not None:
        start = time.perf_counter()
        save_pretrained(model, saved)
        result["save_s"] = time.perf_counter() - start
    result["bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return result


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1], ids[:, 1:]


def build(variant: str, path: Path, dtype: torch.dtype):
    """(model, logits function) of one variant, patched, with gradient checkpointing, in train mode."""
    torch.manual_seed(0)
    if variant.startswith("ours"):
        from lora.phi3 import from_pretrained, patch

        model = from_pretrained(path, dtype=dtype, quantize="nf4" if variant.endswith("nf4") else None)
        patch(model, r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, targets=TARGETS)
        model.gradient_checkpointing = True

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return model(ids)
    else:
        import peft
        import transformers

        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = transformers.Phi3ForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config,
                                                             device_map="cpu")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                           target_modules=list(TARGETS), task_type="CAUSAL_LM"))

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids, use_cache=False).logits
    model.train()
    return model, logits


def step_child(path: Path, dtype: torch.dtype, steps: int) -> dict:
    """Median train-step time of every variant, the three models in one process and their steps interleaved
    (a round of one step each, repeated): drift in what else the machine runs hits them alike."""
    runs = {}
    for variant in STEPS:
        model, logits = build(variant, path, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        runs[variant] = (model, logits, torch.optim.AdamW(params, lr=1e-4))
    inputs, labels = _batch(runs["ours-bf16"][0].config.vocab_size)
    times: dict[str, list[float]] = {variant: [] for variant in STEPS}
    losses: dict[str, list[float]] = {variant: [] for variant in STEPS}
    for _ in range(steps + 1):  # the first round is the warm-up
        for variant, (_, logits, optimizer) in runs.items():
            start = time.perf_counter()
            loss = F.cross_entropy(logits(inputs).float().flatten(0, 1), labels.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[variant].append(time.perf_counter() - start)
            losses[variant].append(loss.item())
    return {variant: {"step_s": statistics.median(times[variant][1:]), "times": times[variant],
                      "loss0": losses[variant][0]} for variant in STEPS}


def run_child(args: list[str], quick: bool) -> dict:
    if quick:  # in this process: the quick mode checks that the code runs, not memory
        return CHILDREN[args[0]](*args[1:])
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


CHILDREN = {
    "load": lambda path, saved, dtype: load_child(Path(path), Path(saved) if saved else None, getattr(torch, dtype)),
    "step": lambda path, dtype, steps: step_child(Path(path), getattr(torch, dtype), int(steps)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, in one process, targets not checked")
    parser.add_argument("--steps", type=int, default=2, help="timed train steps per variant (after one warm-up)")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary checkpoints")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, *rest = json.loads(args.child)
        print(json.dumps(CHILDREN[name](*rest)))
        return 0

    native, why = native_bf16()
    dtype = "bfloat16" if native else "float32"
    steps = 1 if args.quick else args.steps
    work = Path(tempfile.mkdtemp(prefix="qlora_bench_", dir=args.dir))
    try:
        full, small = work / "full", work / "step"
        full.mkdir()
        small.mkdir()
        overrides = QUICK if args.quick else FULL
        start = time.perf_counter()
        weight_bytes = write_checkpoint(full, overrides)
        layers = min(STEP_LAYERS, 1 if args.quick else STEP_LAYERS)
        write_checkpoint(small, {**overrides, "num_hidden_layers": layers})
        print(f"checkpoint: {weight_bytes // 2:,} params, {weight_bytes / 1e9:.2f} GB bf16 "
              f"({'tiny, quick' if args.quick else 'Phi-3-mini-4k shapes'}), written in "
              f"{time.perf_counter() - start:.1f} s; compute dtype {dtype} ({why})"
              + f"; {torch.get_num_threads()} threads")

        quantized = run_child(["load", str(full), str(work / "nf4"), dtype], args.quick)
        reloaded = run_child(["load", str(work / "nf4"), "", dtype], args.quick)
        print(f"\nload (NF4, double-quantized scales; RSS = peak resident set / bf16 weight bytes {weight_bytes:,})")
        header = f"| {'load':<34} | {'seconds':>8} | {'peak RSS GB':>11} | {'RSS / bf16 weights':>18} |"
        print(header)
        print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
        for label, row in (("quantize at load (bf16 checkpoint)", quantized), ("saved 4-bit directory", reloaded)):
            print(f"| {label:<34} | {row['load_s']:>8.1f} | {row['rss'] / 1e9:>11.2f} | "
                  f"{row['rss'] / weight_bytes:>18.3f} |")
        print(f"model in memory: {quantized['bytes'] / 1e9:.2f} GB ({quantized['bytes'] / weight_bytes:.3f}x the bf16 "
              f"weights); save_pretrained of it: {quantized['save_s']:.1f} s", flush=True)

        print(f"\ntrain step: {layers} of {json.loads((full / 'config.json').read_text())['num_hidden_layers']} "
              f"decoder layers at full width, batch {BATCH} x seq {SEQ}, gradient checkpointing, r {R}, alpha "
              f"{ALPHA}, dropout {DROPOUT}, {dtype}; median of {steps} interleaved round(s) after one warm-up")
        header = f"| {'variant':<22} | {'step s':>8} | {'x ours bf16':>11} | {'first loss':>10} |"
        print(header)
        print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|", flush=True)
        labels = {"ours-bf16": "ours, bf16 base", "ours-nf4": "ours, NF4 base", "peft-nf4": "PEFT, bnb NF4 base"}
        results = run_child(["step", str(small), dtype, steps], args.quick)
        floor = results["ours-bf16"]["step_s"]
        for variant, row in results.items():
            print(f"| {labels[variant]:<22} | {row['step_s']:>8.2f} | {row['step_s'] / floor:>11.3f} | "
                  f"{row['loss0']:>10.4f} |", flush=True)

        rss_ratio = quantized["rss"] / weight_bytes
        step_ratio = results["ours-nf4"]["step_s"] / floor
        to_peft = results["ours-nf4"]["step_s"] / results["peft-nf4"]["step_s"]
        print(f"\npeak RSS of the 4-bit load: {rss_ratio:.3f}x the bf16 weights (must <= {RSS_LIMIT}x, goal "
              f"{RSS_GOAL}x)")
        print(f"NF4 step: {step_ratio:.3f}x our bf16 step (must <= {STEP_LIMIT}x, goal {STEP_GOAL}x); "
              f"{to_peft:.3f}x PEFT's QLoRA step (must be < 1)")
        if args.quick:
            print("quick mode: tiny config, in one process, targets not checked")
            return 0
        failures = [text for failed, text in (
            (rss_ratio > RSS_LIMIT, f"peak RSS {rss_ratio:.3f}x > {RSS_LIMIT}x"),
            (step_ratio > STEP_LIMIT, f"step {step_ratio:.3f}x > {STEP_LIMIT}x"),
            (to_peft >= 1.0, f"step {to_peft:.3f}x PEFT's, not faster"),
        ) if failed]
        goals = [text for missed, text in ((rss_ratio > RSS_GOAL, f"RSS goal {RSS_GOAL}x"),
                                           (step_ratio > STEP_GOAL, f"step goal {STEP_GOAL}x")) if missed]
        verdict = ("MISSED: " + "; ".join(failures)) if failures else "limits met"
        print(verdict + (f"; goals not met: {', '.join(goals)}" if goals else "; goals met"))
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
