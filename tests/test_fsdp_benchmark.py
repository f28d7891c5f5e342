"""benchmarks/fsdp.py --quick runs one process, DDP and FSDP2 (2 gloo processes each) and prints every row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_prints_memory_and_step_time_of_every_rank():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["one"], ["ddp"], ["fsdp"])]
    assert [(row[0], row[1]) for row in rows] == [("one", "0"), ("ddp", "0"), ("ddp", "1"), ("fsdp", "0"),
                                                  ("fsdp", "1")]
    assert all(len(row) == 8 for row in rows)
    assert rows[0][3] == rows[0][5] == "1.00"  # one process is the reference of the memory columns
    assert "FSDP per-rank overall peak (USS) at most" in result.stdout
