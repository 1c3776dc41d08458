"""Named ranges of a training step, read by the profiler breakdown (runtime/step_breakdown.py).

Off by default: span() hands back one shared nullcontext and phase_end() returns at once, so the hot path
pays a global read per call and torch.compile sees no profiler op. Profile mode (enable(True)) opens
torch.profiler record_function ranges named 'mhmoe/<category>'. The dispatcher times its phases with
mark/close rather than nested blocks, so it leaves a zero-length marker 'mhmoe/phase_end/<phase>' where a
phase closes; the breakdown splits the dispatcher's range at those markers.
"""
from __future__ import annotations

import contextlib

from torch.profiler import record_function

PREFIX = "mhmoe/"
PHASE_END = PREFIX + "phase_end/"
_NULL = contextlib.nullcontext()
_enabled = False


def enable(on: bool) -> None:
    """Turn the ranges on (profile mode) or off (training; the default)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def span(category: str):
    """with span('moe/router'): ... -- a profiler range in profile mode, nothing otherwise."""
    return record_function(PREFIX + category) if _enabled else _NULL


def phase_end(phase: str) -> None:
    """Mark that the dispatcher phase `phase` (permute, counts_exchange, all_to_all, experts, combine) ends here."""
    if _enabled:
        with record_function(PHASE_END + phase):
            pass
