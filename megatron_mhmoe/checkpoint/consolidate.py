"""Offline checkpoint surgery without processes or a model: read, verify, gather, re-shard, write.

Used by checkpoint/reshard.py and export/native.py (tools/reshard_checkpoint.py, tools/export_checkpoint.py).
Works on the Checkpointer format (runtime/checkpoint.py): `step_N/rank_XXXXX.pt` + `manifest.json` (sha256
per file) + `latest`.
- `read_checkpoint` verifies every rank file against the manifest, then loads it with
  `torch.load(weights_only=True)` (tensors and plain containers only: a planted pickle is refused);
- `gather_full` assembles single-process ("full") tensors from the TP/EP pieces, using the parameter
  metadata saved in each rank file (runtime/universal.py), vocab padding removed;
- `shard_full` cuts full tensors for any (world, TP, EP) rank, re-padding the vocabulary;
- `write_checkpoint` writes rank files + manifest atomically (temp folder, fsync, rename, then `latest`).
Everything is held in memory: fine up to a few GB of parameters on one machine.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Optional

import torch

from megatron_mhmoe import atomic
from megatron_mhmoe.parallel.layout import RankLayout, validate_sizes
from megatron_mhmoe.parallel.params import shard_piece
from megatron_mhmoe.runtime.checkpoint import (FORMAT_VERSION, LATEST, MANIFEST, CheckpointError, _fsync_write,
                                               _sha256, step_dirname)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def refused_pickle_message(path: str, e: BaseException) -> Optional[str]:
    """The message for a checkpoint that torch.load(weights_only=True) refused, or None for other errors."""
    if "weights_only" not in str(e) and "Unsupported global" not in str(e):
        return None
    return (f"error: refusing to load {path}: it contains pickled objects that are not plain tensors or "
            f"containers ({type(e).__name__}). Checkpoints from this project never do; do not trust this file.")


def run_checkpoint_tool(work: Callable[[], object], input_path: str) -> int:
    """Exit code of a checkpoint tool's work: 0 done, 2 a named problem (no traceback), 3 a refused pickle."""
    import sys
    try:
        work()
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        message = refused_pickle_message(input_path, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 3
    return 0


def resolve_folder(path: str) -> str:
    """A step folder (has manifest.json), or a save_dir whose `latest` names one."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        return path
    latest = os.path.join(path, LATEST)
    if os.path.exists(latest):
        with open(latest) as f:
            name = f.read().strip()
        if not (name.startswith("step_") and name[5:].isdigit()):
            raise CheckpointError(f"{latest} does not name a step folder ({name!r})")
        folder = os.path.join(path, name)
        if os.path.exists(os.path.join(folder, MANIFEST)):
            return folder
    raise CheckpointError(f"{path} is neither a checkpoint step folder (with {MANIFEST}) nor a save_dir with a "
                          f"`{LATEST}` pointer to one")


def read_checkpoint(folder: str, safe_globals: Optional[list] = None,
                    log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """(manifest, [state of rank 0, 1, ...]) after checking every file's size and sha256."""
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    world = int(manifest["layout"]["world_size"])
    entries = {e["file"]: e for e in manifest.get("files", [])}
    states = []
    # A bar on a terminal (big checkpoints take a while to checksum and load); a line per file otherwise.
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=world, desc=f"reading {os.path.basename(folder)}", unit="file", file=sys.stderr)
    for r in range(world):
        name = f"rank_{r:05d}.pt"
        path = os.path.join(folder, name)
        e = entries.get(name)
        if e is None or not os.path.exists(path):
            raise CheckpointError(f"{folder}: {name} is {'not in the manifest' if e is None else 'missing'}")
        if os.path.getsize(path) != e["bytes"] or _sha256(path) != e["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its manifest checksum (corrupt or truncated); "
                                  f"use an older step folder")
        with torch.serialization.safe_globals(list(safe_globals or [])):
            states.append(torch.load(path, map_location="cpu", weights_only=True))
        if bar is not None:
            bar.update(1)
        else:
            log(f"read {path} ({e['bytes'] / 1e6:.1f} MB, sha256 ok)")
    if bar is not None:
        bar.close()
    return manifest, states


