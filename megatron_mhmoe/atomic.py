"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one, never half.

Every writer in the package that replaces a file or folder goes through here. The rule is the same each
time: write under a temporary name beside the target (same filesystem, so the rename is atomic), flush
(and fsync where a crash must not lose the data: checkpoints, rewritten logs), then `os.replace` onto the
target. An exception inside the block removes the temporary and leaves the target as it was.

Temporary names: `<name>.tmp-<pid>-<random>` beside the target, or, with hidden=True,
`.tmp-<name>.<pid>-<random>`: the checkpoint code treats every `.tmp-` entry of a save_dir as debris of an
interrupted write (ignored by discovery, removed by pruning), so its files use the hidden form. The random
part keeps two writers of the same file apart even when they are processes with the same id on two nodes
sharing a filesystem (ranks filling the dataset index cache).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import IO, Any, Iterator


def temp_path(path: str, hidden: bool = False) -> str:
    """The temporary name `path` is written under before the rename (unique per process)."""
    folder, name = os.path.split(path.rstrip(os.sep))
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = f".tmp-{name}.{tag}" if hidden else f"{name}.tmp-{tag}"
    return os.path.join(folder, tmp)


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str, hidden: bool = False) -> Iterator[str]:
    """A temporary path for a library that writes by file name (`tk.save(tmp)`); renamed onto `path` when
    the block ends without an exception, removed otherwise."""
    tmp = temp_path(path, hidden)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", *, fsync: bool = False, hidden: bool = False,
                encoding: str | None = None) -> Iterator[IO]:
    """`open(path, mode)` that only replaces `path` once the block has written everything.
    mode: "w" or "wb"; fsync: force the data to disk before the rename."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, hidden) as tmp:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def write_text(path: str, text: str, fsync: bool = False) -> None:
    with atomic_open(path, "w", fsync=fsync, encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj: Any, indent: int = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON (plus a final newline)."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str, replace: bool = False, hidden: bool = False) -> Iterator[str]:
    """A fresh temporary folder to fill; it becomes `path` when the block ends without an exception.
    replace: an existing `path` is removed first (only then, so a failed write keeps the old folder).
    Without it an existing `path` is an error (os.replace cannot put a folder over a non-empty one)."""
    tmp = temp_path(path, hidden)
    os.makedirs(tmp)
    try:
        yield tmp
        if replace:
            _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
