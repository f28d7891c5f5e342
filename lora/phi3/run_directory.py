"""A training run's directory: trainer-state checkpoints, `metrics.jsonl`, and the rule that nothing there is
deleted before this run has written something complete that replaces it.

    output_dir/
      train_config.json            every setting of the run (`--resume` reads them back)
      metrics.jsonl                one JSON record a line: {"step": 40, "loss": 1.93, ...}
      checkpoints/step-000100/     adapter.safetensors, trainer_state.pt, train_config.json

- `output_dir` new or empty, or the run being resumed: written in place. Later metrics lines and checkpoints
  of an earlier trajectory (resuming step 20 of a finished 40-step run) stay until this run writes the same
  step or completes;
- `output_dir` holding another run (the default one, or an explicit one with `overwrite`): this run writes a
  sibling `OUTPUT_DIR.next-XXXX` and, once complete, takes `output_dir`'s place in one rename; the old run is
  deleted only then. An interrupted one stays there, to resume.

Every file and directory is written with `lora.atomic` (temporary sibling, fsync, rename): all or nothing.

>>> run = RunDirectory.plan(Path("runs/phi3-lora"), resume=None, given=True, overwrite=False)  # doctest: +SKIP
>>> run.open(config, start=0)                                                              # doctest: +SKIP
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora
from lora.atomic import (
    atomic_directory,
    atomic_write,
    remove_directory,
    remove_stale_temporaries,
    replace_directory,
)
from lora.phi3.schedule import replan

__all__ = [
    "Metrics",
    "RunDirectory",
    "data_identity",
    "latest_checkpoint",
    "load_checkpoint",
    "plot_losses",
    "prune_checkpoints",
    "resume",
    "resumed_output_dir",
    "save_checkpoint",
    "write_config",
]

log = logging.getLogger(__name__)


def latest_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest `checkpoints/step-N` under it."""
    if (path / "trainer_state.pt").is_file():
        return path
    steps = sorted((path / "checkpoints").glob("step-*"))
    if not steps:
        raise FileNotFoundError(f"--resume {path}: not a checkpoint directory and no checkpoints/step-* inside")
    return steps[-1]


def write_config(path: Path, config: dict[str, Any]) -> None:
    """`train_config.json`: every setting of the run, as `--resume` reads them back."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def data_identity(path: str | Path) -> dict[str, Any]:
    """Size and SHA-256 of a data file, stored in each checkpoint to notice a changed file on resume."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def save_checkpoint(path: Path, *, step: int, total_steps: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict[str, Any], data: dict[str, Any],
                    sharded: bool = False, rank: int = 0, processes: int = 1) -> None:
    """Adapter (our format), optimizer, scheduler, RNG states, step, plan, data identity, the number of
    `processes` and config at `path`, replaced as a whole (`lora.atomic.atomic_directory`).

    `sharded` (FSDP): every rank calls it; the adapters and the optimizer state are gathered whole (the
    optimizer's keyed by parameter name, torch.distributed.checkpoint's full state dict) and rank 0 writes.
    """
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    else:
        optimizer_state = optimizer.state_dict()
    state = {"step": step, "total_steps": total_steps, "optimizer": optimizer_state,
             "scheduler": scheduler.state_dict(), "rng": rng, "data": data, "processes": processes}
    if rank != 0:  # FSDP: take part in the adapters' gather; rank 0 writes
        lora.save_adapter(model, path / "adapter.safetensors")
        return
    with atomic_directory(path) as tmp:
        lora.save_adapter(model, tmp / "adapter.safetensors")
        torch.save(state, tmp / "trainer_state.pt")
        write_config(tmp / "train_config.json", config)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, *, sharded: bool = False) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote (no pickle: `weights_only=True`); returns the trainer state.

    `sharded` (FSDP): every rank reads the whole files and keeps its slice of the adapters and optimizer state.
    The trainer state is read and checked before anything is restored: a damaged file changes nothing.
    """
    state = _trainer_state(path)
    _restore(path, state, model, optimizer, scheduler, sharded=sharded)
    return state


def _trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path / "trainer_state.pt", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle errors for a damaged file
        raise ValueError(f"--resume {path / 'trainer_state.pt'}: cannot be read (truncated or corrupt?): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise ValueError(f"--resume {path / 'trainer_state.pt'}: not a trainer state written by this script")
    return state


def _restore(path: Path, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, *, sharded: bool) -> None:
    lora.load_adapter(model, path / "adapter.safetensors")  # checks the whole file before it copies anything
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def resume(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LambdaLR, *, total_steps: int, data: dict[str, Any],
           data_path: str | Path, sharded: bool = False, rank: int = 0, processes: int = 1) -> int:
    """`load_checkpoint`, then the step to continue after: a ValueError if the run is already done; warnings
    (on rank 0) if the data file changed (`data`, its `data_identity`) or the number of `processes` did (the
    global batch, hence the data order, then differ); the schedule re-planned (`lora.phi3.schedule.replan`)
    when the run was extended beyond the checkpoint's planned total."""
    state = _trainer_state(checkpoint)
    start, planned = state["step"], state.get("total_steps", total_steps)
    if start >= total_steps:  # before anything is restored
        raise ValueError(f"--resume {checkpoint}: already at step {start} of {total_steps}; a larger --max-steps "
                         "extends the run")
    _restore(checkpoint, state, model, optimizer, scheduler, sharded=sharded)
    if rank == 0 and state.get("data", data) != data:
        log.warning("--resume: %s changed since %s was saved (size %s -> %s bytes, SHA-256 %s... -> %s...); the run "
                    "continues by row index, so it is not the continuation of the saved one", data_path, checkpoint,
                    state["data"].get("size"), data["size"], str(state["data"].get("sha256"))[:12],
                    data["sha256"][:12])
    if rank == 0 and state.get("processes", processes) != processes:
        log.warning("--resume: %s was saved by a run of %d process(es), this one has %d: the global batch and the "
                    "data order differ, so it is not the continuation of the saved run", checkpoint,
                    state["processes"], processes)
    if planned != total_steps:
        lr = replan(scheduler, scheduler.lr_lambdas[0], start)
        log.info("schedule re-planned for %d steps (the checkpoint's run planned %d); lr %.3g at step %d",
                 total_steps, planned, lr, start + 1)
    return start


