"""examples/train_with_trl.py: SFTTrainer (bf16 autocast, checkpointing, packing) and Trainer on the tiny default;
adapter-only outputs; a resumed run ends where the uninterrupted one did."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("trl")
sys.path.insert(0, str(ROOT / "examples"))
import train_with_trl  # noqa: E402

FAST = ["--batch-size", "4", "--max-length", "128", "--lora-r", "4", "--lora-alpha", "8", "--learning-rate", "1e-2"]


def run(capsys, *argv: str) -> str:
    train_with_trl.main([*FAST, *argv])
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_sft_trains_saves_adapters_only_and_resumes_to_the_same_adapters(tmp_path, capsys):
    out = tmp_path / "run"
    line = run(capsys, "--max-steps", "16", "--save-steps", "8", "--output-dir", str(out))
    match = re.fullmatch(r"train loss: (\S+) -> (\S+) \(([-+][0-9.]+)%\); adapter: (.+)", line)
    assert match and float(match.group(3)) < -20, line
    assert Path(match.group(4)) == out / "adapter.safetensors"
    for directory in (out, out / "checkpoint-8", out / "checkpoint-16"):
        names = {p.name for p in directory.iterdir()}
        assert {"adapter.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= names, names
        assert not names & {"model.safetensors", "pytorch_model.bin"}, names

    resumed = tmp_path / "resumed"
    run(capsys, "--max-steps", "16", "--save-steps", "8", "--output-dir", str(resumed),
        "--resume", str(out / "checkpoint-8"))
    want, got = load_file(out / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert want.keys() == got.keys()
    for name in want:  # bf16 autocast: within 1e-6
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_plain_trainer_on_tokenised_rows(tmp_path, capsys):
    line = run(capsys, "--trainer", "trainer", "--max-steps", "6", "--save-steps", "6",
               "--output-dir", str(tmp_path / "run"))
    assert line.startswith("train loss: ") and (tmp_path / "run" / "checkpoint-6" / "adapter.safetensors").is_file()


def test_a_bad_data_line_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": []}\n{"text": "no messages"}\n')
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(data))}:2: not a \{{\"messages\": \[...\]\}} line"):
        train_with_trl.main(["--data", str(data), "--output-dir", str(tmp_path / "run")])
