"""On-disk cache of dataset index arrays (.npy, never pickles), named by a hash of their parameters.

Files: `<dir>/<name>-<hash>-<array>.npy` plus `<name>-<hash>-desc.json`, the parameters in readable
form. Every file is written to a temporary name and moved into place with os.replace, and the
description is written last, so a reader (another rank, a later run) sees either a complete entry
or none. Several ranks building the same entry at once is harmless: they write identical bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import numpy as np

from megatron_mhmoe import atomic

CACHE_DIR_NAME = "index_cache"


def params_hash(desc: dict) -> str:
    """Stable short hash of a JSON-able parameter description."""
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode("utf-8")).hexdigest()[:20]


def default_cache_dir(data_prefix: str) -> str:
    """`index_cache/` next to the data files."""
    return os.path.join(os.path.dirname(os.path.abspath(data_prefix)), CACHE_DIR_NAME)


class IndexCache:
    """Load or store a named group of numpy arrays; a None directory disables caching."""

    def __init__(self, cache_dir: Optional[str], log: Callable[[str], None] = lambda m: None) -> None:
        self.cache_dir = cache_dir
        self.log = log

    def _path(self, key: str, part: str, ext: str = ".npy") -> str:
        assert self.cache_dir is not None
        return os.path.join(self.cache_dir, f"{key}-{part}{ext}")

    def load(self, key: str, parts: list[str]) -> Optional[dict[str, np.ndarray]]:
        """The arrays of a complete entry (memory-mapped, read-only), or None."""
        if self.cache_dir is None or not os.path.exists(self._path(key, "desc", ".json")):
            return None
        try:
            return {p: np.load(self._path(key, p), allow_pickle=False, mmap_mode="r") for p in parts}
        except (OSError, ValueError) as e:  # partial or corrupt entry: rebuild it
            self.log(f"index cache entry {key} unreadable ({e}); rebuilding")
            return None

    def save(self, key: str, arrays: dict[str, np.ndarray], desc: dict) -> bool:
        """Store an entry atomically; False (with a log line) if the directory is not writable."""
        if self.cache_dir is None:
            return False
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            for part, arr in arrays.items():
                with atomic.atomic_open(self._path(key, part), "wb", hidden=True) as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            atomic.write_json(self._path(key, "desc", ".json"), desc, sort_keys=True)
            return True
        except OSError as e:
            self.log(f"cannot write index cache in {self.cache_dir} ({e}); indices stay in memory only "
                     "(pass cache_dir= a writable directory to reuse them)")
            return False
