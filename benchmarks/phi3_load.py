"""Load time and peak memory of `lora.phi3.from_pretrained` on a full-size Phi-3-mini, against transformers.

Writes a Phi-3-mini-4k-shaped checkpoint (3,821,079,552 parameters, random bf16 weights, 7.64 GB, two shards,
the Hub's names and shapes) into a temporary directory on disk, streaming one tensor at a time, then
measures each loader in a fresh process: load time, load + first 128-token forward, and peak RSS as a
multiple of the weights' bytes; cold (files evicted from the page cache first) and warm, interleaved over
repeats. The checkpoint is deleted at the end.

    python benchmarks/phi3_load.py            # full size, a few minutes and 7.6 GB of disk
    python benchmarks/phi3_load.py --quick    # tiny config, one repeat, no targets checked
"""

from __future__ import annotations

import argparse
import json
import os
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

from lora.phi3 import Phi3Config, Phi3ForCausalLM  # noqa: E402

FULL = {"sliding_window": 2047, "dtype": "bfloat16"}  # Phi-3-mini-4k-instruct: the defaults plus these
QUICK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "dtype": "bfloat16",
}
HUB_SHARD_BYTES = 5 * 10**9  # the Hub's mini shards: 4.97 GB + 2.67 GB
TARGET_RSS = 1.05
IMPLS = ("lora", "transformers")


def _filesystem(path: Path) -> str:
    """Type of the filesystem holding `path`, from the longest matching mount point."""
    best, fstype = "", "?"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mount, kind = line.split()[1], line.split()[2]
        if str(path).startswith(mount) and len(mount) > len(best):
            best, fstype = mount, kind
    return fstype


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """8-byte length plus JSON header for BF16 tensors stored back to back, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_checkpoint(root: Path, overrides: dict) -> int:
    """Write config, generation config and two bf16 shards, one random tensor at a time; return the bytes."""
    config = Phi3Config(**overrides)
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in Phi3ForCausalLM(config).named_parameters()]
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    # Two shards at every size, as the Hub's mini: the first up to 5 GB (or half), the second the rest.
    limit = min(HUB_SHARD_BYTES, total // 2)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[], []]
    size = 0
    for name, shape in shapes:
        size += 2 * torch.Size(shape).numel()
        shards[0 if size <= limit and not shards[1] else 1].append((name, shape))
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, entries in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with open(root / file_name, "wb") as f:
            f.write(_safetensors_header(entries))
            for name, shape in entries:
                if name.endswith("norm.weight"):
                    tensor = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    tensor = torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)
                f.write(tensor.view(torch.uint8).numpy().data)
                weight_map[name] = file_name
            f.flush()
            os.fsync(f.fileno())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (root / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}
    (root / "generation_config.json").write_text(json.dumps(generation))
    return total


def _evict(root: Path) -> None:
    for path in root.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm(root: Path) -> None:
    for path in root.iterdir():
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def child(impl: str, path: Path, tokens: int, logits_out: Path) -> None:
    """Runs in a fresh process: load, one forward, print timings and peak RSS as JSON."""
    if impl == "transformers":
        import transformers

        def load() -> torch.nn.Module:
            return transformers.Phi3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

        def forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return model(ids, use_cache=False).logits
    else:
        from lora.phi3 import from_pretrained

        def load() -> torch.nn.Module:
            return from_pretrained(path)

        def forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return model(ids)

    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    model = load()
    loaded = time.perf_counter()
    with torch.inference_mode():
        logits = forward(model, ids)
    done = time.perf_counter()
    torch.save(logits[0, -1].float().clone(), logits_out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"load_s": loaded - start, "total_s": done - start, "rss": peak, "rss_before": rss_before}))


def _run_child(impl: str, root: Path, tokens: int, logits_out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--path", str(root), "--tokens", str(tokens)]
    cmd += ["--logits", str(logits_out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{impl} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, one repeat, no targets checked")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every measurement")
    parser.add_argument("--tokens", type=int, default=128, help="length of the first forward")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary checkpoint")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.tokens, args.logits)
        return 0

    repeats = 1 if args.quick else args.repeats
    work = Path(tempfile.mkdtemp(prefix="phi3_load_", dir=args.dir))
    try:
        fstype = _filesystem(work.resolve())
        if fstype in ("tmpfs", "ramfs") and not args.quick:
            raise SystemExit(f"{work} is on {fstype}; pass --dir on a real disk (cold reads would be free)")
        root = work / "checkpoint"
        root.mkdir()
        start = time.perf_counter()
        weight_bytes = write_checkpoint(root, QUICK if args.quick else FULL)
        params = weight_bytes // 2
        print(
            f"checkpoint: {params:,} params, {weight_bytes / 1e9:.2f} GB bf16, "
            f"{len(list(root.glob('*.safetensors')))} shards, {fstype} at {root}, "
            f"written in {time.perf_counter() - start:.1f} s"
        )
        runs: dict[tuple[str, str], list[dict]] = {(i, m): [] for i in IMPLS for m in ("cold", "warm")}
        for rep in range(repeats):
            order = IMPLS if rep % 2 == 0 else IMPLS[::-1]  # alternate who goes first
            for mode in ("cold", "warm"):
                for impl in order:
                    if mode == "cold":
                        _evict(root)
                    else:
                        _warm(root)
                    logits = work / f"{impl}.pt"
                    runs[impl, mode].append(_run_child(impl, root, args.tokens, logits))
        diff = (torch.load(work / "lora.pt") - torch.load(work / "transformers.pt")).abs().max().item()

        print(f"\nmedian of {repeats} run(s) each; RSS = peak resident set / weight bytes ({weight_bytes:,})")
        header = f"{'loader':<13}{'cache':<7}{'load s':>9}{'load+fwd s':>12}{'peak RSS GB':>13}{'RSS/weights':>13}"
        print(header)
        print("-" * len(header))
        summary = {}
        for (impl, mode), results in runs.items():
            load = statistics.median(r["load_s"] for r in results)
            total = statistics.median(r["total_s"] for r in results)
            rss = max(r["rss"] for r in results)
            summary[impl, mode] = (total, rss / weight_bytes)
            print(f"{impl:<13}{mode:<7}{load:>9.2f}{total:>12.2f}{rss / 1e9:>13.2f}{rss / weight_bytes:>13.3f}")
        print(f"\nlast-token logits, lora vs transformers: max |diff| = {diff:.3g}")
        failures = []
        for mode in ("cold", "warm"):
            ratio = summary["lora", mode][0] / summary["transformers", mode][0]
            print(f"load+forward {mode}: lora / transformers = {ratio:.2f}x (target <= 1.00x)")
            if ratio > 1.0:
                failures.append(f"load+forward {mode} {ratio:.2f}x transformers")
        rss_ratio = max(summary["lora", m][1] for m in ("cold", "warm"))
        print(f"peak RSS lora: {rss_ratio:.3f}x weights (target <= {TARGET_RSS:.2f}x)")
        if rss_ratio > TARGET_RSS:
            failures.append(f"peak RSS {rss_ratio:.3f}x weights")
        if args.quick:
            print("quick mode: tiny config, targets not checked")
            return 0
        if failures:
            print("MISSED: " + "; ".join(failures))
            return 1
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
