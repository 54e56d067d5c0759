"""Files that are never half-written, never written by two runs at once, and never left behind:
atomic writes (a temp file beside the target, renamed over it), an OS lock on a run's outputs,
removal of a dead writer's temp files, JSON out."""
from __future__ import annotations

import errno
import json
import os
import re
import sys
from contextlib import contextmanager, suppress
from typing import Any, Iterator

from dualgpt import UserError, WriteFailed

try:
    import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:  # pragma: no cover - Windows
    fcntl = None

TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # what temp_path names


def temp_path(path: str) -> str:
    """Where a write of path goes first: .<name>.<pid>.tmp beside it, so the process it belongs to
    can be told."""
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".{os.path.basename(path)}.{os.getpid()}.tmp")


# what a full disk, a size limit or a read-only or forbidden folder raise: a failed write, not a
# program error
DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
               getattr(errno, "EDQUOT", errno.ENOSPC), errno.EIO}


@contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator:
    """A file that replaces path only when the block succeeds, after its bytes (and, where the
    system allows, the rename) reach the disk. On any failure the temp file is removed and path
    keeps its last good content; a failure of the disk or the folder (full, a file-size limit,
    read-only, forbidden) is raised as one-line WriteFailed, anything else (a network error while
    downloading into it, say) as it is."""
    tmp = temp_path(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            os.remove(tmp)
        if e.errno not in DISK_ERRORS:
            raise
        kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
        raise WriteFailed(f"could not write {path} ({e.__class__.__name__}: {e.strerror}); "
                          f"{kept}, and the run stopped: "
                          "free some disk space or fix the folder's permissions, then run "
                          "it again") from None
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise
    # make the rename durable too; not every system lets a folder be opened or synced
    with suppress(OSError):
        directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, value: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs (a pid of another user's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(*folders: str) -> list[str]:
    """Remove the temp files that writers which no longer run left in the folders (a killed run's
    debris); never one of a live process. Returns what was removed."""
    removed = []
    if os.name != "posix":  # os.kill(pid, 0) is no liveness test elsewhere: leave the files
        return removed
    for folder in folders:
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            match = TEMP.match(name)
            if match and int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"])):
                with suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
    return removed


class OutputLock:
    """An OS lock (flock) on .<name>.lock beside an output, held for a run's life, so that a second
    run on the same output stops at once with one line instead of overwriting the first one's
    files. The kernel releases it when the process ends, however it ends, so a killed run never
    blocks the next."""

    def __init__(self, path: str):
        self.path = path
        self.lock_path = os.path.join(os.path.dirname(os.path.abspath(path)),
                                      f".{os.path.basename(path)}.lock")
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        if fcntl is None:
            return self
        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        # held through a read-only descriptor: a file open for writing would keep its folder from
        # being remounted
        self.fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8",
                                                       "replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{self.path} is in use by another run ({holder}); wait for it to "
                            "finish or stop it, or write elsewhere (--ckpt=ANOTHER_PATH for "
                            "gpt.py and gpt_.py)") from None
        # who holds it, for the next run's message
        with open(self.lock_path, "w", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}")
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            # closing releases the lock; the file stays (removing it would race a new holder)
            os.close(self.fd)
            self.fd = None
