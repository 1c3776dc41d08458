"""After a crash, give wandb the metrics.jsonl rows it never received, so a resumed run's history has no gap.

metrics.jsonl is flushed line by line, so after a SIGKILL it holds every row up to the kill. wandb does not:
its service keeps history in memory and writes the run's `.wandb` file in blocks, so a killed launch leaves
the rows since its last write (often all of them) out of wandb. On resume, `catch_up` (called once, right
after the logger is created) does:

1. metrics.jsonl: rows after the checkpoint's step are dropped (the file is rewritten atomically, the kept
   lines byte for byte): the resumed run computes those steps again and logs them, so each step is in the
   file once.
2. wandb (only when the run resumes the same wandb run id): the rows of metrics.jsonl after the last step
   wandb holds, up to and including the checkpoint's step, are logged again with their own step numbers,
   before training continues. Steps wandb already holds beyond the checkpoint are not sent again by the
   resumed run (wandb keeps one row per step; the ones it has are the killed launch's).

The last step wandb holds: offline (and for an online run whose server state is unknown), the highest
history `_step` in the `.wandb` files of every earlier launch of the run id under `<wandb dir>/wandb/`, read
here (wandb 0.31 ships no Python reader: the files are a LevelDB-style log of 32 KiB blocks of CRC-checked
chunks, each record a `wandb_internal_pb2.Record`); reading stops at the first torn or corrupt chunk, where a
killed service stopped writing. Online, wandb.init's `starting_step` after a resume (the server's next step).
"""
from __future__ import annotations

import glob
import json
import math
import os
import struct
import zlib
from typing import Iterator, Optional

from megatron_mhmoe import atomic

_HEADER = struct.Struct("<4sHB")  # b":W&B", 0xBEE1, version
_CHUNK = struct.Struct("<IHB")  # crc32 of (type byte + data), length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str) -> Iterator[bytes]:
    """The serialized records of a `.wandb` file, up to its first torn or corrupt chunk."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return
    if len(data) < _HEADER.size or _HEADER.unpack_from(data)[:2] != (b":W&B", 0xBEE1):
        return
    pos, pending = _HEADER.size, None
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += left
        if pos + _CHUNK.size > len(data):
            return
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        chunk = data[pos + _CHUNK.size:pos + _CHUNK.size + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            return
        pos += _CHUNK.size + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE and pending is not None:
            pending += chunk
        elif kind == _LAST and pending is not None:
            yield pending + chunk
            pending = None
        else:
            return


def history_steps(path: str) -> list[int]:
    """The `_step` of every history row in a `.wandb` file, in file order."""
    from wandb.proto import wandb_internal_pb2
    steps = []
    for raw in wandb_records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a record wandb could not have written whole: stop as at a torn chunk
            break
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            if item.key == "_step" or list(item.nested_key) == ["_step"]:
                steps.append(int(json.loads(item.value_json)))
                break
        else:
            steps.append(int(record.history.step.num))
    return steps


def run_files(wandb_dir: str, run_id: str) -> list[str]:
    """Every launch's `.wandb` file of run_id under wandb_dir (wandb.init's `dir`), oldest first."""
    rid = glob.escape(run_id)
    pattern = os.path.join(glob.escape(wandb_dir), "wandb", f"*-{rid}", f"run-{rid}.wandb")
    return sorted(p for p in glob.glob(pattern) if not os.path.islink(os.path.dirname(p)))


def last_wandb_step(wandb_dir: str, run_id: str) -> Optional[int]:
    """The highest history step wandb wrote for run_id here, or None when it wrote none."""
    steps = [s for path in run_files(wandb_dir, run_id) for s in history_steps(path)]
    return max(steps) if steps else None


def _rows(path: str) -> list[tuple[str, dict]]:
    """(line, row) of metrics.jsonl; a torn last line (the kill hit the write) is left out."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    out.append((line if line.endswith("\n") else line + "\n", row))
    except FileNotFoundError:
        pass
    return out


def wandb_row(row: dict) -> dict:
    """What MetricsLogger.log sends to wandb for a metrics.jsonl row (no step/time, no NaN)."""
    return {k: v for k, v in row.items()
            if k not in ("step", "time") and not (isinstance(v, float) and math.isnan(v))}


def catch_up(logger, checkpoint_step: int) -> Optional[str]:
    """Steps 1 and 2 of the module docstring for a run resumed at checkpoint_step; a line saying what was
    done, or None when there was nothing to do."""
    if not logger.enabled or checkpoint_step <= 0 or logger.jsonl is None:
        return None
    path = os.path.join(logger.run_dir, "metrics.jsonl")
    rows = _rows(path)
    kept = [(line, row) for line, row in rows if row["step"] <= checkpoint_step]
    notes = []
    with open(path, "rb") as f:
        unchanged = f.read() == "".join(line for line, _ in kept).encode()
    if not unchanged:
        logger.jsonl.close()
        with atomic.atomic_open(path, "w", fsync=True) as f:
            f.writelines(line for line, _ in kept)
        logger.jsonl = open(path, "a")
        later = sorted({row["step"] for _, row in rows if row["step"] > checkpoint_step})
        if later:
            notes.append(f"metrics.jsonl: dropped the rows of steps {later[0]}-{later[-1]}, after the checkpoint at "
                         f"step {checkpoint_step} (this run computes them again)")
    if logger.run is not None and logger.resume_id:
        last = None
        if logger.mode == "online" and getattr(logger.run, "starting_step", 0):
            last = int(logger.run.starting_step) - 1
        elif logger.mode != "online":
            last = last_wandb_step(logger.wandb_dir, logger.resume_id)
        missed = [row for _, row in kept if last is None or row["step"] > last]
        for row in missed:
            logger.run.log(wandb_row(row), step=row["step"])
        if last is not None and last > checkpoint_step:
            logger.wandb_floor = last  # those steps are in wandb already, from the killed launch
        if missed:
            notes.append(f"wandb: sent {len(missed)} row(s) of metrics.jsonl (steps {missed[0]['step']}-"
                         f"{missed[-1]['step']}) that the interrupted launch had not written to wandb "
                         f"(wandb held steps up to {last if last is not None else 'none'})")
    return "; ".join(notes) or None
