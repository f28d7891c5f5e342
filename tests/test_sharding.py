"""The library on a Phi-3 sharded with FSDP2 (2 gloo processes under torchrun; the checks are in sharding_worker.py):
the adapters gathered whole (lora_state_dict, save_adapter and save_peft_adapter, rank 0 writing), loaded as each
rank's slice (load_adapter, load_peft_adapter), the loss and gradients of the unsharded model; merge_and_save and
save_pretrained refuse a sharded model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_on_a_sharded_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "sharding_worker.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: sharded library checks passed" in result.stdout