# ---------------------------------------------------------------------- gather
def _piece_rank(r: int, layout: RankLayout, meta: dict, t: int, e: int) -> bool:
    return (meta["tp_dim"] is None or layout.tp_rank == t) and (not meta["expert"] or layout.ep_rank == e)


def _gather(pieces: dict, meta: dict, tp: int, ep: int, vocab_size: int) -> torch.Tensor:
    """Full tensor from {(tp_rank, ep_rank): local piece}; shard order is TP chunk, then EP chunk."""
    cols = []
    for t in (range(tp) if meta["tp_dim"] is not None else [0]):
        parts = [pieces[(t, e)] for e in (range(ep) if meta["expert"] else [0])]
        cols.append(torch.cat(parts, dim=meta["ep_dim"]) if meta["expert"] else parts[0])
    full = torch.cat(cols, dim=meta["tp_dim"]) if meta["tp_dim"] is not None else cols[0]
    if meta["vocab"]:
        full = full.narrow(meta["tp_dim"], 0, vocab_size)
    return full.clone()


def model_vocab(manifest: dict, states: list[dict]) -> tuple[int, int]:
    uni = states[0].get("universal")
    if uni is not None:
        return int(uni["vocab_size"]), int(uni["make_vocab_divisible_by"])
    m = manifest.get("config", {}).get("model", {})
    if "vocab_size" not in m:
        raise CheckpointError("the checkpoint records neither universal metadata nor the model config: cannot "
                              "tell the vocabulary size")
    return int(m["vocab_size"]), int(m.get("make_vocab_divisible_by", 128))


def require_universal(states: list[dict], folder: str) -> None:
    if any("universal" not in s for s in states):
        raise CheckpointError(f"{folder} has no universal per-parameter state (written by an older version, or "
                              f"an optimizer without a per-parameter layout): it cannot be resharded or exported")


def _full_piece(t: torch.Tensor, name: str, meta: dict, rank: int) -> torch.Tensor:
    """A rank file's model tensor, refused unless it has the TP/EP-local shape its metadata records."""
    if list(t.shape) != list(meta["local_shape"]):
        hint = (" (only this rank's ZeRO-3 partition: written by an older version, before checkpoints gathered "
                "partitioned parameters; it cannot be resharded or exported)"
                if t.numel() < math.prod(meta["local_shape"]) else "")
        raise CheckpointError(f"rank {rank}'s file holds {name} with shape {list(t.shape)}, its layout says "
                              f"{list(meta['local_shape'])}{hint}")
    return t


def check_target_zero_stage(meta: dict, zero_stage: int) -> None:
    """ZeRO-3 partitions every parameter over DP, which the expert layout cannot take (run_config refuses it)."""
    experts = [n for n, m in meta.items() if m["expert"]]
    if zero_stage == 3 and experts:
        raise CheckpointError(f"--zero-stage 3 needs a dense model, this checkpoint has expert parameters "
                              f"({experts[0]}, ...): ZeRO-3 is refused with MoE layers (as DeepSpeed does); use "
                              f"--zero-stage 1 or 2")


