"""benchmarks/lora_linear.py --quick runs and prints every variant, so the benchmark cannot rot.

(benchmarks/phi3_load.py and benchmarks/train_step.py have their own tests.)
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lora_linear_quick_mode_prints_every_variant():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_linear.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| float32")]
    variants = {row[3] for row in rows}
    assert {"floor", "lora", "lora merged", "peft", "loralib", "loralib merged"} <= variants
    assert len({row[2] for row in rows}) == 4  # the four Phi-3 projection shapes
