"""train_phi3.py under torchrun: two CPU processes (gloo) equal one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_phi3.py"
COMMON = ["--no-progress", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "2", "--logging-steps", "1",
          "--per-device-eval-batch-size", "8", "--sample-max-new-tokens", "4", "--max-seq-length", "128",
          "--gradient-accumulation-steps", "2"]


def test_two_gloo_processes_match_one_process(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} * 3?"},
                                                     {"role": "assistant", "content": f"{i} * 3 = {3 * i}."}]}) + "\n"
                            for i in range(16)))
    common = [*COMMON, "--data", data, "--eval-data", data]
    distributed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), *common,
         "--per-device-train-batch-size", "2", "--output-dir", tmp_path / "ddp"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert distributed.returncode == 0, distributed.stdout[-3000:] + distributed.stderr[-3000:]
    # Rank 1 compared its adapters with rank 0's, bit for bit, before rank 0 wrote them.
    assert "[rank 1] WARNING rank 1 of 2: adapters identical to rank 0's" in distributed.stdout
    assert "[rank 0] INFO rank 0 of 2: adapters identical to rank 0's" in distributed.stdout
    single = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, common), "--per-device-train-batch-size", "4",
         "--output-dir", tmp_path / "one"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    ddp, one = load_file(tmp_path / "ddp" / "adapter.safetensors"), load_file(tmp_path / "one" / "adapter.safetensors")
    assert ddp.keys() == one.keys()
    assert any(t.abs().max() > 0 for k, t in one.items() if "lora_B" in k)  # the adapters did move
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}\n--- torchrun's output:\n"
                                                          f"{distributed.stdout[-2000:]}")
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in ("ddp", "one")]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
