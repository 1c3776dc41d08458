"""The processes under a launcher, read from /proc (Linux): for fault-injection tests and the soak tool.

torchrun and the deepspeed launcher start workers in their own sessions, so a process group or session
does not find them; their parent links do.
"""
from __future__ import annotations

import os


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below pid (children, grandchildren, ...), parents before children."""
    children, out, todo = _children(), [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out
