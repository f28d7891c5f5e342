"""Every benchmark's --quick mode runs, so the benchmarks cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["lora_linear.py"])
def test_quick_mode_runs(script):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| variant |" in result.stdout or "|" in result.stdout
