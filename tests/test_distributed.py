"""train_phi3.py under torchrun: two CPU processes (gloo), with DDP (LoRA and DoRA) and with FSDP2, equal one process
with the same global batch; an FSDP run resumed from a checkpoint equals the uninterrupted one bit for bit."""

from __future__ import annotations

import json
import shutil
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

COMMON = ["--no-progress", "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "2", "--logging-steps", "1",
          "--per-device-eval-batch-size", "8", "--sample-max-new-tokens", "4", "--max-seq-length", "128",
          "--gradient-accumulation-steps", "2"]


def torchrun(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path | subprocess.CompletedProcess]:
    """One process, DDP, FSDP (with gradient checkpointing, a checkpoint per step, --merge) and FSDP resumed."""
    tmp = tmp_path_factory.mktemp("distributed")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} * 3?"},
                                                     {"role": "assistant", "content": f"{i} * 3 = {3 * i}."}]}) + "\n"
                            for i in range(16)))
    common = [*COMMON, "--data", data, "--eval-data", data]
    result = {"tmp": tmp}
    result["ddp_log"] = torchrun(*common, "--per-device-train-batch-size", "2", "--output-dir", tmp / "ddp")
    single = subprocess.run([sys.executable, str(SCRIPT), *map(str, common), "--per-device-train-batch-size", "4",
                             "--output-dir", tmp / "one"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    result["fsdp_log"] = torchrun(*common, "--per-device-train-batch-size", "2", "--output-dir", tmp / "fsdp", "--fsdp",
                                  "--gradient-checkpointing", "--save-steps", "1", "--save-total-limit", "2", "--merge")
    # Resumed in place, in a copy of the run without what step 2 wrote; --save-total-limit 1 prunes step 1 at the
    # end, on rank 0 only (the other rank deleting it too would fail on a missing directory).
    resumed = tmp / "fsdp-resumed"
    shutil.copytree(tmp / "fsdp", resumed)
    for name in ("adapter.safetensors", "adapter-peft", "merged", "checkpoints/step-000002"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    torchrun("--resume", resumed / "checkpoints" / "step-000001", "--output-dir", resumed, "--save-total-limit", "1")
    result["ddp-dora_log"] = torchrun(*common, "--use-dora", "--per-device-train-batch-size", "2",
                                      "--output-dir", tmp / "ddp-dora")
    single = subprocess.run([sys.executable, str(SCRIPT), *map(str, common), "--use-dora",
                             "--per-device-train-batch-size", "4", "--output-dir", tmp / "one-dora"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    return result


def adapters(runs, name: str) -> dict[str, torch.Tensor]:
    return load_file(runs["tmp"] / name / "adapter.safetensors")


def losses(runs, name: str) -> list[float]:
    records = [json.loads(line) for line in (runs["tmp"] / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def assert_adapters_close(runs, name: str, reference: str, rtol: float, atol: float) -> None:
    got, want = adapters(runs, name), adapters(runs, reference)
    assert got.keys() == want.keys()
    assert any(t.abs().max() > 0 for k, t in want.items() if "lora_B" in k)  # the adapters did move
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol,
                                   msg=lambda m, key=key: f"{name} vs {reference}, {key}: {m}\n--- torchrun's "
                                                          f"output:\n{runs[name + '_log'].stdout[-2000:]}")
    torch.testing.assert_close(losses(runs, name), losses(runs, reference), rtol=1e-5, atol=0)


def test_two_gloo_processes_match_one_process(runs):
    # Rank 1 compared its adapters with rank 0's, bit for bit, before rank 0 wrote them.
    assert "[rank 1] WARNING rank 1 of 2: adapters identical to rank 0's" in runs["ddp_log"].stdout
    assert "[rank 0] INFO rank 0 of 2: adapters identical to rank 0's" in runs["ddp_log"].stdout
    assert_adapters_close(runs, "ddp", "one", rtol=1e-4, atol=1e-6)


def test_fsdp_matches_one_process_and_ddp(runs):
    assert "sharded with FSDP2" in runs["fsdp_log"].stdout
    assert_adapters_close(runs, "fsdp", "one", rtol=1e-4, atol=1e-6)
    assert_adapters_close(runs, "fsdp", "ddp", rtol=1e-4, atol=1e-6)
    out = runs["tmp"] / "fsdp"
    # Everything the single-process run writes, and the merge of the saved adapter file on rank 0.
    for name in ("adapter-peft/adapter_model.safetensors", "checkpoints/step-000001/trainer_state.pt",
                 "checkpoints/step-000002/adapter.safetensors", "merged/model.safetensors"):
        assert (out / name).is_file(), name
    merged = load_file(out / "merged" / "model.safetensors")
    assert not any("lora_" in key for key in merged)


def test_fsdp_resume_equals_uninterrupted_run_bit_for_bit(runs):
    resumed, whole = adapters(runs, "fsdp-resumed"), adapters(runs, "fsdp")
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    assert losses(runs, "fsdp-resumed")[-1] == losses(runs, "fsdp")[-1]
    assert [p.name for p in (runs["tmp"] / "fsdp-resumed" / "checkpoints").iterdir()] == ["step-000002"]


def test_dora_under_ddp_matches_one_process(runs):
    assert any(key.endswith("lora_magnitude") for key in adapters(runs, "one-dora"))
    assert_adapters_close(runs, "ddp-dora", "one-dora", rtol=1e-4, atol=1e-6)


def test_fsdp_with_dora_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match=r"^--fsdp with --use-dora is not supported: DoRA starts its magnitude"):
        train_phi3.main(["--fsdp", "--use-dora", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_fsdp_without_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"--fsdp shards the model across processes: run the script under torchrun"):
        train_phi3.main(["--fsdp", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_resuming_with_another_number_of_processes_is_warned_about(runs, capsys):
    # The DDP run's last checkpoint, continued in one process: it runs, and says it is not the saved run's
    # continuation (the global batch, hence the data order, differ).
    out = runs["tmp"] / "ddp-then-one"
    assert train_phi3.main(["--resume", str(runs["tmp"] / "ddp"), "--max-steps", "3", "--output-dir", str(out)]) == 0
    assert ("was saved by a run of 2 process(es), this one has 1: the global batch and the data order differ"
            in capsys.readouterr().out)
    assert (out / "checkpoints" / "step-000003" / "trainer_state.pt").is_file()
