"""Forward + backward of one LoRA linear layer at Phi-3-mini's shapes, against the frozen layer.

Times `y = layer(x); y.backward(dy)` with the input requiring grad and the base frozen, for:

- `floor`: the frozen `nn.Linear` alone (forward + input gradient);
- `lora`: `lora.Linear` (and `lora.MergedLinear` with q|k|v slices on the fused qkv shape);
- `peft`: PEFT's LoRA layer via `get_peft_model` (float32 adapters, as PEFT makes them);
- `loralib`: loralib 0.1.2's `Linear` / `MergedLinear` (its adapters take the base's dtype);
- `lora dora` / `peft dora`: DoRA (`use_dora=True`) in each, compared with each other;
- with `--dora-routes` (float32 with dropout): `lora dora sparse` / `lora dora gemm`, our DoRA layer forced onto
  each of its two ways of computing `W drop(x)` (lora.lowrank: from `W x` and the dropped elements, or a second
  frozen GEMM), compared with each other: what the route's bounds (rows, dropout rate) rest on.

Variants run interleaved, round after round (each round starting at the next variant), so the machine's
noise hits them alike; each cell is the median over rounds of the ratio to the floor's time in the same
round, with the spread (25th-75th percentile of those ratios) and a 95% confidence interval for that median
(distribution-free, from order statistics). A target counts as met only when the whole interval is under it,
missed when the whole interval is over it, and undecided otherwise; the comparisons with PEFT and loralib
(`x peft`, `x loralib`) are read the same way from the per-round ratio of the two layers' times.
`saved MB` is what a layer keeps for backward beyond the floor: the tensors autograd saves, counted once
per storage, not counting the input or the parameters.

    python benchmarks/lora_linear.py            # full: 512 tokens, r=16, alpha=32, float32 (+ bf16, + a float32
                                                # layer under bf16 autocast, where the CPU has bf16 matmul)
    python benchmarks/lora_linear.py --quick    # tiny shapes, a few rounds: checks it runs
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

import lora
import lora.lowrank as lowrank

PHI3_MINI_SHAPES = [("qkv_proj", 3072, 9216), ("o_proj", 3072, 3072), ("gate_up_proj", 3072, 16384),
                    ("down_proj", 8192, 3072)]
QUICK_SHAPES = [("qkv_proj", 64, 192), ("o_proj", 64, 64), ("gate_up_proj", 64, 256), ("down_proj", 128, 64)]
PEERS = ("peft", "loralib")  # the other LoRA layers each variant's time is compared with, round by round
# a DoRA layer is compared with PEFT's DoRA layer (shown in the x peft column); it has no loralib twin
PEER_VARIANT = {"lora dora": {"peft": "peft dora"}, "peft dora": {"peft": "peft dora"},
                "lora dora sparse": {"gemm route": "lora dora gemm"}, "lora dora gemm": {}}
# --dora-routes: lora.lowrank's bounds of the sparse route, set for the duration of each forced variant's step
FORCED_ROUTES = {"lora dora sparse": {"SPARSE_DROPPED_PRODUCT_MIN_ROWS": 0, "SPARSE_DROPPED_PRODUCT_MAX_P": 1.0},
                 "lora dora gemm": {"SPARSE_DROPPED_PRODUCT_MIN_ROWS": 1 << 62}}
DORA_TARGET, DORA_SPEEDUP = 1.15, 1.5  # DoRA at most 1.15x the floor, at least 1.5x faster than PEFT's DoRA
# Each mode: (label, dtype of the layer and its input, autocast dtype or None). The autocast mode is what
# `Trainer(bf16=True)` runs: a float32 layer and input, forward under torch.autocast("cpu", torch.bfloat16).
AUTOCAST_BF16 = "float32 autocast-bf16"
MODES = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None),
         AUTOCAST_BF16: (torch.float32, torch.bfloat16)}
TARGETS = {  # (mode, dropout) -> the most lora/floor may be; under autocast the GEMMs run in bf16, as in bfloat16
    ("float32", True): 1.10, ("float32", False): 1.05,
    ("bfloat16", True): 1.30, ("bfloat16", False): 1.12,
    (AUTOCAST_BF16, True): 1.30, (AUTOCAST_BF16, False): 1.12,
}


class _Holder(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@contextlib.contextmanager
def forced_route(variant: str) -> Iterator[None]:
    """For a `--dora-routes` variant, lora.lowrank's route bounds set to force its route; else nothing."""
    saved = {name: getattr(lowrank, name) for name in FORCED_ROUTES.get(variant, {})}
    for name, value in FORCED_ROUTES.get(variant, {}).items():
        setattr(lowrank, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(lowrank, name, value)


def build_variants(base: nn.Linear, name: str, r: int, alpha: int, p: float,
                   dora_routes: bool = False) -> dict[str, nn.Module]:
    dtype = base.weight.dtype
    in_f, out_f = base.in_features, base.out_features
    variants: dict[str, nn.Module] = {"floor": base}
    variants["lora"] = lora.Linear.from_module(base, r=r, lora_alpha=alpha, lora_dropout=p, merge_weights=False)
    dora = ["lora dora"] + (list(FORCED_ROUTES) if dora_routes else [])
    for key in dora:
        variants[key] = lora.Linear.from_module(base, r=r, lora_alpha=alpha, lora_dropout=p, merge_weights=False,
                                                use_dora=True)
    if name == "qkv_proj":
        third = out_f // 3
        variants["lora merged"] = lora.MergedLinear.from_module(
            base, (third, third, third), r=r, lora_alpha=alpha, lora_dropout=p, merge_weights=False)
    try:
        import peft

        for key, use_dora in (("peft", False), ("peft dora", True)):
            config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], use_dora=use_dora)
            holder = _Holder(nn.Linear(in_f, out_f, bias=False, dtype=dtype, device="meta"))
            holder.proj.weight = base.weight
            variants[key] = peft.get_peft_model(holder, config)
    except ImportError:
        pass
    try:
        import loralib

        ll = loralib.Linear(in_f, out_f, r=r, lora_alpha=alpha, lora_dropout=p, merge_weights=False, bias=False,
                            device="meta")
        ll.weight = base.weight
        ll.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=dtype).uniform_(-in_f**-0.5, in_f**-0.5))
        ll.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=dtype))
        variants["loralib"] = ll
        if name == "qkv_proj":
            lm = loralib.MergedLinear(in_f, out_f, r=r, lora_alpha=alpha, lora_dropout=p, enable_lora=[True] * 3,
                                      merge_weights=False, bias=False, device="meta")
            lm.weight = base.weight
            lm.lora_A = nn.Parameter(torch.empty(3 * r, in_f, dtype=dtype).uniform_(-in_f**-0.5, in_f**-0.5))
            lm.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=dtype))
            lm.lora_ind = torch.ones(out_f, dtype=torch.bool)
            variants["loralib merged"] = lm
    except ImportError:
        pass
    for module in variants.values():
        module.train()
        for pname, param in module.named_parameters():
            param.requires_grad = "lora_" in pname  # PEFT's DoRA magnitude: lora_magnitude_vector
    return variants


