"""The one way this library writes files and directories: all or nothing, even across a crash.

A file or directory is written under a temporary name beside its destination, every file and directory
of it is fsynced, and then it takes the destination's name in one rename: a reader (or the next run after
a crash, kill -9 or power loss) sees either the complete old version or the complete new one, never a mix.

- `atomic_write(path, write)`: one file; `write(temporary_path)` fills it.
- `atomic_directory(path)`: a context manager yielding an empty temporary directory to fill; on a clean
  exit it replaces `path` as a whole. An existing directory is swapped out in one `renameat2`
  `RENAME_EXCHANGE` (Linux) and deleted only after the new one is in place; where the platform lacks
  that call, two renames (old aside, new in) leave a window of a few microseconds in which `path` is
  missing (the old version is still complete beside it, as `.NAME.old-...`).

Temporaries are named `.NAME.tmp-HOST-PID.START-RANDOM` (START: the process's start time, where the system
tells it, so that a later process given the same PID, as after a container restart, is not taken for it). A
save that raises removes its own; one whose process was killed leaves it behind, and the next save into the
same directory removes every temporary there whose process (on this host) is gone, so a crashed save of a
large checkpoint does not hold its disk space forever. The old version a two-rename replacement sets aside is
named `.NAME.old-...`: if the process died before the new version took its place, the next save puts it back
rather than deleting it. A replaced or deleted directory is renamed to a temporary before it is deleted, so a
kill midway leaves a temporary to clean up, never a half-deleted directory under a name that means something.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_directory", "remove_directory", "replace_directory", "remove_stale_temporaries"]

_HOST = socket.gethostname().replace("-", "_") or "host"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# .NAME.tmp-HOST-PID.START-RANDOM (START absent in names written before it was recorded)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[^-]+)-(?P<pid>\d+)(?:\.(?P<start>\d+))?"
                        r"-[0-9a-f]+$")
_owners: dict[int, str] = {}


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, from Linux's /proc), or None where that is unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _temporary_name(path: Path, kind: str = "tmp") -> Path:
    pid = os.getpid()
    if pid not in _owners:  # per process: a forked child has its own PID and start time
        _owners[pid] = f"{_HOST}-{pid}.{_start_time(pid) or 0}"
    return path.with_name(f".{path.name}.{kind}-{_owners[pid]}-{secrets.token_hex(4)}")


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    now = _start_time(pid) if start not in (None, "0") else None
    return now is None or now == start  # a different start time: the PID was given to a later process


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that killed saves left beside `path` (in its directory, for any name; those of
    live processes and other hosts stay); returns what was removed. An old version set aside by an unfinished
    two-rename replacement is put back under its name instead, if nothing took that name."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in sorted(path.parent.iterdir()):
        match = _TEMPORARY.match(candidate.name)
        if match is None or match["host"] != _HOST or _process_alive(int(match["pid"]), match["start"]):
            continue
        original = candidate.with_name(match["name"])
        if match["kind"] == "old" and not original.exists() and not original.is_symlink():
            os.rename(candidate, original)  # the complete old version: its replacement never arrived
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (directories after their entries), then `root`."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            file = Path(directory) / name
            if not file.is_symlink():
                _fsync_path(file)
        _fsync_path(Path(directory))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of `a` and `b` atomically (Linux `renameat2`); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, f"cannot swap {a} and {b}: {os.strerror(error)}")


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # not a POSIX libc
        return None


def replace_directory(source: str | os.PathLike, destination: str | os.PathLike, *, replace: bool = True,
                      carry: Callable[[str], bool] | None = None) -> None:
    """Give the complete directory `source` the name `destination`, deleting what was there after.

    `source` must be a sibling of `destination` (same filesystem) whose content is already fsynced (as
    `atomic_directory` does). With `replace=False` an existing non-empty `destination` is kept and
    `FileExistsError` raised. `carry(name)`: entries that appeared in the old version after `source` was filled
    (another process writing there meanwhile) and that the new one lacks are moved into it before the old one
    is deleted.
    """
    source, destination = Path(source), Path(destination)
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise FileExistsError(f"{destination}: exists and is not a directory; refusing to replace it")
    try:
        os.rename(source, destination)  # destination missing, or an empty directory: one rename
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not replace:
            raise FileExistsError(f"{destination}: already exists") from err
        if _exchange(source, destination):
            old = source  # now the old version
        else:
            old = _temporary_name(destination, "old")  # put back by the next save if we die before the second rename
            os.rename(destination, old)
            os.rename(source, destination)
        # The new version is in place: what follows tidies up, and a failure there must not fail the save.
        try:
            if carry is not None:
                for entry in sorted(old.iterdir()):
                    if carry(entry.name) and not (destination / entry.name).exists():
                        os.rename(entry, destination / entry.name)  # an open file keeps being written, now there
            remove_directory(old)
        except Exception:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_path(destination.parent)


def remove_directory(path: str | os.PathLike) -> None:
    """Delete a directory as a whole: renamed to a temporary first, so that a kill while it is being deleted
    leaves a temporary (removed by the next save there), not a half-deleted directory under its name."""
    path = Path(path)
    trash = _temporary_name(path)
    os.rename(path, trash)
    shutil.rmtree(trash)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, *, replace: bool = True, carry: Callable[[str], bool] | None = None
) -> Iterator[Path]:
    """Fill the yielded temporary directory; on a clean exit it becomes `path`, as a whole.

    >>> with atomic_directory("out/adapter") as tmp:  # doctest: +SKIP
    ...     save_file(tensors, tmp / "adapter_model.safetensors")
    ...     (tmp / "adapter_config.json").write_text(text)

    `carry(name)`: entries of the existing `path` that the new version did not write and for which it
    returns True are carried over (hard-linked, or copied) before the swap, so, say, the tokenizer files
    of a checkpoint directory survive a re-save of its weights. On an exception nothing changes and the
    temporary directory is removed. `replace=False`: raise `FileExistsError` if `path` exists
    non-empty by the time the new version is complete.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path}: exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        if carry is not None and path.is_dir():
            for entry in sorted(path.iterdir()):
                if (tmp / entry.name).exists() or not carry(entry.name):
                    continue
                if entry.is_dir():  # a tree of hard links: carrying a run's checkpoints copies no data
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, tmp / entry.name)
        _fsync_tree(tmp)
        replace_directory(tmp, path, replace=replace, carry=carry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call `write(temporary_path)`, fsync the file, rename it to `path`, fsync the directory.

    >>> atomic_write("adapter.safetensors", lambda tmp: save_file(tensors, tmp))  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path)
    try:
        write(str(tmp))
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
