"""A LoRA training step on a full-size Phi-3-mini: ours against transformers + PEFT, and against our floor.

Writes a Phi-3-mini-4k-shaped checkpoint (random bf16 weights, two shards, the Hub's names and shapes; the
writer of `phi3_load.py`) into a temporary directory on disk, then runs every row in a fresh process,
interleaved over repeats (the order of the two stacks alternates), and deletes the checkpoint. Rows:

- `forward`: our model's no-grad forward with the loss (the unit of the "three / two forwards" figures);
- `floor`: our frozen model without adapters, forward + backward to the embedding output, with the same
  checkpointing (the frozen model's whole backward: a LoRA step needs slightly less, not layer 0's input
  gradient);
- `lora`: `lora.phi3.from_pretrained` + `patch` with the training script's settings (r=16, alpha=32,
  dropout 0.05 on the four projections), `model.loss`, backward, fused AdamW on the adapters (the
  script's, and transformers' Trainer's default);
- `keep`: `lora` with selective recomputation (`model.checkpoint_keep` = qkv_proj, o_proj, gate_up_proj: each
  checkpointed layer keeps those outputs, so backward skips their frozen GEMMs), on the checkpointed rows: the
  trade-off of time against memory, reported beside full checkpointing (no target; PEFT has no counterpart);
- `peft`: transformers' `Phi3ForCausalLM` (SDPA attention) + PEFT's `get_peft_model` with the same
  LoRA settings (float32 adapters on the bf16 base, PEFT's default), as its users run it: non-reentrant
  checkpointing through `gradient_checkpointing_enable` plus `enable_input_require_grads`, the loss from
  `model(input_ids, labels=...)`, the same fused AdamW.

Each process times `--steps` steps after a first, untimed one, on one sequence (batch 1) of 128 or 512
tokens, with and without gradient checkpointing, and reports its peak RSS (the weights are counted once:
ours are memory-mapped views of the checkpoint files). Before the timed rows a float32 check with
dropout 0 compares the two stacks' losses on one 2-layer checkpoint of the same widths, with the same
adapter values, before and after one AdamW step.

On a CPU without native bf16 matmul (no `avx512_bf16` / `amx_bf16` flag) and without CUDA, bf16 GEMMs
are 15-70x slower than float32, so the comparison runs in float32 at full width with `--layers` layers
(default 4); the mode that ran and why is printed, and the targets hold in either mode.

    python benchmarks/fullsize.py                 # about 25 minutes on 2 cores, 7.6 GB of disk
    python benchmarks/fullsize.py --rows 128      # only the seq-128 rows
    python benchmarks/fullsize.py --quick         # tiny widths, one repeat, no targets checked
    python benchmarks/fullsize.py --device cuda   # the same comparison on a GPU, in bf16
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from phi3_load import FULL, QUICK, _filesystem, write_checkpoint  # noqa: E402

R, ALPHA, DROPOUT = 16, 32, 0.05  # the training script's defaults
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
KEEP = ("qkv_proj", "o_proj", "gate_up_proj")  # the `keep` rows' selective recomputation
LR = 1e-4
# Targets, in whichever mode runs (see the issue that set them: docs/performance.md).
MIN_SPEEDUP_VS_PEFT = 1.25  # ours' tokens/s over PEFT's, every training row
MAX_OVER_FLOOR = 1.05  # ours' step time over our floor's, every training row
MAX_FLOOR_OVER_FORWARDS = {True: 1.10, False: 1.15}  # floor over 3 (checkpointing) / 2 forwards
MAX_RSS = {(128, True): 1.10, (512, True): 1.15}  # peak RSS / weight bytes, ours with checkpointing
LOSS_TOLERANCE = 1e-5


def native_bf16() -> tuple[bool, str]:
    """Whether this machine multiplies bf16 natively, and the reason, from CUDA or /proc/cpuinfo's flags."""
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if found:
        return True, f"CPU flags {', '.join(found)}"
    return False, "no avx512_bf16 or amx_bf16 CPU flag and no CUDA: bf16 matmuls would be emulated"