def saved_bytes(step_forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward after one forward, once per storage, `exclude` (inputs, parameters)
    not counted. Also used by train_step.py."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step_forward()
    del out
    return total


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median: the k-th smallest and k-th largest values, with
    k the largest count such that Binomial(n, 1/2) <= k - 1 has probability at most (1 - confidence) / 2.
    With too few values for that confidence, the whole range."""
    ordered, n = sorted(values), len(values)
    tail, k = 0.0, 0
    while tail + math.comb(n, k) / 2**n <= (1 - confidence) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else (ordered[0], ordered[-1])


def bf16_is_slow(tokens: int) -> float:
    """How much slower a frozen bf16 layer is than float32 here (CPUs without bf16 matmul units)."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = nn.Linear(1024, 1024, bias=False, dtype=dtype).requires_grad_(False)
        x = torch.randn(tokens, 1024, dtype=dtype, requires_grad=True)
        base(x).sum().backward()
        start = time.perf_counter()
        base(x).sum().backward()
        times[dtype] = time.perf_counter() - start
    return times[torch.bfloat16] / times[torch.float32]


def run(mode: str, shapes, tokens: int, rounds: int, r: int, alpha: int, dropouts=(0.05, 0.0),
        dora_routes: bool = False) -> list[dict]:
    dtype, autocast = MODES[mode]

    def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if autocast is None:
            return module(x)
        # In a model every projection's input is an activation, not a leaf: autocast caches its casts of leaf
        # tensors only (meant for weights), so a layer that casts its input twice pays twice there. A view
        # of x is such an input, at no cost.
        with torch.autocast("cpu", dtype=autocast):
            return module(x.view_as(x))

    rows = []
    for p in dropouts:
        for name, in_f, out_f in shapes:
            torch.manual_seed(0)
            base = nn.Linear(in_f, out_f, bias=False, dtype=dtype).requires_grad_(False)
            # the routes differ only where the compute dtype is float32 and there is dropout
            variants = build_variants(base, name, r, alpha, p, dora_routes and autocast is None and p > 0
                                      and dtype == torch.float32)
            x = torch.randn(tokens, in_f, dtype=dtype, requires_grad=True)
            dy = torch.randn(tokens, out_f, dtype=autocast or dtype)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for key, module in variants.items():  # warm-up
                with forced_route(key):
                    forward(module, x).backward(dy)
            order = list(variants.items())
            for i in range(rounds):
                # each round starts at a different variant, so no one always runs right after the same other
                for key, module in order[i % len(order):] + order[:i % len(order)]:
                    with forced_route(key):
                        start = time.perf_counter()
                        forward(module, x).backward(dy)
                        times[key].append(time.perf_counter() - start)
            floor_saved = saved_bytes(lambda m=base, x=x: forward(m, x), [x, base.weight])
            for key, module in variants.items():
                ratios = [t / f for t, f in zip(times[key], times["floor"], strict=True)]
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                # per-round ratios to each peer's plain LoRA layer, paired within a round like the floor's
                peers = PEER_VARIANT.get(key, {peer: peer for peer in PEERS})
                to_peer = {peer: [t / f for t, f in zip(times[key], times[twin], strict=True)]
                           for peer, twin in peers.items() if twin in times}
                with forced_route(key):
                    saved = saved_bytes(lambda m=module, x=x: forward(m, x), [x, *module.parameters()]) - floor_saved
                rows.append(dict(dtype=mode, dropout=p, shape=f"{name} {in_f}->{out_f}",
                                 variant=key, ms=statistics.median(times[key]) * 1e3,
                                 ratio=statistics.median(ratios), ci=median_ci(ratios),
                                 spread=(q[0], q[2]), saved_mb=saved / 2**20,
                                 to_peer={peer: (statistics.median(v), median_ci(v)) for peer, v in to_peer.items()}))
    return rows


def _verdict(ci: tuple[float, float], limit: float, under: str, over: str, strict: bool = False) -> str:
    # strict: "faster" needs the whole interval below 1; a target ("at most 1.10x") may be reached exactly
    below = ci[1] < limit if strict else ci[1] <= limit
    return under if below else over if ci[0] > limit else "undecided"


def print_table(rows: list[dict], check: bool) -> None:
    print("| dtype | dropout | shape | variant | median ms | x floor | 95% CI | spread (IQR) | x peft | x loralib "
          "| saved MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        vs = {peer: f"{row['to_peer'][peer][0]:.3f}" if peer in row["to_peer"] and row["variant"] != "floor" else ""
              for peer in PEERS}
        print(f"| {row['dtype']} | {row['dropout']} | {row['shape']} | {row['variant']} | {row['ms']:.1f} | "
              f"{row['ratio']:.3f} | {row['ci'][0]:.3f}-{row['ci'][1]:.3f} | "
              f"{row['spread'][0]:.3f}-{row['spread'][1]:.3f} | {vs['peft']} | {vs['loralib']} | "
              f"{row['saved_mb']:.1f} |")
    routes = [row for row in rows if row["variant"] == "lora dora sparse"]
    if routes:
        print()
    for row in routes:  # no target: what the route's bounds in lora.lowrank rest on
        ratio, ci = row["to_peer"]["gemm route"]
        verdict = _verdict(ci, 1.0, "faster", "SLOWER", strict=True)
        print(f"{row['dtype']} dropout {row['dropout']} {row['shape']}: DoRA's sparse route {ratio:.3f}x the GEMM "
              f"route's time (95% CI {ci[0]:.3f}-{ci[1]:.3f}): {verdict}")
    if not check:
        return
    print()
    for row in rows:
        if row["variant"] not in ("lora", "lora dora"):
            continue
        dora = row["variant"] == "lora dora"
        target = DORA_TARGET if dora else TARGETS[(row["dtype"], row["dropout"] > 0)]
        line = (f"{row['dtype']} dropout {row['dropout']} {row['shape']}: {row['variant']} {row['ratio']:.3f}x floor "
                f"(95% CI {row['ci'][0]:.3f}-{row['ci'][1]:.3f}), target {target:.2f}x: "
                f"{_verdict(row['ci'], target, 'meets', 'MISSES')}")
        for peer, (ratio, ci) in row["to_peer"].items():
            if dora:  # at least DORA_SPEEDUP times faster: the whole interval at or below its inverse
                line += (f"; {ratio:.3f}x {peer} dora's time (95% CI {ci[0]:.3f}-{ci[1]:.3f}), target "
                         f"{1 / DORA_SPEEDUP:.3f}x: {_verdict(ci, 1 / DORA_SPEEDUP, 'meets', 'MISSES')}")
            else:
                line += (f"; {ratio:.3f}x {peer}'s time (95% CI {ci[0]:.3f}-{ci[1]:.3f}): "
                         f"{_verdict(ci, 1.0, 'faster', 'SLOWER', strict=True)}")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds; no targets checked")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--shapes", default="all",
                        help="comma-separated shape names to run (qkv_proj,o_proj,gate_up_proj,down_proj)")
    parser.add_argument("--dropouts", default="0.05,0.0", help="comma-separated dropout rates")
    parser.add_argument("--dora-routes", action="store_true",
                        help="also time our DoRA layer forced onto each of its two routes for W drop(x) (float32 "
                             "with dropout), against each other")
    parser.add_argument("--dtypes", default="auto",
                        help=f"comma-separated modes ({','.join(MODES)}); 'auto' runs all of them but skips the "
                             "bf16 ones on CPUs where a bf16 matmul is over 3x slower than float32")
    args = parser.parse_args()
    shapes, tokens, rounds = (QUICK_SHAPES, 32, 3) if args.quick else (PHI3_MINI_SHAPES, args.tokens, args.rounds)
    if args.shapes != "all":
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {name for name, _, _ in shapes})
        if unknown:
            parser.error(f"unknown shape(s) {unknown}; expected some of {[name for name, _, _ in shapes]}")
        shapes = [shape for shape in shapes if shape[0] in wanted]
    dropouts = tuple(float(p) for p in args.dropouts.split(","))
    if args.dtypes == "auto":
        modes = list(MODES)
        if not args.quick:
            slowdown = bf16_is_slow(tokens)
            if slowdown > 3:
                modes = ["float32"]
                print(f"bfloat16 and {AUTOCAST_BF16} skipped: on this CPU a frozen bf16 nn.Linear step takes "
                      f"{slowdown:.1f}x the float32 one (no bf16 matmul units); pass --dtypes "
                      f"'{','.join(MODES)}' to run them anyway\n")
            else:
                print(f"modes {', '.join(modes)}: a frozen bf16 nn.Linear step takes {slowdown:.1f}x the float32 "
                      "one here (bf16 runs natively)\n")
    else:
        modes = args.dtypes.split(",")
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            parser.error(f"unknown mode(s) {unknown}; expected some of {list(MODES)}")
    r, alpha = (4, 8) if args.quick else (16, 32)
    print(f"{tokens} tokens, r={r}, alpha={alpha}, {rounds} interleaved rounds, {torch.get_num_threads()} threads\n")
    rows = []
    for mode in modes:
        rows += run(mode, shapes, tokens, rounds, r=r, alpha=alpha, dropouts=dropouts, dora_routes=args.dora_routes)
    print_table(rows, check=not args.quick)


if __name__ == "__main__":
    main()
