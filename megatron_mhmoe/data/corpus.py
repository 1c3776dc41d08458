"""A JSONL corpus of this machine's Python standard library sources: the built-in data, no download.

Each line is {"text": <source of one .py file>, "path": <path relative to the stdlib root>}, in a
deterministic (sorted) order, stopping before the output exceeds max_mb. site-packages and
__pycache__ are skipped; files are decoded per their PEP 263 coding line (undecodable ones skipped).
"""
from __future__ import annotations

import io
import json
import os
import sys
import sysconfig
import tokenize
from typing import Iterator

from megatron_mhmoe import atomic

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def iter_sources(root: str) -> Iterator[tuple[str, str]]:
    """(relative posix path, source text) of every .py file under root, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)  # in place: controls the walk order
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
                text = raw.decode(encoding)
            except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
                continue  # unreadable or deliberately broken test files
            yield os.path.relpath(path, root).replace(os.sep, "/"), text


def build_corpus(out: str, max_mb: float = 8.0, root: str | None = None, repeat: int = 1,
                 log_every: int = 500) -> tuple[int, int]:
    """Write the corpus; returns (documents written, bytes written)."""
    root = root or sysconfig.get_paths()["stdlib"]
    limit = int(max_mb * 1e6)
    lines: list[bytes] = []
    total = 0
    for rel, text in iter_sources(root):
        line = (json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n").encode("utf-8")
        if total + len(line) > limit:
            break
        lines.append(line)
        total += len(line)
        if len(lines) % log_every == 0:
            print(f"collected {len(lines)} files, {total / 1e6:.1f} MB", file=sys.stderr, flush=True)
    if not lines:
        raise SystemExit(f"error: no Python sources found under {root} within --max-mb {max_mb}")
    folder = os.path.dirname(out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with atomic.atomic_open(out, "wb") as f:
        for r in range(repeat):
            f.writelines(lines)
            if repeat > 1:
                print(f"wrote copy {r + 1}/{repeat}", file=sys.stderr, flush=True)
    return len(lines) * repeat, total * repeat
