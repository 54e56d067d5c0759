"""Files that are never half-written, never written by two runs at once, and never left behind:
atomic writes, an OS lock on a run's outputs, removal of a dead writer's temp files."""
from __future__ import annotations

import errno
import hashlib
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

# where a write of path goes first: .<name>.<pid>.tmp beside it, so its process can be told
TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")
# what a full disk, a size limit, a read-only or forbidden folder, or a place where no file can be
# made (/proc) raise: a failed write, not a bug
DISK_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
               getattr(errno, "EDQUOT", errno.ENOSPC), errno.EIO, errno.ENOENT, errno.ENOTDIR,
               errno.EISDIR}


@contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator:
    """A temp file that replaces path only when the block succeeds, after its bytes (and, where
    the system allows, the rename) reach the disk. On any failure the temp file goes and path keeps
    its last good content; a failure of the disk or folder is raised as one-line WriteFailed,
    anything else (a network error while downloading into it, say) as it is."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, OSError) or e.errno not in DISK_ERRORS:
            raise
        kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
        raise WriteFailed(f"could not write {path} ({e.__class__.__name__}: {e.strerror}); "
                          f"{kept}, and the run stopped: free some disk space or fix the "
                          "folder's permissions, then run it again") from None
    with suppress(OSError):  # the rename durable too; not every system lets a folder be synced
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_json(path: str, value: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


def append_json_line(path: str, record: dict) -> None:
    """Add one JSON line to a log; a failed write is one line (WriteFailed), the run stops."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise WriteFailed(f"could not append to {path} ({e.__class__.__name__}: {e.strerror}); "
                          "the run stopped: free some disk space or fix the folder's "
                          "permissions, then --resume") from None


def keep_json_lines(path: str, keep) -> None:
    """Rewrite a JSON-lines log with only the records keep(record) accepts; a line cut short by a
    killed writer goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if keep(record):
                kept.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(kept))


def remove_dead_temps(*folders: str) -> None:
    """Remove the temp files of writers that no longer run (a killed run's debris), never one of a
    live process, saying which. Elsewhere than POSIX os.kill(pid, 0) is no liveness test: the files
    stay."""
    for folder in folders if os.name == "posix" else []:
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            match = TEMP.match(name)
            if not match or int(match["pid"]) == os.getpid():
                continue
            try:
                os.kill(int(match["pid"]), 0)  # raises if no such process runs
            except ProcessLookupError:
                with suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, name))
                    print(f"note: {os.path.join(folder, match['name'])} was left half-written by "
                          "a run that stopped; removed (what it was for is made again)")
            except PermissionError:  # another user's live process
                pass


class OutputLock:
    """An OS lock (flock) on .<name>.lock beside an output, held for a run's life: a second run on
    the same output stops at once with one line instead of overwriting the first one's files. The
    kernel releases it when the process ends, however it ends, so a killed run never blocks."""

    def __init__(self, path: str):
        folder, name = os.path.split(os.path.abspath(path))
        self.path, self.lock_path = path, os.path.join(folder, f".{name}.lock")
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        if fcntl is None:
            return self
        os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
        # held through a read-only descriptor: one open for writing would keep its folder from
        # being remounted
        self.fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
            self.__exit__()
            raise UserError(f"{self.path} is in use by another run ({holder or 'another process'}"
                            "); wait for it to finish or stop it, or write elsewhere "
                            "(--ckpt=ANOTHER_PATH for gpt.py and gpt_.py)") from None
        with open(self.lock_path, "w", encoding="utf-8") as f:  # who holds it, for the next run
            f.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}")
        return self

    def __exit__(self, *exc) -> None:
        # closing releases the lock; the file stays (removing it would race a new holder)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
