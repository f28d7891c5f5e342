"""benchmarks/lora_linear.py --quick runs and prints every variant, so the benchmark cannot rot.

(benchmarks/phi3_load.py and benchmarks/train_step.py have their own tests.)
"""

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_lora_linear_quick_mode_prints_every_variant():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_linear.py"), "--quick", "--dora-routes"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ")]
    routes = {"lora dora sparse", "lora dora gemm"}  # --dora-routes: float32 with dropout only
    for mode in ("float32", "bfloat16", "float32 autocast-bf16"):  # autocast: what Trainer(bf16=True) runs
        of_mode = [row for row in rows if row[0] == f"| {mode}"]
        variants = {"floor", "lora", "lora merged", "lora dora", "peft", "peft dora", "loralib", "loralib merged"}
        assert variants <= {row[3] for row in of_mode}
        assert len({row[2] for row in of_mode}) == 4  # the four Phi-3 projection shapes
        with_routes = {(row[1], row[2]) for row in of_mode if row[3] in routes}
        assert with_routes == ({("0.05", row[2]) for row in of_mode} if mode == "float32" else set())
    compared = [line for line in result.stdout.splitlines() if "DoRA's sparse route" in line]
    assert len(compared) == 4 and all(line.startswith("float32 dropout 0.05 ") for line in compared)


def _lora_linear_module():
    spec = importlib.util.spec_from_file_location("lora_linear_bench", ROOT / "benchmarks" / "lora_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("n", "ranks"), [(5, (1, 5)), (6, (1, 6)), (9, (2, 8)), (40, (14, 27)), (100, (40, 61))])
def test_median_ci_is_the_order_statistics_of_the_binomial_table(n, ranks):
    # ranks from the standard table for a 95% distribution-free interval of the median (n = 5, 6: the whole range)
    values = [float(v) for v in random.Random(n).sample(range(1, n + 1), n)]
    assert _lora_linear_module().median_ci(values) == (float(ranks[0]), float(ranks[1]))


def test_verdicts_need_the_whole_interval_on_one_side(capsys):
    bench = _lora_linear_module()

    def row(dropout, ci, to_peft, to_loralib):
        return dict(dtype="float32", dropout=dropout, shape="o_proj 8->8", variant="lora", ms=1.0, ratio=sum(ci) / 2,
                    ci=ci, spread=ci, saved_mb=0.0, to_peer={"peft": to_peft, "loralib": to_loralib})

    bench.print_table([row(0.0, (1.01, 1.05), (0.9, (0.8, 0.99)), (1.0, (0.99, 1.01))),
                       row(0.0, (1.02, 1.06), (1.1, (1.01, 1.2)), (0.9, (0.8, 0.999))),
                       row(0.05, (1.11, 1.12), (1.0, (1.0, 1.0)), (1.0, (1.0, 1.001)))], check=True)
    verdicts = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [line.split(": ", 1)[1] for line in verdicts] == [
        "lora 1.030x floor (95% CI 1.010-1.050), target 1.05x: meets; 0.900x peft's time (95% CI 0.800-0.990): "
        "faster; 1.000x loralib's time (95% CI 0.990-1.010): undecided",
        "lora 1.040x floor (95% CI 1.020-1.060), target 1.05x: undecided; 1.100x peft's time (95% CI 1.010-1.200): "
        "SLOWER; 0.900x loralib's time (95% CI 0.800-0.999): faster",
        "lora 1.115x floor (95% CI 1.110-1.120), target 1.10x: MISSES; 1.000x peft's time (95% CI 1.000-1.000): "
        "undecided; 1.000x loralib's time (95% CI 1.000-1.001): undecided",
    ]


def test_dora_verdicts_read_the_dora_targets(capsys):
    # a DoRA row: at most DORA_TARGET x the floor, and at least DORA_SPEEDUP x faster than PEFT's DoRA
    bench = _lora_linear_module()
    row = dict(dtype="bfloat16", dropout=0.0, shape="o_proj 8->8", variant="lora dora", ms=1.0, ratio=1.12,
               ci=(1.10, 1.14), spread=(1.10, 1.14), saved_mb=0.0, to_peer={"peft": (0.3, (0.25, 0.7))})
    bench.print_table([row, {**row, "ratio": 1.20, "ci": (1.17, 1.25), "to_peer": {"peft": (0.3, (0.2, 0.4))}}],
                      check=True)
    verdicts = capsys.readouterr().out.strip().splitlines()[-2:]
    assert [line.split(": ", 1)[1] for line in verdicts] == [
        f"lora dora 1.120x floor (95% CI 1.100-1.140), target {bench.DORA_TARGET:.2f}x: meets; 0.300x peft dora's "
        f"time (95% CI 0.250-0.700), target {1 / bench.DORA_SPEEDUP:.3f}x: undecided",
        f"lora dora 1.200x floor (95% CI 1.170-1.250), target {bench.DORA_TARGET:.2f}x: MISSES; 0.300x peft dora's "
        f"time (95% CI 0.200-0.400), target {1 / bench.DORA_SPEEDUP:.3f}x: meets",
    ]
