"""Checkpoints: every rank's shard, written atomically, verified by checksums, resumed exactly.

Layout of `save_dir`:
    step_00000100/rank_00000.pt ...   one file per rank: model shard (TP shard + local experts),
                                      optimizer state (ZeRO partition or full), scheduler, RNG, data position
    step_00000100/manifest.json       written last by rank 0: layout, step, sha256 and size of each file
    latest                            name of the newest complete step folder (written after the rename)
Saving:
1. every rank writes its file into `.tmp-step_N/` (temp name, fsync, rename);
2. rank 0 gathers the checksums, writes the manifest, renames the folder to `step_N`, then points
   `latest` at it (temp file + rename), then prunes old folders beyond keep_last: only usable checkpoints
   (every rank file present at its manifest size) count; an unusable one is moved to `unusable/`.
A crash at any point leaves the previous `latest` folder untouched: a checkpoint is complete or absent.
A write error (full disk, read-only or failing storage) at any stage is a CheckpointWriteError on every rank
naming the path and the bytes needed; the temporary folder is removed and `latest` keeps its old target.
`check_dir` runs the same writes once before step 1 (probe file, free space, a marker shared across nodes),
so a folder that cannot take a checkpoint stops the run before any compute is spent.
Loading verifies this rank's file against the manifest; if any rank finds a mismatch, every rank falls
back to the previous complete checkpoint, with a message.

Files are read with `torch.load(weights_only=True)`: only tensors and plain containers, never code.
The folder must be the run's own `save_dir` (see docs/security.md).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from megatron_mhmoe import atomic
from megatron_mhmoe.parallel import comm
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.runtime import faults

MANIFEST = "manifest.json"
LATEST = "latest"
UNUSABLE = "unusable"
"""Sub-folder of save_dir where rotation moves checkpoints that resume could not use."""
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


class CheckpointWriteError(CheckpointError):
    """save_dir cannot take a checkpoint: not writable, too little free space, not shared between nodes (found
    by `check_dir` before step 1), or a write failed mid-save (the previous checkpoint stays `latest`)."""


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


class _RecordingFile:
    """torch.save reports a failed write (ENOSPC, EIO) as a RuntimeError without errno ('unexpected pos ...');
    this keeps the OSError underneath so that it can be raised instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _fsync_write(path: str, write: Callable[[Any], None], binary: bool = True) -> None:
    # A hidden `.tmp-` name: a crash mid-write leaves a file that discovery and pruning know to ignore/remove.
    with atomic.atomic_open(path, "wb" if binary else "w", fsync=True, hidden=True) as f:
        rec = _RecordingFile(f)
        try:
            write(rec)
        except RuntimeError:
            if rec.error is not None:
                raise rec.error from None
            raise


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _os_error(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0)
    return f"{name} ({e.strerror})" if name and e.strerror else str(e)


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of path (or of its nearest ancestor)."""
    st = os.statvfs(_existing(path))
    return st.f_bavail * st.f_frsize


def filesystem_of(path: str) -> str:
    """'<mount point> (<type>)' of the filesystem holding path, for messages."""
    real = os.path.realpath(_existing(path))
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return f"{best} ({kind})" if best else real


def _state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def estimate_rank_bytes(module: torch.nn.Module, dp_size: int, edp_size: int, zero_stage: int,
                        precision: str) -> int:
    """An upper estimate of this rank's checkpoint file, before anything is trained: the model shard at its
    dtype, the optimizer state (fp32 master and two Adam moments, 12 bytes a parameter, split over the ZeRO
    partitions; two moments at ZeRO-0 fp32) and the universal copy (12 bytes a parameter, stored by one
    replica), plus 10% and 64 KB for containers, RNG and scheduler state."""
    from megatron_mhmoe.parallel.params import is_expert
    total = 0.0
    for p in module.parameters():
        n = int(getattr(p, "ds_numel", 0) or p.numel())
        replicas = max(1, edp_size if is_expert(p) else dp_size)
        model = n * p.element_size()
        if zero_stage >= 1:
            optim = 12 * n / replicas
        else:
            optim = (8 if precision == "fp32" else 12) * n
        total += model + optim + 12 * n / replicas
    return int(total * 1.1) + (1 << 16)


# Settings that decide which samples a step sees and how tokens are routed: a resume that changes one
# continues a different run than the one saved (train.global_batch_size, for instance, redraws the dataset).
RESUME_KEYS = ("train.global_batch_size", "train.seq_len", "train.seed", "data.data_path", "data.split",
               "model.moe.num_experts", "model.moe.top_k", "model.moe.num_heads", "model.moe.gate",
               "model.moe.gate_scaling", "model.moe.capacity_factor", "model.moe.debug_routing",
               "model.moe.debug_skew_fraction", "model.moe.route_groups", "model.moe.route_group_limit",
               "model.moe.num_shared_experts", "model.moe.head_groups")
"""Keys a record lacks (it was written before the key existed) are not compared."""


def _abs_blend(spec) -> Any:
    """data_path with every prefix absolute (the same files, whichever folder the run is launched from)."""
    if not isinstance(spec, list):
        return spec
    out = []
    for item in spec:
        if isinstance(item, str):
            try:
                float(item)
            except ValueError:
                item = os.path.abspath(item)
        out.append(item)
    return out


def resume_record(cfg: dict) -> dict:
    """RESUME_KEYS of a resolved run config (RunConfig.to_dict()), for the manifest."""
    flat = _flatten(cfg)
    moe = cfg.get("model", {}).get("moe")
    out = {}
    for key in RESUME_KEYS:
        if key.startswith("model.moe.") and moe is None:
            out[key] = None  # a dense model: every routing setting is absent
        else:
            out[key] = flat.get(key)
    out["data.data_path"] = _abs_blend(out["data.data_path"])
    return out


def resume_changes(saved: dict, now: dict) -> list[str]:
    """'key A saved vs B now' for each recorded setting that differs."""
    return [f"{k} {saved.get(k)!r} saved vs {now.get(k)!r} now" for k in RESUME_KEYS
            if k in saved and saved.get(k) != now.get(k)]


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

    # ------------------------------------------------------------------ start-of-run checks
    def check_dir(self, rank_bytes: int) -> None:
        """Collective, before step 1: every rank can create and remove a file in save_dir, the filesystem has
        room for one checkpoint (`rank_bytes`, this rank's estimate, summed over ranks), and with several
        nodes each node's first rank (LOCAL_RANK 0) reads a marker rank 0 wrote there. CheckpointWriteError
        on every rank otherwise, with the same message; nothing is left in save_dir."""
        rank, d = self.ctx.rank, self.save_dir
        problem = None
        probe = os.path.join(d, f".tmp-probe.{rank}.{os.getpid()}")
        try:
            os.makedirs(d, exist_ok=True)
            try:
                with open(probe, "wb") as f:
                    f.write(b"probe")
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                if os.path.lexists(probe):
                    os.remove(probe)
        except OSError as e:
            problem = (f"checkpoint folder {d} is not writable on rank {rank} ({_os_error(e)} on "
                       f"{e.filename or probe}, {filesystem_of(d)}): set train.save_dir to a writable folder "
                       f"on a filesystem every node shares, or fix its permissions/mount")
        needs = self._gather(int(rank_bytes))
        if problem is None:
            need, free = sum(needs), free_bytes(d)
            if free < need:
                problem = (f"checkpoint folder {d} has too little free space for one checkpoint: needs "
                           f"~{_mb(need)}, {_mb(free)} free on {filesystem_of(d)} (model, optimizer state and "
                           f"universal copy of {len(needs)} rank(s)): free space, or set train.save_dir to a "
                           f"larger filesystem every node shares")
        self._raise_first(self._gather(problem))
        if self.ctx.world_size == 1:
            return
        token = secrets.token_hex(16) if rank == 0 else None
        if rank == 0:
            try:
                _fsync_write(os.path.join(d, f".tmp-shared.{token}"), lambda f: f.write(token.encode()))
            except OSError as e:
                problem = f"checkpoint folder {d} is not writable on rank 0 ({_os_error(e)}, {filesystem_of(d)})"
        first = self._gather((token, problem))
        self._raise_first([p for _, p in first])
        token = first[0][0]
        marker = os.path.join(d, f".tmp-shared.{token}")
        if _local_rank(rank) == 0 and rank != 0:
            seen = _read_marker(marker)
            if seen != token:
                problem = (f"checkpoint folder {d} is not shared between nodes: rank {rank} (the first rank on "
                           f"host {socket.gethostname()}) "
                           + ("does not see" if seen is None else "reads another content in")
                           + f" the marker file rank 0 wrote there ({os.path.basename(marker)}). Every rank writes "
                           f"its file into one folder that rank 0 completes, so train.save_dir must be a folder "
                           f"on a filesystem all nodes mount at the same path (NFS, Lustre, ...); with a "
                           f"node-local folder the other nodes' shards would be missing from every checkpoint")
        problems = self._gather(problem)
        if rank == 0:
            try:
                os.remove(marker)
            except OSError:
                pass
        self._raise_first(problems)

    @staticmethod
    def _raise_first(problems: list) -> None:
        found = [p for p in problems if p]
        if found:
            others = sum(1 for p in found if p != found[0])  # a shared filesystem gives every rank the same one
            raise CheckpointWriteError(found[0] + (f" (and {others} other rank(s))" if others else ""))

    def _latest_name(self) -> Optional[str]:
        try:
            with open(os.path.join(self.save_dir, LATEST)) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _write_failure(self, step: int, failure: tuple, needed: int) -> str:
        where, what = failure
        latest = self._latest_name()
        kept = (f"{os.path.join(self.save_dir, latest)} stays the latest checkpoint" if latest
                else "no earlier checkpoint exists")
        left = os.path.join(self.save_dir, f".tmp-{step_dirname(step)}")
        tail = (f"; the temporary folder {left} could not be removed (the next save removes it)"
                if os.path.exists(left) else "")
        return (f"could not write checkpoint {step_dirname(step)}: {what} writing {where} (the checkpoint needs "
                f"~{_mb(needed)}, {_mb(free_bytes(self.save_dir))} free on {filesystem_of(self.save_dir)}); "
                f"{kept}{tail}. Free space or fix the storage (or set train.save_dir to a writable shared "
                f"filesystem, lower train.keep_last), then relaunch: training resumes from the latest checkpoint")

    def _abandon(self, step: int, latest_before: Optional[str]) -> None:
        """Rank 0 after a failed save: remove what it wrote; `latest` keeps pointing at latest_before."""
        shutil.rmtree(os.path.join(self.save_dir, f".tmp-{step_dirname(step)}"), ignore_errors=True)
        final = os.path.join(self.save_dir, step_dirname(step))
        if self._latest_name() != step_dirname(step) and latest_before != step_dirname(step):
            shutil.rmtree(final, ignore_errors=True)  # renamed, but `latest` never pointed at it
        try:
            names = os.listdir(self.save_dir)
        except OSError:
            return
        for name in names:
            if name.startswith(f".tmp-{LATEST}."):
                try:
                    os.remove(os.path.join(self.save_dir, name))
                except OSError:
                    pass

    # ------------------------------------------------------------------ helpers
    def _barrier(self) -> None:
        comm.barrier()

    def _gather(self, obj) -> list:
        return comm.all_gather_object(obj)

    def rank_file(self, folder: str, rank: Optional[int] = None) -> str:
        return os.path.join(folder, f"rank_{self.ctx.rank if rank is None else rank:05d}.pt")

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict, extra_manifest: Optional[dict] = None) -> str:
        """Collective. `state` is this rank's dict of tensors / plain values. Returns the folder.

        A write error on any rank raises CheckpointWriteError on every rank (same message) after rank 0
        removed the partial folder; `latest` still names the previous checkpoint."""
        t0 = time.perf_counter()
        final = os.path.join(self.save_dir, step_dirname(step))
        tmp = os.path.join(self.save_dir, f".tmp-{step_dirname(step)}")
        failure = None  # (path, error) of this rank's failed write
        latest_before = self._latest_name() if self.ctx.rank == 0 else None
        if self.ctx.rank == 0:
            try:
                os.makedirs(self.save_dir, exist_ok=True)
                if os.path.exists(tmp):
                    shutil.rmtree(tmp)  # left by a crash mid-save: never part of a checkpoint
                os.makedirs(tmp)
            except OSError as e:
                failure = (e.filename or tmp, _os_error(e))
        started = self._gather((_state_bytes(state), failure))
        needed = sum(n for n, _ in started)
        self._fail_if_any(step, [f for _, f in started], needed, latest_before)
        # 1.
        path = self.rank_file(tmp)
        entry = None
        try:
            _fsync_write(path, lambda f: torch.save(state, f))
            entry = {"file": os.path.basename(path), "sha256": _sha256(path), "bytes": os.path.getsize(path)}
        except OSError as e:
            failure = (path, _os_error(e))
        faults.at_checkpoint("kill_after_rank_file", step, self.ctx.rank)  # no-op unless MHMOE_FAULT is set
        gathered = self._gather((entry, failure))
        self._fail_if_any(step, [f for _, f in gathered], needed, latest_before)
        entries = [e for e, _ in gathered]
        # 2.
        if self.ctx.rank == 0:
            where = os.path.join(tmp, MANIFEST)
            try:
                faults.at_checkpoint("kill_before_manifest", step, 0)
                manifest = {"format_version": FORMAT_VERSION, "step": step, "layout": self.layout.__dict__,
                            "files": entries, "time": time.time(), **(extra_manifest or {})}
                _fsync_write(where, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
                atomic.fsync_dir(tmp)
                faults.at_checkpoint("kill_before_rename", step, 0)
                where = final
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                atomic.fsync_dir(self.save_dir)
                faults.at_checkpoint("kill_before_latest", step, 0)
                where = os.path.join(self.save_dir, LATEST)
                _fsync_write(where, lambda f: f.write(step_dirname(step).encode()))
            except OSError as e:
                failure = (where, _os_error(e))
            if failure is None:
                faults.at_checkpoint("kill_before_prune", step, 0)
                self._prune(step)
        self._fail_if_any(step, self._gather(failure if self.ctx.rank == 0 else None), needed, latest_before)
        self.log(f"saved checkpoint {final} ({sum(e['bytes'] for e in entries) / 1e6:.1f} MB, "
                 f"{time.perf_counter() - t0:.1f} s)")
        return final

    def _fail_if_any(self, step: int, failures: list, needed: int, latest_before: Optional[str]) -> None:
        """Collective when some rank failed: rank 0 cleans up, then every rank raises the first failure."""
        found = [(r, f) for r, f in enumerate(failures) if f]
        if not found:
            return
        if self.ctx.rank == 0:
            self._abandon(step, latest_before)
        self._barrier()  # the message reads the folder after the clean-up
        rank, failure = found[0]
        more = f" (and {len(found) - 1} other rank(s))" if len(found) > 1 else ""
        raise CheckpointWriteError(f"rank {rank} " + self._write_failure(step, failure, needed) + more)

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
        # Only checkpoints resume would accept count towards keep_last: an unusable one (a rank file missing or
        # cut short) must never push out the newest usable one. It is moved aside for the user to inspect.
        usable = []
        for s in [s for s in steps if s < step]:
            folder = os.path.join(self.save_dir, step_dirname(s))
            problem = self.folder_problem(folder)
            if problem is None:
                usable.append(s)
                continue
            aside = os.path.join(self.save_dir, UNUSABLE, step_dirname(s))
            n = 1
            while os.path.exists(aside):
                aside, n = os.path.join(self.save_dir, UNUSABLE, f"{step_dirname(s)}.{n}"), n + 1
            try:
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                os.replace(folder, aside)
                self.log(f"WARNING: checkpoint {folder} is not usable ({problem}): moved aside to {aside} (not "
                         f"counted in train.keep_last={self.keep_last}; delete it once inspected)")
            except OSError as e:
                self.log(f"WARNING: checkpoint {folder} is not usable ({problem}) and could not be moved aside "
                         f"({_os_error(e)}): left in place, not counted in train.keep_last")
        usable.append(step)  # just written and verified by every rank
        if self.keep_last <= 0:
            return
        for old in usable[:-self.keep_last]:
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
        """None if this rank's file matches the manifest, else what is wrong (resume's check, with checksum)."""
        return self.folder_problem(folder, ranks=[self.ctx.rank], checksum=True)

    def folder_problem(self, folder: str, ranks: Optional[list] = None, checksum: bool = False) -> Optional[str]:
        """None if the rank files of `ranks` (default: every file the manifest lists) are present with the
        manifest's sizes (and, with checksum, its sha256), else the first problem. Rotation uses it without
        checksums: rereading every kept checkpoint at each save would cost more than the save; a file whose
        bytes changed in place is still caught by resume, which then falls back."""
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            return f"manifest unreadable ({e})"
        names = ([e.get("file") for e in manifest.get("files", []) if e] if ranks is None
                 else [os.path.basename(self.rank_file(folder, r)) for r in ranks])
        if not names:
            return "manifest lists no rank file"
        for name in names:
            entry = next((e for e in manifest.get("files", []) if e and e.get("file") == name), None)
            if entry is None:
                return f"manifest lists no {name}"
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                return f"{name} is missing"
            if os.path.getsize(path) != entry["bytes"]:
                return f"{name} has {os.path.getsize(path)} bytes, manifest says {entry['bytes']} (truncated?)"
            if checksum and _sha256(path) != entry["sha256"]:
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


def latest_step(save_dir: str) -> Optional[int]:
    """The step that save_dir's `latest` names, or None (no checkpoint yet): one small read, for pre-flight."""
    try:
        with open(os.path.join(save_dir, LATEST)) as f:
            name = f.read().strip()
    except OSError:
        return None
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def steps_below_checkpoint(save_dir: str, step: int, train_steps: int) -> str:
    """The message for a resume whose train.train_steps is below the checkpoint's step."""
    return (f"train.train_steps={train_steps} is below the step of the checkpoint this run resumes, {step} "
            f"({os.path.join(save_dir, step_dirname(step))}): there is no step left to train and the checkpoint "
            f"cannot be made shorter. To continue training, raise --train.train_steps above {step}; to start "
            f"fresh, use another run_dir (or train.save_dir), or --train.resume=false")


def _local_rank(rank: int) -> int:
    """LOCAL_RANK from the launcher; without one every rank counts as the first of its own node."""
    try:
        return int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        return 0


def _read_marker(path: str, wait_s: float = 2.0) -> Optional[str]:
    # A shared filesystem may show another client's new file a moment late.
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)