# ---- the child process: one stack, one row ----

def seeded_adapters(pairs: list[tuple[str, torch.Tensor, torch.Tensor]], b_std: float = 0.01) -> None:
    """Give every (A, B) the same values in both stacks: drawn from a generator seeded per module name (B
    normal with std `b_std`, zero for 0)."""
    for name, a, b in pairs:
        generator = torch.Generator().manual_seed(sum(name.encode()) * 1000 + len(name))
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=generator) * b_std)


def _load_ours(path: Path, dtype: torch.dtype, device: str, row: str, dropout: float, ckpt: bool):
    import lora
    from lora.phi3 import from_pretrained, patch

    model = from_pretrained(path, dtype=dtype, device=device)
    model.requires_grad_(False)
    model.gradient_checkpointing = ckpt
    if row == "floor":
        # Backward reaches the embedding output and stops: the frozen model's whole backward, no adapters.
        model.model.embed_tokens.register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
    if row == "keep":
        model.checkpoint_keep = KEEP
    if row in ("lora", "keep", "check"):
        patch(model, r=R, lora_alpha=ALPHA, lora_dropout=dropout, targets=TARGETS)
        seeded_adapters([(n, m.lora_A, m.lora_B) for n, m in model.named_modules() if isinstance(m, lora.Linear)])
    model.train()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return model.loss(ids, ids)

    return model, loss


