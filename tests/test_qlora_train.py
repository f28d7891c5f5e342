"""examples/train_phi3.py with --load-in-4bit: the loss falls, resume is bit-identical (dropout, gradient
checkpointing, packing), DDP equals one process, merging writes a plain model; refusals come before training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_phi3.py"
sys.path.insert(0, str(ROOT / "examples"))
import train_phi3  # noqa: E402
from test_train_script import assert_resume_is_bit_identical  # noqa: E402

pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")

# the subprocesses import lora from this checkout, installed or not
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
FAST = ["--no-progress", "--load-in-4bit", "--lora-r", "4", "--lora-alpha", "8", "--per-device-eval-batch-size", "8",
        "--sample-max-new-tokens", "4", "--max-seq-length", "128"]


def main(*args) -> int:
    return train_phi3.main([str(a) for a in args])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qlora-data") / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} * 3?"},
                                                     {"role": "assistant", "content": f"{i} * 3 = {3 * i}."}]}) + "\n"
                            for i in range(16)))
    return path


def test_loss_falls_on_the_embedded_default_and_merge_writes_a_plain_model(tmp_path, data):
    out = tmp_path / "out"
    assert main(*FAST, "--max-steps", "12", "--eval-steps", "12", "--logging-steps", "4", "--learning-rate", "2e-2",
                "--per-device-train-batch-size", "4", "--eval-data", data, "--output-dir", out, "--merge") == 0
    evals = [r["eval_loss"] for r in metrics(out) if "eval_loss" in r]
    assert evals[-1] < evals[0] - 1.0, evals
    config = json.loads((out / "train_config.json").read_text())
    assert config["load_in_4bit"] is True and config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"] is True
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged and merged["dtype"] == "float32"
    header = load_file(out / "merged" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in header.values())
    assert (out / "adapter-peft" / "adapter_config.json").is_file()


def test_resume_is_bit_identical_with_checkpointing_and_packing(tmp_path, data):
    common = [*FAST, "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "3", "--logging-steps", "1",
              "--eval-data", data, "--data", data, "--per-device-train-batch-size", "2", "--lora-dropout", "0.1",
              "--gradient-checkpointing", "--packing", "--bnb-4bit-quant-type", "fp4", "--no-bnb-4bit-use-double-quant"]
    assert_resume_is_bit_identical(tmp_path, common)
    config = json.loads((tmp_path / "resumed" / "train_config.json").read_text())
    assert config["bnb_4bit_quant_type"] == "fp4" and config["bnb_4bit_use_double_quant"] is False
    with pytest.raises(ValueError, match=re.escape("load_in_4bit=False contradict the checkpoint's settings")):
        main("--resume", tmp_path / "full", "--no-load-in-4bit")


def test_ddp_equals_one_process(tmp_path, data):
    common = [*FAST, "--max-steps", "2", "--logging-steps", "1", "--gradient-accumulation-steps", "2",
              "--data", data, "--eval-data", data]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(SCRIPT), *map(str, common), "--per-device-train-batch-size", "2",
                          "--output-dir", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=ENV,
                         )
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert main(*common, "--per-device-train-batch-size", "4", "--output-dir", tmp_path / "one") == 0
    one, two = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "ddp" / "adapter.safetensors")
    assert one.keys() == two.keys()
    for key in one:  # the same global batch; DDP's all-reduce sums in another order
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    losses = [[r["loss"] for r in metrics(tmp_path / name) if "loss" in r] for name in ("one", "ddp")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("flag, message", [
    ("--fsdp", "--load-in-4bit with --fsdp is not supported: FSDP2 shards each parameter along its rows"),
    ("--use-dora", "--load-in-4bit with --use-dora is not supported: DoRA needs the row norms"),
])
def test_refused_combinations(tmp_path, flag, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        main("--load-in-4bit", flag, "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_bitsandbytes_names_the_extra(tmp_path, hide_bitsandbytes):
    hide_bitsandbytes()
    with pytest.raises(ImportError, match=re.escape('pip install "purelora[qlora]"')):
        main("--load-in-4bit", "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # --help lists the options
        main("--help")
