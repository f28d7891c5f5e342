"""examples/quickstart.py runs; examples/chat_phi3.py answers with an adapter in our format and in PEFT's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_chat_applies_the_adapter_as_the_run_trained_it(tmp_path, capsys, monkeypatch):
    # DoRA, a bf16 base and the April template, all read from the run's train_config.json
    out = tmp_path / "run"
    assert train_phi3.main(["--no-progress", "--max-steps", "2", "--lora-r", "4", "--output-dir", str(out),
                            "--use-dora", "--dtype", "bfloat16", "--chat-template", "phi3-2024-04",
                            "--sample-max-new-tokens", "2", "--eval-data",
                            str(ROOT / "examples" / "data" / "eval.jsonl")]) == 0
    templates = []
    encode = chat_phi3.encode_prompt
    monkeypatch.setattr(chat_phi3, "encode_prompt", lambda t, m, template: templates.append(template.name)
                        or encode(t, m, template))
    capsys.readouterr()
    assert chat_phi3.main(["--adapter", str(out), "--max-new-tokens", "4", "What is 2 + 2?"]) == 0
    assert chat_phi3.main(["--adapter", str(out / "adapter-peft"), "--chat-template", "phi3-2024-04", "--dtype",
                           "bfloat16", "--max-new-tokens", "4", "What is 2 + 2?"]) == 0
    answers = capsys.readouterr().out.splitlines()
    assert templates == ["phi3-2024-04", "phi3-2024-04"] and len(answers) == 2 and answers[0] == answers[1]


def test_chat_puts_a_peft_adapter_on_the_base_it_names(tmp_path, capsys):
    from lora.phi3 import from_pretrained, save_pretrained

    train_phi3.embedded_model_dir()  # the embedded model, built once
    base = from_pretrained(chat_phi3.EMBEDDED_DIR)
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.mul_(1.5)  # another base of the same shapes
    save_pretrained(base, tmp_path / "base")
    for name in ("byte_tokenizer.json", "tokenizer_config.json"):
        if (chat_phi3.EMBEDDED_DIR / name).is_file():
            (tmp_path / "base" / name).write_bytes((chat_phi3.EMBEDDED_DIR / name).read_bytes())
    out = tmp_path / "run"
    assert train_phi3.main(["--no-progress", "--max-steps", "2", "--lora-r", "4", "--output-dir", str(out),
                            "--model", str(tmp_path / "base"), "--sample-max-new-tokens", "2", "--eval-data",
                            str(ROOT / "examples" / "data" / "eval.jsonl")]) == 0
    capsys.readouterr()
    for adapter in (out, out / "adapter-peft"):  # neither with --model: the run's base, the adapter config's base
        assert chat_phi3.main(["--adapter", str(adapter), "--max-new-tokens", "6", "What is 2 + 2?"]) == 0
    assert chat_phi3.main(["--adapter", str(out / "adapter-peft"), "--model", str(chat_phi3.EMBEDDED_DIR),
                           "--max-new-tokens", "6", "What is 2 + 2?"]) == 0
    ours, peft, embedded = capsys.readouterr().out.splitlines()
    assert ours == peft != embedded
