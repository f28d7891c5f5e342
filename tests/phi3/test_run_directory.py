"""lora.phi3.run_directory: trainer-state checkpoints, metrics.jsonl and where a run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_atomic_saves import assert_all_or_nothing

import lora
from lora.phi3.run_directory import (
    Metrics,
    RunDirectory,
    data_identity,
    latest_checkpoint,
    load_checkpoint,
    plot_losses,
    prune_checkpoints,
    resume,
    resumed_output_dir,
    save_checkpoint,
)


def trainer() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(lora.Linear(4, 4, r=2))
    lora.mark_only_lora_as_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler


def snapshot(model, optimizer, scheduler) -> tuple:
    """What a restore would change, comparable with ==."""
    return ({k: v.tolist() for k, v in lora.lora_state_dict(model).items()}, repr(optimizer.state_dict()),
            repr(scheduler.state_dict()))


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_a_checkpoint_restores_adapters_optimizer_schedule_and_rng_bit_for_bit(tmp_path):
    model, optimizer, scheduler = trainer()
    with torch.no_grad():
        model[0].lora_B.normal_()  # B = 0 would leave A's gradient zero
    step(model, optimizer, scheduler)
    path = tmp_path / "checkpoints" / "step-000001"
    save_checkpoint(path, step=1, total_steps=4, model=model, optimizer=optimizer, scheduler=scheduler,
                    config={"seed": 0}, data={"size": 1, "sha256": "a"})
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "train_config.json", "trainer_state.pt"]
    assert json.loads((path / "train_config.json").read_text()) == {"seed": 0}
    step(model, optimizer, scheduler)  # the uninterrupted run's step 2
    expected = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}

    other, other_optimizer, other_scheduler = trainer()  # the same base (checkpoints hold the adapters only)
    with torch.no_grad():
        other[0].lora_A.zero_()
    torch.manual_seed(123)  # the RNG state comes from the checkpoint
    state = load_checkpoint(path, other, other_optimizer, other_scheduler)
    assert (state["step"], state["total_steps"], state["data"]) == (1, 4, {"size": 1, "sha256": "a"})
    step(other, other_optimizer, other_scheduler)
    got = lora.lora_state_dict(other)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert other_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_a_checkpoint_is_replaced_whole_with_a_fault_between_any_two_files(tmp_path, monkeypatch):
    model, optimizer, scheduler = trainer()
    path = tmp_path / "checkpoints" / "step-000002"
    common = {"step": 2, "total_steps": 4, "model": model, "optimizer": optimizer, "scheduler": scheduler}
    save_checkpoint(path, **common, config={"seed": 0}, data={"size": 1, "sha256": "a"})
    with torch.no_grad():
        model[0].lora_B.fill_(1.0)

    def save():
        save_checkpoint(path, **common, config={"seed": 1}, data={"size": 2, "sha256": "b"})

    assert assert_all_or_nothing(monkeypatch, path, save) >= 3  # adapter, config, their renames, the swap


def test_a_damaged_or_foreign_trainer_state_is_a_clear_error(tmp_path):
    model, optimizer, scheduler = trainer()
    path = tmp_path / "step-000001"
    save_checkpoint(path, step=1, total_steps=2, model=model, optimizer=optimizer, scheduler=scheduler, config={},
                    data={})
    state = (path / "trainer_state.pt").read_bytes()
    (path / "trainer_state.pt").write_bytes(state[: len(state) // 2])
    other = trainer()
    with torch.no_grad():
        other[0][0].lora_A.add_(1)  # differs from the file's adapter: a load would show
    before = snapshot(*other)
    with pytest.raises(ValueError, match=r"step-000001/trainer_state.pt: cannot be read \(truncated or corrupt\?\)"):
        load_checkpoint(path, *other)
    torch.save({"step": 1}, path / "trainer_state.pt")
    with pytest.raises(ValueError, match="trainer_state.pt: not a trainer state written by this script"):
        load_checkpoint(path, *other)
    assert snapshot(*other) == before  # nothing restored from a damaged checkpoint


def test_latest_checkpoint(tmp_path):
    for name in ("step-000002", "step-000010"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "trainer_state.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000010"
    assert latest_checkpoint(tmp_path / "checkpoints" / "step-000002") == tmp_path / "checkpoints" / "step-000002"
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory and no checkpoints/step-\\* inside"):
        latest_checkpoint(tmp_path / "checkpoints")


def test_pruning_never_deletes_the_last_good_checkpoint(tmp_path):
    steps = [tmp_path / f"step-{i:06d}" for i in (1, 2, 3)]
    for path in steps:
        path.mkdir()
    # step 3 is pending (saved, no loss computed with its weights yet): step 2 is the last good one
    assert prune_checkpoints(steps, 1, keep=steps[1]) == steps[1:]
    assert sorted(tmp_path.iterdir()) == steps[1:]
    assert prune_checkpoints(steps[1:], 1, keep=steps[2]) == steps[2:]


def test_metrics_keep_a_later_trajectory_until_this_run_passes_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4)) + "{oops\n")
    metrics = Metrics(path, start=2)  # resuming step 2 of a finished 4-step run
    metrics.write({"step": 3, "loss": 30.0})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}, {"step": 4, "loss": 4.0}]
    metrics.finish()  # the run completed at step 3: step 4 belonged to the earlier trajectory
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    records = [{"step": 0, "eval_loss": 4.0}, {"step": 1, "loss": 3.5}, {"step": 2, "loss": 2.5, "eval_loss": 2.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_identity(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"abc")
    assert data_identity(tmp_path / "a.jsonl") == {
        "size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}


def make_run(out: Path) -> None:
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "train_config.json").write_text("{}")


def test_where_a_run_writes(tmp_path):
    out = tmp_path / "out"
    assert RunDirectory.plan(out, resume=None, given=True, overwrite=False).path == out  # new
    out.mkdir()
    assert RunDirectory.plan(out, resume=None, given=True, overwrite=False).path == out  # empty
    make_run(out)
    resumed = RunDirectory.plan(out, resume=out / "checkpoints" / "step-000002", given=True, overwrite=False)
    assert resumed.path == out and not resumed.is_replacement  # the run being resumed, in place
    elsewhere = RunDirectory.plan(tmp_path / "new", resume=out / "checkpoints" / "step-000002", given=True,
                                  overwrite=False)
    assert elsewhere.path == tmp_path / "new"  # a resumed run written to a new directory
    with pytest.raises(ValueError, match="holds another run: continue it with --resume"):
        RunDirectory.plan(out, resume=None, given=True, overwrite=False)
    for given, overwrite in ((False, False), (True, True)):  # the default output_dir, or --overwrite-output-dir
        assert RunDirectory.plan(out, resume=None, given=given, overwrite=overwrite).in_place is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not the directory of a training run"):
        RunDirectory.plan(tmp_path / "file", resume=None, given=False, overwrite=False)
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(ValueError, match=r"link is a symbolic link to a directory holding another run; give the"):
        RunDirectory.plan(link, resume=None, given=False, overwrite=False)  # before training, not after it


def test_a_replacement_takes_the_old_run_s_place_only_when_complete(tmp_path):
    out = tmp_path / "out"
    make_run(out)
    run = RunDirectory.plan(out, resume=None, given=False, overwrite=False)
    run.open({"seed": 1}, start=0)
    assert run.is_replacement and run.path.name.startswith("out.next-") and (out / "checkpoints").is_dir()
    assert json.loads((run.path / "train_config.json").read_text()) == {"seed": 1}
    checkpoint = run.checkpoint_path(1)
    checkpoint.mkdir(parents=True)
    run.saved(checkpoint, limit=1, keep=checkpoint)
    run.metrics.write({"step": 1, "loss": 1.0})
    assert run.complete({"seed": 1}) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]


def test_complete_drops_an_earlier_trajectory_s_checkpoints_past_the_resumed_step(tmp_path):
    out = tmp_path / "out"
    for s in (2, 4):
        (out / "checkpoints" / f"step-{s:06d}").mkdir(parents=True)
    run = RunDirectory.plan(out, resume=out / "checkpoints" / "step-000002", given=False, overwrite=False)
    run.open({}, start=2)
    assert run.checkpoints == [out / "checkpoints" / "step-000002"]
    assert run.complete({}) == out
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_resume_refuses_a_finished_run_warns_about_changes_and_replans(tmp_path, caplog):
    model, optimizer, scheduler = trainer()
    step(model, optimizer, scheduler)
    path = tmp_path / "step-000001"
    save_checkpoint(path, step=1, total_steps=2, model=model, optimizer=optimizer, scheduler=scheduler, config={},
                    data={"size": 1, "sha256": "a" * 64}, processes=2)
    fresh = trainer()
    before, rng = snapshot(*fresh), torch.get_rng_state()
    with pytest.raises(ValueError, match="already at step 1 of 1; a larger --max-steps extends the run"):
        resume(path, *fresh, total_steps=1, data={}, data_path="d.jsonl")
    assert snapshot(*fresh) == before and torch.equal(torch.get_rng_state(), rng)  # nothing restored
    model, optimizer, _ = trainer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 4)  # the extended run's schedule
    with caplog.at_level("INFO", logger="lora.phi3.run_directory"):
        start = resume(path, model, optimizer, scheduler, total_steps=4, data={"size": 2, "sha256": "b" * 64},
                       data_path="d.jsonl", processes=1)
    assert start == 1 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.75)
    text = caplog.text
    assert "d.jsonl changed since" in text and "size 1 -> 2 bytes" in text
    assert "was saved by a run of 2 process(es), this one has 1: the global batch and the data order differ" in text
    assert "schedule re-planned for 4 steps (the checkpoint's run planned 2)" in text
    caplog.clear()
    with caplog.at_level("INFO", logger="lora.phi3.run_directory"):
        resume(path, *trainer(), total_steps=2, data={"size": 2, "sha256": "b" * 64}, data_path="d.jsonl", rank=1,
               processes=1)
    assert caplog.text == ""  # the other ranks stay quiet


def test_where_a_resumed_run_writes_without_an_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorded = Path("runs") / "phi3-lora"  # relative, as the settings keep it
    step = Path("checkpoints") / "step-000002"
    assert resumed_output_dir(recorded / step, recorded) == recorded  # the run itself
    assert resumed_output_dir(tmp_path / "copy" / step, recorded) == tmp_path / "copy"  # a copy continues there
    assert resumed_output_dir(tmp_path / "lone-step", recorded) == recorded  # outside any run: its recorded one
    # an interrupted replacement, resumed from another working directory: it still replaces the run beside it
    elsewhere = tmp_path / "other" / "runs" / "phi3-lora.next-ab12"
    assert resumed_output_dir(elsewhere / step, recorded) == elsewhere.parent / "phi3-lora"
