"""benchmarks/qlora.py --quick runs every measurement (4-bit load, reload, the three train steps), so it cannot rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_prints_every_row():
    pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
    pytest.importorskip("peft")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qlora.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row[0].strip("| ").strip() for row in rows] == [
        "load", "quantize at load (bf16 checkpoint)", "saved 4-bit directory",
        "variant", "ours, bf16 base", "ours, NF4 base", "PEFT, bnb NF4 base"]
    losses = {row[0].strip("| ").strip(): float(row[3].strip(" |")) for row in rows[4:]}
    # step 0 of LoRA (B = 0) is the base model's loss: ours and PEFT on the same NF4 bits agree closely
    assert losses["ours, NF4 base"] == pytest.approx(losses["PEFT, bnb NF4 base"], abs=2e-3)
    assert "quick mode: tiny config" in result.stdout