def gather_full(manifest: dict, states: list[dict], with_optimizer: bool = True) -> tuple[dict, dict, dict]:
    """(full model tensors, full optimizer entries {name: {fp32, exp_avg, exp_avg_sq, step}}, meta).

    The model tensors include the persistent buffers (replicated on every rank; taken from rank 0), which
    have no meta and no optimizer entry."""
    lay = manifest["layout"]
    world, tp, ep = int(lay["world_size"]), int(lay["tp"]), int(lay["ep"])
    meta = states[0]["universal"]["meta"]
    vocab, _ = model_vocab(manifest, states)
    layouts = [RankLayout(r, world, tp, ep) for r in range(world)]
    model, optim = {}, {}
    for name, m in meta.items():
        pieces, opt_pieces = {}, {}
        for t in (range(tp) if m["tp_dim"] is not None else [0]):
            for e in (range(ep) if m["expert"] else [0]):
                ranks = [r for r in range(world) if _piece_rank(r, layouts[r], m, t, e)]
                pieces[(t, e)] = _full_piece(states[ranks[0]]["model"][name], name, m, ranks[0])
                if with_optimizer:
                    holder = next((r for r in ranks if name in states[r]["universal"]["params"]), None)
                    if holder is None:
                        raise CheckpointError(f"no rank file holds the universal state of {name} (tp_rank {t}, "
                                              f"ep_rank {e}): the checkpoint is incomplete")
                    opt_pieces[(t, e)] = states[holder]["universal"]["params"][name]
        model[name] = _gather(pieces, m, tp, ep, vocab)
        if with_optimizer:
            optim[name] = {k: _gather({key: p[k] for key, p in opt_pieces.items()}, m, tp, ep, vocab)
                           for k in ("fp32", "exp_avg", "exp_avg_sq")}
            optim[name]["step"] = float(next(iter(opt_pieces.values()))["step"])
    for name, t in states[0]["model"].items():  # buffers (the aux-loss-free bias): replicated, rank 0's
        if name not in meta:
            model[name] = t
    return model, optim, meta


# ---------------------------------------------------------------------- shard
def shard_tensor(full: torch.Tensor, meta: dict, layout: RankLayout, padded: int) -> torch.Tensor:
    """The piece rank `layout` holds (mirror of parallel.params.shard_tensor, from metadata only)."""
    return shard_piece(full, meta["tp_dim"], meta["vocab"], meta["ep_dim"] if meta["expert"] else None,
                       layout.tp_size, layout.tp_rank, layout.ep_size, layout.ep_rank, padded).clone()


def check_divisible(meta: dict, full: dict, tp: int, ep: int, padded: int) -> None:
    for name, m in meta.items():
        shape = list(full[name].shape)
        if m["tp_dim"] is not None:
            size = padded if m["vocab"] else shape[m["tp_dim"]]
            if size % tp:
                raise CheckpointError(f"{name}: dim {m['tp_dim']} of size {size} does not split over TP={tp}")
        if m["expert"] and shape[m["ep_dim"]] % ep:
            raise CheckpointError(f"{name}: {shape[m['ep_dim']]} experts do not split over EP={ep}: pick an EP that "
                                  f"divides the number of experts")


# ---------------------------------------------------------------------- write
def write_checkpoint(save_dir: str, step: int, rank_states: list[dict], manifest: dict,
                     log: Callable[[str], None] = print) -> str:
    """Write `save_dir/step_N` like Checkpointer.save: temp folder, fsync, manifest, rename, `latest`."""
    os.makedirs(save_dir, exist_ok=True)
    final = os.path.join(save_dir, step_dirname(step))
    with atomic.atomic_dir(final, replace=True, hidden=True) as tmp:
        files = []
        for r, state in enumerate(rank_states):
            path = os.path.join(tmp, f"rank_{r:05d}.pt")
            _fsync_write(path, lambda f, s=state: torch.save(s, f))
            files.append({"file": os.path.basename(path), "sha256": _sha256(path), "bytes": os.path.getsize(path)})
            log(f"wrote {os.path.join(final, os.path.basename(path))} ({files[-1]['bytes'] / 1e6:.1f} MB)")
        manifest = dict(manifest, format_version=FORMAT_VERSION, step=step, files=files, time=time.time())
        _fsync_write(os.path.join(tmp, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        atomic.fsync_dir(tmp)
    atomic.fsync_dir(save_dir)
    _fsync_write(os.path.join(save_dir, LATEST), lambda f: f.write(step_dirname(step).encode()))
    return final


def validate_target(world: int, tp: int, ep: int) -> None:
    try:
        validate_sizes(world, tp, ep)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