def _load_peft(path: Path, dtype: torch.dtype, device: str, row: str, dropout: float, ckpt: bool):
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.Phi3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                        device_map=device)
    base.config.use_cache = False
    if ckpt:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=list(TARGETS),
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    prefix = "base_model.model."
    seeded_adapters([(n.removeprefix(prefix), m.lora_A["default"].weight, m.lora_B["default"].weight)
                      for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A])
    model.train()

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    return model, loss


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: load, one untimed and `steps` timed steps; print timings, losses, RSS as JSON."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    dropout = 0.0 if args.row == "check" else DROPOUT
    load = _load_peft if args.impl == "peft" else _load_ours
    start = time.perf_counter()
    model, loss_fn = load(args.path, dtype, args.device, args.row, dropout, args.ckpt)
    load_s = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True) if params else None  # as the training script
    vocab = json.loads((args.path / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (1, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)

    def step() -> float:
        if args.row == "forward":
            with torch.no_grad():
                return float(loss_fn(ids))
        loss = loss_fn(ids)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def synced() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    losses, times = [], []
    for i in range(args.steps + 1):
        synced()
        t = time.perf_counter()
        losses.append(step())
        synced()
        if i > 0:
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    print(json.dumps({"load_s": load_s, "times": times, "losses": losses, "peak": peak}))


# ---- the parent: checkpoint, interleaved rows, report ----

def _run(impl: str, row: str, path: Path, dtype: str, device: str, seq: int, ckpt: bool, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--row", row, "--path", str(path), "--dtype", dtype,
           "--device", device, "--seq", str(seq), "--steps", str(steps)] + (["--ckpt"] if ckpt else [])
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{impl} {row} seq {seq} ckpt {ckpt} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny widths, one repeat, no targets checked")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every row")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process, after an untimed one")
    parser.add_argument("--rows", choices=("128", "512", "all"), default="all", help="sequence lengths to run")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: 32 in bf16, 4 in the float32 fallback)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="weights' dtype (default: bfloat16 where the machine has native bf16)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary checkpoint")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="reuse this checkpoint directory (kept) instead of writing one")
    parser.add_argument("--child", choices=("lora", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--row", choices=("forward", "floor", "lora", "keep", "check"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.impl = args.child
        child(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")

    native, why = native_bf16()
    dtype = args.dtype or ("bfloat16" if native else "float32")
    layers = args.layers or (2 if args.quick else 32 if dtype == "bfloat16" else 4)
    widths = QUICK if args.quick else FULL
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)
    seqs = {"128": (128,), "512": (512,), "all": (128, 512)}[args.rows]
    if args.quick:
        seqs = (16,)
    print(f"mode: {dtype}, {layers} layers at {'tiny' if args.quick else 'full'} width, {args.device}: "
          f"{'native bf16 (' + why + ')' if native else why}; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")

    work = Path(tempfile.mkdtemp(prefix="fullsize_", dir=args.dir))
    try:
        fstype = _filesystem(work.resolve())
        if fstype in ("tmpfs", "ramfs") and not args.quick and args.checkpoint is None:
            raise SystemExit(f"{work} is on {fstype}; pass --dir on a real disk (the checkpoint is 7.6 GB)")
        start = time.perf_counter()
        root = args.checkpoint
        if root is None:
            root = work / "checkpoint"
            root.mkdir()
            write_checkpoint(root, {**widths, "num_hidden_layers": layers})
        config = json.loads((root / "config.json").read_text())
        weight_bytes = sum(p.stat().st_size for p in root.glob("*.safetensors"))
        weight_bytes = weight_bytes * (2 if dtype == "float32" else 1)  # the files hold bf16
        check_root = work / "check"
        check_root.mkdir()
        write_checkpoint(check_root, {**widths, "num_hidden_layers": 2})
        print(f"checkpoint: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
              f"{weight_bytes / 1e9:.2f} GB in {dtype}, {fstype}; written in {time.perf_counter() - start:.0f} s")

        # Equal maths first: float32, dropout 0, the same adapter values, two steps.
        check = {impl: _run(impl, "check", check_root, "float32", args.device, 128 if not args.quick else 16,
                            False, 1)["losses"] for impl in ("lora", "peft")}
        gap = max(abs(a - b) for a, b in zip(check["lora"], check["peft"], strict=True))
        print(f"float32 check (2 layers, dropout 0): losses ours {check['lora']}, peft {check['peft']}: "
              f"max |diff| {gap:.2e} (must be <= {LOSS_TOLERANCE:g})")
        shutil.rmtree(check_root)

        plan = [("forward", "lora", s, False) for s in seqs]
        plan += [(row, impl, s, c) for s in seqs for c in (True, False) for row, impl in
                 (("floor", "lora"), ("lora", "lora"), ("lora", "peft"))]
        plan += [("keep", "lora", s, True) for s in seqs]
        results: dict[tuple[str, str, int, bool], list[dict]] = {key: [] for key in plan}
        for rep in range(repeats):
            for key in plan if rep % 2 == 0 else plan[::-1]:  # alternate who goes first
                row, impl, seq, ckpt = key
                results[key].append(_run(impl, row, root, dtype, args.device, seq, ckpt, steps))
                times = results[key][-1]["times"]
                print(f"  [{rep + 1}/{repeats}] {row:<7} {impl:<4} seq {seq:<4} ckpt {ckpt!s:<5} "
                      f"step {statistics.median(times):.2f} s", flush=True)

        def times(key: tuple[str, str, int, bool]) -> list[float]:
            return [t for r in results[key] for t in r["times"]]

        def peak(key: tuple[str, str, int, bool]) -> float:
            return max(r["peak"] for r in results[key]) / weight_bytes

        unit = "peak CUDA memory" if args.device == "cuda" else "peak RSS"
        print(f"\nstep seconds: median (min-max) over {repeats} process(es) x {steps} step(s); "
              f"{unit} as a multiple of the weights ({weight_bytes / 1e9:.2f} GB)")
        header = (f"{'seq':>4} {'ckpt':<5} {'floor s':>18} {'ours s':>18} {'peft s':>18} {'ours tok/s':>11} "
                  f"{'peft tok/s':>11} {'ours/peft':>10} {'ours/floor':>11} {'RSS ours':>9} {'RSS peft':>9}")
        print(header)
        print("-" * len(header))
        failures = []
        for seq in seqs:
            for ckpt in (True, False):
                floor, ours, peft = (times((row, impl, seq, ckpt)) for row, impl in
                                     (("floor", "lora"), ("lora", "lora"), ("lora", "peft")))
                speedup = statistics.median(peft) / statistics.median(ours)
                over_floor = statistics.median(ours) / statistics.median(floor)
                rss_ours, rss_peft = peak(("lora", "lora", seq, ckpt)), peak(("lora", "peft", seq, ckpt))
                print(f"{seq:>4} {ckpt!s:<5} {_spread(floor):>18} {_spread(ours):>18} {_spread(peft):>18} "
                      f"{seq / statistics.median(ours):>11.1f} {seq / statistics.median(peft):>11.1f} "
                      f"{speedup:>9.3f}x {over_floor:>10.3f}x {rss_ours:>8.3f}x {rss_peft:>8.3f}x")
                if speedup < MIN_SPEEDUP_VS_PEFT:
                    failures.append(f"seq {seq} ckpt {ckpt}: {speedup:.3f}x PEFT's tokens/s "
                                    f"(target >= {MIN_SPEEDUP_VS_PEFT}x)")
                if over_floor > MAX_OVER_FLOOR:
                    failures.append(f"seq {seq} ckpt {ckpt}: {over_floor:.3f}x our floor (target <= {MAX_OVER_FLOOR}x)")
                rss_target = MAX_RSS.get((seq, ckpt))
                if rss_target is not None and rss_ours > rss_target:
                    failures.append(f"seq {seq} ckpt {ckpt}: peak {rss_ours:.3f}x weights (target <= {rss_target}x)")
                if not ckpt and rss_ours >= rss_peft:
                    failures.append(f"seq {seq} no ckpt: peak {rss_ours:.3f}x weights, "
                                    f"not below PEFT's {rss_peft:.3f}x")
        print(f"\nselective recomputation (ours, checkpoint_keep={','.join(KEEP)}) against full checkpointing:")
        for seq in seqs:
            kept, full = times(("keep", "lora", seq, True)), times(("lora", "lora", seq, True))
            peft = times(("lora", "peft", seq, True))
            print(f"seq {seq}: step {_spread(kept)} s = {statistics.median(kept) / statistics.median(full):.3f}x full "
                  f"checkpointing's, {statistics.median(peft) / statistics.median(kept):.3f}x PEFT's tokens/s; peak "
                  f"RSS {peak(('keep', 'lora', seq, True)):.3f}x the weights (full checkpointing "
                  f"{peak(('lora', 'lora', seq, True)):.3f}x, none {peak(('lora', 'lora', seq, False)):.3f}x)")
        print()
        for seq in seqs:
            forward = statistics.median(times(("forward", "lora", seq, False)))
            for ckpt, count in ((True, 3), (False, 2)):
                floor = statistics.median(times(("floor", "lora", seq, ckpt)))
                ratio = floor / (count * forward)
                target = MAX_FLOOR_OVER_FORWARDS[ckpt]
                print(f"seq {seq}: no-grad forward {forward:.2f} s; floor {'with' if ckpt else 'without'} "
                      f"checkpointing {floor:.2f} s = {ratio:.3f}x {count} forwards (target <= {target}x)")
                if ratio > target:
                    failures.append(f"seq {seq} ckpt {ckpt}: floor {ratio:.3f}x {count} forwards (target <= {target}x)")
        if gap > LOSS_TOLERANCE:
            failures.append(f"float32 losses differ from PEFT's by {gap:.2e}")
        if args.quick:
            print("quick mode: tiny widths, targets not checked")
            return 0 if gap <= LOSS_TOLERANCE else 1
        if failures:
            print("MISSED:\n  " + "\n  ".join(failures))
            return 1
        print("all targets met")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
