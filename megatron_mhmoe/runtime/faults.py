"""Fault injection for reliability tests, driven by the MHMOE_FAULT environment variable.

Unset (production): every hook is a dict lookup that returns at once. Set, it is a comma-separated list of:

    kill_after_rank_file:STEP[@RANK]   SIGKILL in Checkpointer.save at STEP after this rank's file is written
    kill_before_manifest:STEP          SIGKILL rank 0 after gathering the checksums, before the manifest
    kill_before_rename:STEP            SIGKILL rank 0 after the manifest, before `.tmp-step_N` -> `step_N`
    kill_before_latest:STEP            SIGKILL rank 0 after the rename, before `latest` is updated
    kill_before_prune:STEP             SIGKILL rank 0 after `latest` is updated, before old folders are pruned
    kill_rank:R:step:S                 rank R SIGKILLs itself in optimizer step S, between forward and backward
    hang_rank:R:step:S                 rank R sleeps forever there (a stuck peer)
    nan_loss:S  or  nan_loss:S-E       the loss of steps S..E (every micro-batch, every rank) becomes NaN
    inf_loss:S  or  inf_loss:S-E       the same with +Inf

Steps are 1-based optimizer steps (the step being computed; checkpoints are named by the step they follow).
`@RANK` limits a checkpoint kill to one rank; without it every rank that reaches the point is killed.
A malformed spec is a ValueError at startup (train.py calls `check()`), never a silently ignored typo.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

ENV = "MHMOE_FAULT"
CHECKPOINT_POINTS = ("kill_after_rank_file", "kill_before_manifest", "kill_before_rename", "kill_before_latest",
                     "kill_before_prune")
STEP_POINTS = ("kill_rank", "hang_rank")
LOSS_FAULTS = {"nan_loss": float("nan"), "inf_loss": float("inf")}


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    rank: Optional[int] = None


def _int(text: str, item: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{ENV}: {item!r}: {text!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{ENV}: {item!r}: {value} must be >= 0")
    return value


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, _, rest = item.partition(":")
        parts = rest.split(":") if rest else []
        if kind in CHECKPOINT_POINTS and len(parts) == 1:
            step, _, rank = parts[0].partition("@")
            s = _int(step, item)
            faults.append(Fault(kind, s, s, _int(rank, item) if rank else None))
        elif kind in STEP_POINTS and len(parts) == 3 and parts[1] == "step":
            s = _int(parts[2], item)
            faults.append(Fault(kind, s, s, _int(parts[0], item)))
        elif kind in LOSS_FAULTS and len(parts) == 1:
            first, _, last = parts[0].partition("-")
            a = _int(first, item)
            b = _int(last, item) if last else a
            if b < a:
                raise ValueError(f"{ENV}: {item!r}: empty step range")
            faults.append(Fault(kind, a, b))
        else:
            raise ValueError(
                f"{ENV}: cannot parse {item!r}; expected one of "
                + ", ".join(f"{k}:STEP[@RANK]" for k in CHECKPOINT_POINTS)
                + ", kill_rank:R:step:S, hang_rank:R:step:S, nan_loss:S[-E], inf_loss:S[-E]")
    return faults


_cache: dict = {}


def active() -> list[Fault]:
    spec = os.environ.get(ENV, "")
    if not spec:
        return []
    if spec not in _cache:
        _cache[spec] = parse(spec)
    return _cache[spec]


def check() -> Optional[str]:
    """Parse MHMOE_FAULT (ValueError if malformed); a warning line when faults are armed, else None."""
    faults = active()
    if not faults:
        return None
    return f"WARNING: fault injection armed ({ENV}={os.environ[ENV]}): this run will be sabotaged on purpose"


def _die(what: str) -> None:
    print(f"[fault] {what}: SIGKILL pid {os.getpid()}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - the signal is delivered before this returns


def at_checkpoint(point: str, step: int, rank: int) -> None:
    """Called by Checkpointer.save at each of CHECKPOINT_POINTS."""
    for f in active():
        if f.kind == point and f.first == step and (f.rank is None or f.rank == rank):
            _die(f"{point} at step {step} on rank {rank}")


def at_step(step: int, rank: int) -> None:
    """Called by the training loop between forward and backward of optimizer step `step` (1-based)."""
    for f in active():
        if f.kind in STEP_POINTS and f.first == step and f.rank == rank:
            if f.kind == "kill_rank":
                _die(f"kill_rank in step {step} on rank {rank}")
            print(f"[fault] hang_rank in step {step} on rank {rank}: sleeping forever", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)


def loss_value(step: int) -> Optional[float]:
    """NaN/Inf that replaces the loss of `step`, or None."""
    for f in active():
        if f.kind in LOSS_FAULTS and f.first <= step <= f.last:
            return LOSS_FAULTS[f.kind]
    return None


class StepFaultCallback:
    """The trainer's fault hook between forward and backward (tests only): die or hang a rank, poison the loss."""

    def after_forward(self, step: int, micro: int, rank: int, loss):
        """step is 1-based (the step being computed); returns the loss to back-propagate."""
        if micro == 0:
            at_step(step, rank)
        poison = loss_value(step)
        return loss * poison if poison is not None else loss


def step_callbacks() -> list:
    """The callbacks MHMOE_FAULT asks for (none in production)."""
    return [StepFaultCallback()] if active() else []
