"""`benchmarks/phi3_load.py --quick` runs end to end: tiny checkpoint, both loaders, table, cleanup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "phi3_load.py"


def test_quick_benchmark_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "2 shards" in out
    for impl in ("lora", "transformers"):
        for mode in ("cold", "warm"):
            assert f"{impl:<13}{mode:<7}" in out
    assert "lora vs transformers: max |diff| = 0" in out
    assert list(tmp_path.iterdir()) == []  # the checkpoint is deleted
