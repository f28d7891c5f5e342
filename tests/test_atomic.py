"""lora.atomic: the one writer of files and directories; what a killed save leaves, and who cleans it up."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora.atomic import atomic_directory, atomic_write, remove_stale_temporaries


def killed_during(code: str, tmp_path: Path) -> None:
    """Run `code` in a process that dies (os._exit, no cleanup) at its end, as under kill -9."""
    script = "import os\nfrom pathlib import Path\nfrom lora.atomic import atomic_directory, atomic_write\n"
    script += textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=60, capture_output=True)
    assert result.returncode == 9, result.stderr.decode()


def test_directory_replaced_as_a_whole(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("old a")
        (tmp / "b").write_text("old b")
    with pytest.raises(RuntimeError, match="midway"), atomic_directory(out) as tmp:
        (tmp / "a").write_text("new a")
        raise RuntimeError("midway")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "old a", "b": "old b"}
    with atomic_directory(out, carry=lambda name: name == "b") as tmp:
        (tmp / "a").write_text("new a")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "new a", "b": "old b"}
    with atomic_directory(out) as tmp:
        (tmp / "c").write_text("c")
    assert [p.name for p in out.iterdir()] == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_false_keeps_the_first_complete_version(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "first").write_text("1")
    second = atomic_directory(tmp_path / "out", replace=False)
    with pytest.raises(FileExistsError, match="already exists"), second as tmp:
        (tmp / "second").write_text("2")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["first"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_file_is_never_replaced_by_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"), atomic_directory(tmp_path / "f"):
        pass
    assert (tmp_path / "f").read_text() == "x"


def test_a_killed_directory_save_leaves_the_old_version_and_the_next_save_cleans_up(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "weights").write_bytes(b"old" * 1000)
        (tmp / "config").write_text("old")
    killed_during("""
        with atomic_directory("out") as tmp:
            (tmp / "weights").write_bytes(b"new" * 1000)
            os._exit(9)  # between the two files
    """, tmp_path)
    assert (tmp_path / "out" / "config").read_text() == "old"
    assert (tmp_path / "out" / "weights").read_bytes() == b"old" * 1000
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and (stale[0] / "weights").is_file()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "config").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_file_save_is_cleaned_by_the_next_one(tmp_path):
    atomic_write(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("old"))
    killed_during("""
        def write(tmp):
            Path(tmp).write_text("half")
            os._exit(9)
        atomic_write("f.json", write)
    """, tmp_path)
    assert (tmp_path / "f.json").read_text() == "old" and len(list(tmp_path.iterdir())) == 2
    atomic_write(tmp_path / "f.json", lambda tmp: Path(tmp).write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"] and (tmp_path / "f.json").read_text() == "new"


def dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_temporaries_of_live_processes_and_other_hosts_are_kept_and_a_reused_pid_is_not_alive(tmp_path):
    import os

    from lora import atomic

    start = atomic._start_time(os.getpid())
    mine = tmp_path / f".out.tmp-{atomic._HOST}-{os.getpid()}.{start}-abcd"
    legacy = tmp_path / f".out.tmp-{atomic._HOST}-{os.getpid()}-abcd"  # a name from before start times
    other_host = tmp_path / ".out.tmp-elsewhere-1-abcd"
    for path in (mine, legacy, other_host):
        path.mkdir()
    assert remove_stale_temporaries(tmp_path / "out") == []
    assert all(p.exists() for p in (mine, legacy, other_host))
    # the same PID with another start time: a process that died, its PID given to this one (a container restart)
    reused = tmp_path / f".out.tmp-{atomic._HOST}-{os.getpid()}.{int(start) - 1}-abcd"
    gone = tmp_path / f".other[1].tmp-{atomic._HOST}-{dead_pid()}.5-abcd"  # any name in the directory, globs too
    for path in (reused, gone):
        path.mkdir()
    assert sorted(remove_stale_temporaries(tmp_path / "out")) == sorted([reused, gone])
    assert all(p.exists() for p in (mine, legacy, other_host))


def test_an_old_version_set_aside_by_a_killed_two_rename_swap_is_put_back(tmp_path, monkeypatch):
    from lora import atomic

    # what a process killed between "old aside" and "new in" leaves (the platform had no renameat2)
    pid = dead_pid()
    aside = tmp_path / f".out.old-{atomic._HOST}-{pid}.7-abcd"
    new = tmp_path / f".out.tmp-{atomic._HOST}-{pid}.7-ef01"
    for directory, text in ((aside, "old"), (new, "new")):
        directory.mkdir()
        (directory / "weights").write_text(text)
    with pytest.raises(OSError, match="disk full"), atomic_directory(tmp_path / "out"):
        raise OSError("disk full")  # the next save fails: the old version must still be there
    assert (tmp_path / "out" / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename path itself
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "weights").write_text("newer")
    assert (tmp_path / "out" / "weights").read_text() == "newer" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_directory_is_deleted_whole_or_not_at_all(tmp_path):
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    for name in ("adapter", "state", "config"):
        (tmp_path / "checkpoints" / "step-1" / name).write_text(name)
    killed_during('''
        import shutil
        import lora.atomic as atomic

        def rmtree(path, **kwargs):
            next(Path(path).iterdir()).unlink()
            os._exit(9)  # one file deleted, two left

        atomic.shutil.rmtree = rmtree
        atomic.remove_directory("checkpoints/step-1")
    ''', tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()][0].startswith(".step-1.tmp-")  # not "step-1"
    atomic_write(tmp_path / "checkpoints" / "step-2", lambda tmp: Path(tmp).write_text("x"))  # the next save
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]


def test_entries_another_process_adds_meanwhile_are_carried_into_the_new_version(tmp_path, monkeypatch):
    # transformers' Trainer: another rank writes rng_state_1.pth into the checkpoint while rank 0 saves into it
    from lora import atomic

    out = tmp_path / "checkpoint-1"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    fsync_tree = atomic._fsync_tree

    def late_writer(root):  # after the carry's pass over `out`, before the swap
        (out / "rng_state_1.pth").write_text("rank 1")
        fsync_tree(root)

    monkeypatch.setattr(atomic, "_fsync_tree", late_writer)
    with atomic_directory(out, carry=lambda name: True) as tmp:
        (tmp / "adapter_model.safetensors").write_text("weights")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors", "rng_state_1.pth",
                                                       "trainer_state.json"]
    assert (out / "rng_state_1.pth").read_text() == "rank 1" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_carried_subdirectories_are_hard_linked_not_copied(tmp_path):
    # A final save into a run directory carries its checkpoint-N directories: no data is copied.
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "optimizer.pt").write_bytes(b"state")
    (run / "adapter_config.json").write_text("old")
    inode = (run / "checkpoint-1" / "optimizer.pt").stat().st_ino
    with atomic_directory(run, carry=lambda name: True) as tmp:
        (tmp / "adapter_config.json").write_text("new")
    assert (run / "adapter_config.json").read_text() == "new"
    assert (run / "checkpoint-1" / "optimizer.pt").read_bytes() == b"state"
    assert (run / "checkpoint-1" / "optimizer.pt").stat().st_ino == inode
