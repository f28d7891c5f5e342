"""examples/quickstart.py runs; examples/chat_phi3.py answers with an adapter in our format and in PEFT's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import chat_phi3  # noqa: E402
import train_phi3  # noqa: E402


def test_quickstart_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fine-tuned on B: accuracy B" in result.stdout and "same predictions" in result.stdout


def test_chat_with_trained_adapter(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_phi3.main(["--no-progress", "--max-steps", "2", "--lora-r", "4", "--output-dir", str(out),
                            "--sample-max-new-tokens", "2", "--eval-data", str(ROOT / "examples" / "data" /
                                                                                "eval.jsonl")]) == 0
    capsys.readouterr()
    for adapter in (out, out / "adapter-peft"):
        assert chat_phi3.main(["--adapter", str(adapter), "--max-new-tokens", "5", "--system", "Be brief.",
                               "What is 2 + 2?"]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 2 and answers[0] == answers[1]  # the same adapter in both formats
    with pytest.raises(ValueError, match="expected adapter_config.json"):
        chat_phi3.main(["--adapter", str(tmp_path), "hi"])


def test_training_doc_example_runs(tmp_path):
    text = (ROOT / "docs" / "training.md").read_text()
    script = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "4.<|end|>"
