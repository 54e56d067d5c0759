"""Writing files so that a reader never sees half of one: a temp file beside the target, renamed over it."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, suppress
from typing import Any, Iterator


def temp_path(path: str) -> str:
    """Where a write of path goes first: .<name>.<pid>.tmp beside it, so the process it belongs to can be told."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")


@contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator:
    """A file that replaces path only when the block succeeds, after its bytes (and the rename) reach the disk.
    On any failure the temp file is removed and path keeps its last good content."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_path(path)
    try:
        f = open(tmp, mode, **kwargs)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, value: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


def read_json(path: str) -> Any:
    """A JSON file's content, or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