def prune_checkpoints(ours: list[Path], limit: int, keep: Path | None) -> list[Path]:
    """Delete the oldest of `ours` beyond `limit`, never `keep` (the last good one); the ones left, sorted."""
    ours = sorted(set(ours))
    for old in ours[:-limit]:
        if old != keep:
            remove_directory(old)  # whole or absent: a half-deleted checkpoint would be picked by --resume
            ours.remove(old)
    return ours


class Metrics:
    """`metrics.jsonl`, rewritten atomically at each record: this run's records, then an earlier run's records
    past the current step, which stay until this run passes them (`finish` drops those left)."""

    def __init__(self, path: Path, start: int) -> None:
        records = []
        for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: not a JSON record; it will not be kept", path, number)
        self.path = path
        self.records = [r for r in records if r.get("step", 0) <= start]
        self.later = [r for r in records if r.get("step", 0) > start]

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` (it has a `step`), dropping an earlier run's records up to that step; rewrite the file."""
        self.records.append(record)
        self.later = [r for r in self.later if r["step"] > record["step"]]
        self._save()

    def finish(self) -> None:
        """The run is complete: drop what is left of an earlier run's records; rewrite the file."""
        self.later = []
        self._save()

    def _save(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in [*self.records, *self.later])
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def plot_losses(metrics: Path, png: Path) -> bool:
    """Train and eval loss against step, when matplotlib is installed; True if the PNG was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train, strict=True), label="train")
    ax.plot(*zip(*evals, strict=True), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


def _holds_a_run(path: Path) -> bool:
    return any((path / name).exists() for name in ("train_config.json", "metrics.jsonl", "checkpoints"))


def resumed_output_dir(checkpoint: Path, recorded: Path) -> Path:
    """Where a run resumed from `checkpoint` without an `--output-dir` writes: the run directory the checkpoint is
    in now (a copied or moved run continues where it is), unless that is `recorded` (the checkpoint's own setting)
    or a replacement of it in progress (`out.next-XXXX`, which still takes `recorded`'s place once complete)."""
    if checkpoint.parent.name != "checkpoints":
        return recorded
    source = checkpoint.parent.parent
    if source.resolve() == recorded.resolve() or RunDirectory._replaces(source, recorded):
        return recorded
    if source.name.startswith(f"{recorded.name}.next-"):  # a replacement of the run beside it (recorded relative to
        return source.parent / recorded.name               # another working directory): it still replaces that run
    return source


class RunDirectory:
    """Where a run writes (`path`): `out` itself, or a sibling `out.next-XXXX` that replaces `out` once complete.

    `plan` decides before anything is loaded (a refused `out` fails fast); `open` (rank 0) creates the directory
    and `metrics`; `checkpoint_path` says where a step's checkpoint goes and `saved` records one and prunes
    (rank 0 only: it deletes); `complete` drops what is left of an earlier trajectory and puts a replacement in
    `out`'s place.
    """

    def __init__(self, out: Path, in_place: Path | None) -> None:
        self.out, self.in_place = out, in_place
        self.path = in_place or out
        self.checkpoints: list[Path] = []
        self.metrics: Metrics | None = None

    @classmethod
    def plan(cls, out: Path, *, resume: Path | None, given: bool, overwrite: bool) -> RunDirectory:
        """In place for a new or empty `out` and for the run being resumed; a replacement for a default `out`
        holding another run, or an explicit one with `overwrite`; else a ValueError."""
        if resume is not None and resume.parent.name == "checkpoints":
            source = resume.parent.parent
            if source.resolve() == out.resolve() or cls._replaces(source, out):
                return cls(out, source)
        if not out.exists() or (out.is_dir() and not any(out.iterdir())):
            return cls(out, out)
        if not out.is_dir() or not _holds_a_run(out):
            raise ValueError(f"--output-dir {out}: exists and is not the directory of a training run; choose another")
        if given and not overwrite:
            raise ValueError(f"--output-dir {out} holds another run: continue it with --resume {out}, replace it "
                             "with --overwrite-output-dir (it is deleted only once this run has completed), or "
                             "choose another directory")
        if out.is_symlink():  # a replacement takes out's name, which here is the link's
            raise ValueError(f"--output-dir {out} is a symbolic link to a directory holding another run; give the "
                             f"directory itself ({out.resolve()}) to replace that run, or choose another directory")
        return cls(out, None)

    @staticmethod
    def _replaces(path: Path, out: Path) -> bool:
        return path.parent.resolve() == out.parent.resolve() and path.name.startswith(f"{out.name}.next-")

    @property
    def is_replacement(self) -> bool:
        """True if this run writes an `out.next-XXXX` that takes `out`'s place once complete."""
        return self._replaces(self.path, self.out)

    def open(self, config: dict[str, Any], start: int, *, write: bool = True) -> None:
        """Create the directory (`write`: rank 0; the other ranks only read where it is) and `metrics`, keeping
        this run's checkpoints up to `start`; warns about interrupted replacements of `out`."""
        if write:
            remove_stale_temporaries(self.out)  # what an earlier run, killed while replacing or pruning, left
            if self.in_place is None:
                self.out.parent.mkdir(parents=True, exist_ok=True)
                self.path = Path(tempfile.mkdtemp(prefix=f"{self.out.name}.next-", dir=self.out.parent))
                self.path.chmod(0o755)
                log.info("%s holds an earlier run: this run writes %s, which replaces it once complete (until then "
                         "the earlier run stays; if this run is interrupted, --resume %s continues it)",
                         self.out, self.path, self.path)
            for unfinished in sorted(self.out.parent.glob(f"{glob.escape(self.out.name)}.next-*")):
                if unfinished.resolve() != self.path.resolve():
                    log.warning("%s: an interrupted run that was to replace %s (--resume it, or delete it)",
                                unfinished, self.out)
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / "train_config.json").exists():  # a resumed run's settings: once it completes
                write_config(self.path / "train_config.json", config)
        self.metrics = Metrics(self.path / "metrics.jsonl", start)
        self.checkpoints = [p for p in (self.path / "checkpoints").glob("step-*")
                            if int(p.name.removeprefix("step-")) <= start]

    def checkpoint_path(self, step: int) -> Path:
        """`checkpoints/step-NNNNNN` of this run's directory (rank 0's: the other ranks never write)."""
        return self.path / "checkpoints" / f"step-{step:06d}"

    def saved(self, checkpoint: Path, *, limit: int, keep: Path | None) -> None:
        """Record a checkpoint this run wrote and prune the oldest beyond `limit`, never `keep`."""
        self.checkpoints = prune_checkpoints([*self.checkpoints, checkpoint], limit, keep=keep)

    def complete(self, config: dict[str, Any]) -> Path:
        """Write the final settings, drop an earlier trajectory's records and checkpoints, put a replacement in
        `out`'s place; returns where the run now is."""
        write_config(self.path / "train_config.json", config)
        self.metrics.finish()
        for stale in sorted((self.path / "checkpoints").glob("step-*")):
            if stale not in self.checkpoints:
                remove_directory(stale)
                log.info("removed %s, left from an earlier run this one replaces", stale)
        if not self.is_replacement:
            return self.path
        replace_directory(self.path, self.out)
        log.info("replaced %s with this run (%s)", self.out, self.path.name)
        return self.out
