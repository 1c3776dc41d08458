"""Ctrl-C in `python -m megatron_mhmoe.train`: one line, exit 130, on every launch path.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread is: in an import of torch or
DeepSpeed, in the process-group start-up, mid-step. Its stack (up to ~60 lines from inside DeepSpeed) says
nothing useful. The handler installed here, before torch is imported, instead prints one line (rank 0 only:
a launcher's Ctrl-C reaches every rank), releases the run-folder lock and leaves at once with 130
(128 + SIGINT). Leaving mid-step is safe: a checkpoint is complete or absent (runtime/checkpoint.py), so the
relaunch resumes from the last complete one.
"""
from __future__ import annotations

import os
import signal
import sys

from megatron_mhmoe.runtime.exit_codes import EXIT_INTERRUPTED

MESSAGE = ("interrupted (Ctrl-C): stopped; relaunch the same command to resume from the last complete checkpoint "
           "(checkpoints are written atomically)")


def _on_sigint(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while leaving changes nothing
    if os.environ.get("RANK", "0") == "0":
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - a closed or broken stdout must not stop the exit
            pass
        try:
            os.write(2, f"\n{MESSAGE}\n".encode())
        except OSError:
            pass
    try:
        from megatron_mhmoe.runtime import run_lock
        run_lock.release_held()
    finally:
        os._exit(EXIT_INTERRUPTED)


def install() -> None:
    """Handle SIGINT with the one-line exit (main thread only, as signal handlers must be)."""
    signal.signal(signal.SIGINT, _on_sigint)
