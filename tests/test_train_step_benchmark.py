"""benchmarks/train_step.py --quick runs (ours and PEFT agree on the loss first), so the benchmark cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_runs():
    pytest.importorskip("peft")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| floor", "| floor (transformers)", "| ours", "| peft", "| ours",
                                                     "| peft", "| ours + ckpt", "| peft + ckpt"]
