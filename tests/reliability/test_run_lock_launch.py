"""Real launches of `python -m megatron_mhmoe.train` into one run folder, and Ctrl-C on every launch path.

1. Run A trains, saves step 2 and hangs in step 3 (MHMOE_FAULT), holding the run-folder lock;
2. run B (another seed) into the same folder exits 2 before building anything, naming A (host, pid, start
   time); A's checkpoints and metrics are untouched;
3. A is killed with SIGKILL (its lock stays behind); run C, the same command with a raised train_steps, takes
   the stale lock over with a note, resumes from A's step 2 by itself and prints the schedule rule with the
   old and new lr; Ctrl-C then ends C with the one line and exit 130, and the lock is gone.
Ctrl-C during start-up: a single process interrupted while importing, and a 2-process job (its ranks
started as a launcher starts them) interrupted as it joins its group and builds: exit 130, no stack, one line
from rank 0, nothing from rank 1.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from megatron_mhmoe.runtime.interrupt import MESSAGE
from megatron_mhmoe.runtime.run_lock import LOCK_NAME
from tests.distributed import free_port
from tests.runtime.test_train_launch import ROOT, byte_data, common_args  # noqa: F401


class _Run:
    """A launched training process whose stdout/stderr are read as they come (no pipe can fill up)."""

    def __init__(self, args: list[str], fault: str = "", **env_extra):
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", **env_extra)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MHMOE_FAULT"):
            if k not in env_extra:
                env.pop(k, None)
        if fault:
            env["MHMOE_FAULT"] = fault
        self.proc = subprocess.Popen([sys.executable, "-m", "megatron_mhmoe.train"] + args, cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(f, buf), daemon=True)
                        for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(f, buf: list) -> None:
        for line in f:
            buf.append(line)

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def wait_for(self, pred, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None:
                self.finish(None)
                raise AssertionError(f"exited {self.proc.returncode} before {what}: {self.text()[-3000:]}")
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {self.text()[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float | None = 120) -> int:
        self.proc.wait(timeout=timeout)
        for t in self.readers:
            t.join(timeout=10)
        return self.proc.returncode

    def interrupted(self, rank0: bool = True) -> str:
        """After a SIGINT: exit 130, no stack, the one line last on rank 0's stderr (nothing from the others)."""
        code, text = self.finish(60), self.text()
        assert code == 130, (code, text[-3000:])
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
        err = "".join(self.err)
        if rank0:
            assert err.strip().splitlines()[-1] == MESSAGE, err[-2000:]
        else:
            assert MESSAGE not in err, err[-2000:]
        return text


def test_second_run_refused_then_kill9_relaunch_resumes(byte_data, tmp_path):
    run = str(tmp_path / "run")
    ckpt, lock = os.path.join(run, "checkpoints"), os.path.join(run, LOCK_NAME)
    base = common_args(byte_data, run) + ["--parallel.ep=1", "--train.save_interval=2", "--train.eval_interval=0"]
    a = _Run(base + ["--train.train_steps=6", "--train.seed=1"], fault="hang_rank:0:step:3")
    try:
        a.wait_for(lambda: os.path.exists(lock), "A's lock")
        b = _Run(base + ["--train.train_steps=6", "--train.seed=2"])  # while A builds and trains
        assert b.finish() == 2, b.text()[-3000:]
        err = "".join(b.err)
        assert (f"run folder error: the run folder {run} is in use by another run (host {socket.gethostname()}, "
                f"pid {a.pid}, started 20") in err, err[-3000:]
        assert "parameters:" not in b.text() and "Traceback" not in err  # stopped before anything was built
        a.wait_for(lambda: os.path.exists(os.path.join(ckpt, "latest")), "A's first checkpoint")
    finally:
        a.proc.kill()  # kill -9: the lock stays behind
        a.finish()
    assert os.path.exists(lock)
    with open(os.path.join(ckpt, "step_00000002", "manifest.json")) as f:
        assert json.load(f)["config"]["train"]["seed"] == 1  # A's checkpoint, not B's
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == [1, 2], steps  # no row written twice
    c = _Run(base + ["--train.train_steps=8", "--train.seed=1"], fault="hang_rank:0:step:3")
    c.wait_for(lambda: any("resumed from" in line for line in c.out), "C's resume")
    assert os.path.exists(lock)  # C holds it now
    c.proc.send_signal(signal.SIGINT)  # Ctrl-C mid-run, one process
    text = c.interrupted()
    assert f"note: taking over the run lock {lock} of a run that has ended" in text and f"pid {a.pid}" in text
    assert f"resumed from {ckpt} at step 2" in text
    assert ("note: train.train_steps is 8, the checkpoint was trained for 6: the schedule is recomputed for 8 "
            "steps (train.resume_schedule=recompute)") in text and "Learning rate of the next step: " in text
    assert not os.path.exists(lock)  # released on Ctrl-C


def test_ctrl_c_during_start_up_is_one_line(byte_data, tmp_path):
    # one process, interrupted while it imports torch
    solo = _Run(common_args(byte_data, str(tmp_path / "solo")) + ["--parallel.ep=1"])
    time.sleep(0.5)
    solo.proc.send_signal(signal.SIGINT)
    solo.interrupted()
    # two ranks, started as a launcher starts them, interrupted as they join the group and build (DeepSpeed)
    port = str(free_port())
    args = common_args(byte_data, str(tmp_path / "pair")) + ["--parallel.ep=2"]
    ranks = [_Run(args, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
             for r in (0, 1)]
    ranks[0].wait_for(lambda: os.path.exists(tmp_path / "pair" / LOCK_NAME), "rank 0's pre-flight")
    for r in ranks:
        r.proc.send_signal(signal.SIGINT)
    ranks[0].interrupted()
    ranks[1].interrupted(rank0=False)
    assert not os.path.exists(tmp_path / "pair" / LOCK_NAME)
