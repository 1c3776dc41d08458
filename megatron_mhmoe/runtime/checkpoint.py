"""Checkpoints: every rank's shard, written atomically, verified by checksums, resumed exactly.

Layout of `save_dir`:
    step_00000100/rank_00000.pt ...   one file per rank: model shard (TP shard + local experts),
                                      optimizer state (ZeRO partition or full), scheduler, RNG, data position
    step_00000100/manifest.json       written last by rank 0: layout, step, sha256 and size of each file
    latest                            name of the newest complete step folder (written after the rename)
Saving:
1. every rank writes its file into `.tmp-step_N/` (temp name, fsync, rename);
2. rank 0 gathers the checksums, writes the manifest, renames the folder to `step_N`, then points
   `latest` at it (temp file + rename), then prunes old folders beyond keep_last.
A crash at any point leaves the previous `latest` folder untouched: a checkpoint is complete or absent.
Loading verifies this rank's file against the manifest; if any rank finds a mismatch, every rank falls
back to the previous complete checkpoint, with a message.

Files are read with `torch.load(weights_only=True)`: only tensors and plain containers, never code.
The folder must be the run's own `save_dir` (see security notes in the README).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.runtime import faults

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointLayout:
    world_size: int
    tp: int
    ep: int
    zero_stage: int
    precision: str

    def describe(self) -> str:
        return (f"world={self.world_size} TP={self.tp} EP={self.ep} ZeRO-{self.zero_stage} {self.precision}")


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    # A hidden `.tmp-` name: a crash mid-write leaves a file that discovery and pruning know to ignore/remove.
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": _np_state_to_tensors(np.random.get_state()),
            "python": _py_state_to_tensors(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_tensors_to_np_state(state["numpy"]))
    random.setstate(_tensors_to_py_state(state["python"]))
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


# numpy/python RNG states hold non-tensor objects; weights_only loading wants tensors and plain types.
def _np_state_to_tensors(s) -> dict:
    return {"keys": torch.from_numpy(s[1].astype(np.int64)), "pos": int(s[2]), "has_gauss": int(s[3]),
            "gauss": float(s[4])}


def _tensors_to_np_state(d) -> tuple:
    return ("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["gauss"])


def _py_state_to_tensors(s) -> dict:
    return {"version": s[0], "state": torch.tensor(s[1], dtype=torch.int64), "gauss": s[2]}


def _tensors_to_py_state(d) -> tuple:
    return (d["version"], tuple(int(x) for x in d["state"].tolist()), d["gauss"])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def model_mismatch(expected: dict, saved: dict, saved_model_cfg: Optional[dict] = None,
                   model_cfg: Optional[dict] = None) -> Optional[str]:
    """None if `saved` (a rank's model state) has exactly the keys and shapes of `expected`, else what differs:
    the model config fields (from the manifest) and the first differing parameters."""
    shapes = []
    for k in sorted(set(expected) | set(saved)):
        a, b = expected.get(k), saved.get(k)
        if a is None or b is None:
            shapes.append(f"{k} {'missing from the checkpoint' if b is None else 'not in this model'}")
        elif tuple(a.shape) != tuple(b.shape):
            shapes.append(f"{k} {list(b.shape)} saved vs {list(a.shape)} here")
    if not shapes:
        return None
    parts = []
    if saved_model_cfg is not None and model_cfg is not None:
        old, new = _flatten(saved_model_cfg), _flatten(model_cfg)
        diffs = [f"model.{k} {old.get(k)!r} saved vs {new.get(k)!r} here" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        if diffs:
            parts.append("; ".join(diffs[:6]) + (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else ""))
    parts.append(f"{len(shapes)} parameter(s) differ: " + "; ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
    return "; ".join(parts)


class Checkpointer:
    def __init__(self, save_dir: str, ctx: ParallelContext, layout: CheckpointLayout, keep_last: int = 2,
                 log: Callable[[str], None] = print, safe_globals: Optional[list] = None):
        self.save_dir, self.ctx, self.layout, self.keep_last, self.log = save_dir, ctx, layout, keep_last, log
        self.safe_globals = list(safe_globals or [])
        """Classes (beyond tensors and plain containers) that loading may construct."""

    # ------------------------------------------------------------------ helpers
    def _barrier(self) -> None:
        comm.barrier()

    def _gather(self, obj) -> list:
        return comm.all_gather_object(obj)

    def rank_file(self, folder: str, rank: Optional[int] = None) -> str:
        return os.path.join(folder, f"rank_{self.ctx.rank if rank is None else rank:05d}.pt")

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict, extra_manifest: Optional[dict] = None) -> str:
        """Collective. `state` is this rank's dict of tensors / plain values. Returns the folder."""
        t0 = time.perf_counter()
        final = os.path.join(self.save_dir, step_dirname(step))
        tmp = os.path.join(self.save_dir, f".tmp-{step_dirname(step)}")
        if self.ctx.rank == 0:
            os.makedirs(self.save_dir, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)  # left by a crash mid-save: never part of a checkpoint
            os.makedirs(tmp)
        self._barrier()
        # 1.
        path = self.rank_file(tmp)
        _fsync_write(path, lambda f: torch.save(state, f))
        entry = {"file": os.path.basename(path), "sha256": _sha256(path), "bytes": os.path.getsize(path)}
        faults.at_checkpoint("kill_after_rank_file", step, self.ctx.rank)  # no-op unless MHMOE_FAULT is set
        entries = self._gather(entry)
        # 2.
        if self.ctx.rank == 0:
            faults.at_checkpoint("kill_before_manifest", step, 0)
            manifest = {"format_version": FORMAT_VERSION, "step": step, "layout": self.layout.__dict__,
                        "files": entries, "time": time.time(), **(extra_manifest or {})}
            _fsync_write(os.path.join(tmp, MANIFEST),
                         lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            _fsync_dir(tmp)
            faults.at_checkpoint("kill_before_rename", step, 0)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.save_dir)
            faults.at_checkpoint("kill_before_latest", step, 0)
            _fsync_write(os.path.join(self.save_dir, LATEST), lambda f: f.write(step_dirname(step).encode()))
            faults.at_checkpoint("kill_before_prune", step, 0)
            self._prune(step)
        self._barrier()
        self.log(f"saved checkpoint {final} ({sum(e['bytes'] for e in entries) / 1e6:.1f} MB, "
                 f"{time.perf_counter() - t0:.1f} s)")
        return final

    def _prune(self, step: int) -> None:
        # Folders newer than the one just saved are from an abandoned timeline (a crash before `latest`
        # moved, then a resume from an older checkpoint): never resumed from, and they must not push the
        # current checkpoints out of keep_last.
        for name in os.listdir(self.save_dir):
            if name.startswith(f".tmp-{LATEST}."):  # a `latest` write cut short by a crash
                try:
                    os.remove(os.path.join(self.save_dir, name))
                except OSError:
                    pass
        steps = self.complete_steps()
        for stale in [s for s in steps if s > step]:
            shutil.rmtree(os.path.join(self.save_dir, step_dirname(stale)), ignore_errors=True)
        if self.keep_last <= 0:
            return
        for old in [s for s in steps if s <= step][:-self.keep_last]:
            shutil.rmtree(os.path.join(self.save_dir, step_dirname(old)), ignore_errors=True)

    # ------------------------------------------------------------------ discovery
    def complete_steps(self) -> list[int]:
        """Steps with a manifest, oldest first (folders without one are incomplete and ignored)."""
        if not os.path.isdir(self.save_dir):
            return []
        steps = []
        for name in os.listdir(self.save_dir):
            if name.startswith("step_") and os.path.exists(os.path.join(self.save_dir, name, MANIFEST)):
                try:
                    steps.append(int(name[5:]))
                except ValueError:
                    continue
        return sorted(steps)

    def _verify(self, folder: str) -> Optional[str]:
        """None if this rank's file matches the manifest, else what is wrong."""
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            return f"manifest unreadable ({e})"
        name = os.path.basename(self.rank_file(folder))
        entry = next((e for e in manifest.get("files", []) if e.get("file") == name), None)
        if entry is None:
            return f"manifest lists no {name}"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        if os.path.getsize(path) != entry["bytes"]:
            return f"{name} has {os.path.getsize(path)} bytes, manifest says {entry['bytes']} (truncated?)"
        if _sha256(path) != entry["sha256"]:
            return f"{name} checksum differs from the manifest (corrupt)"
        return None

    def check_layout(self, folder: str) -> dict:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        saved = CheckpointLayout(**manifest["layout"])
        if (saved.world_size, saved.tp, saved.ep) != (self.layout.world_size, self.layout.tp, self.layout.ep) \
                or saved.zero_stage != self.layout.zero_stage:
            raise CheckpointError(
                f"checkpoint {folder} was written with {saved.describe()}, this run is "
                f"{self.layout.describe()}: convert it first with `python tools/reshard_checkpoint.py "
                f"--input {folder} --output NEW_DIR --tp {self.layout.tp} --ep {self.layout.ep} "
                f"--world-size {self.layout.world_size}`, or launch with the saved layout")
        return manifest

    # ------------------------------------------------------------------ load
    def load_latest(self) -> Optional[tuple[int, dict, dict]]:
        """Collective. (step, this rank's state, manifest) of the newest valid checkpoint, or None."""
        candidates = self.complete_steps()
        latest = os.path.join(self.save_dir, LATEST)
        if os.path.exists(latest):
            with open(latest) as f:
                name = f.read().strip()
            if name.startswith("step_") and name[5:].isdigit():
                pointed = int(name[5:])
                candidates = [s for s in candidates if s <= pointed]
        for step in reversed(candidates):
            folder = os.path.join(self.save_dir, step_dirname(step))
            problem = self._verify(folder)
            problems = [p for p in self._gather(problem) if p]
            if problems:
                self.log(f"WARNING: checkpoint {folder} is not usable ({'; '.join(sorted(set(problems)))}); "
                         f"trying the previous one")
                continue
            manifest = self.check_layout(folder)
            with torch.serialization.safe_globals(self.safe_globals):
                state = torch.load(self.rank_file(folder), map_location="cpu", weights_only=True)
            return step, state, manifest
        return None
