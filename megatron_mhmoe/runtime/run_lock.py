"""One run per run folder: a lock file taken by the first rank before anything is written.

Two launches into one `run_dir` (or one `train.save_dir`) would resume each other's checkpoints, overwrite
them and double every metrics row; the second launch is refused instead, naming the first (host, pid, start
time). The lock is `<folder>/.mhmoe-run.lock`, a small JSON record created with O_EXCL, refreshed (mtime)
every REFRESH_S by a daemon thread and removed on exit (normal end, error, Ctrl-C).
A lock left by a process that no longer exists (kill -9, a crash, a reboot) cannot be removed by it:
1. its host is this host and its pid is gone (or now belongs to another process, told apart by the
   process start time from /proc): the lock is stale, taken over with a note, and the run resumes by itself;
2. its host is another one (a shared filesystem): whether that process lives cannot be seen from here. A lock
   not refreshed for train.lock_stale_s is reported as probably stale, with the command that clears it;
   a fresher one means the run is alive. Either way this launch stops: only a person can tell.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Callable, Optional

LOCK_NAME = ".mhmoe-run.lock"
REFRESH_S = 30.0
"""How often a live run touches its lock (train.lock_stale_s must be well above this)."""


class RunLockError(RuntimeError):
    """The folder is in use by another run (or its lock cannot be written)."""


def effective_save_dir(run_dir: str, save_dir: str) -> str:
    """train.save_dir as the run uses it: the default follows run_dir (`<run_dir>/checkpoints`)."""
    if save_dir == "runs/default/checkpoints" and run_dir != "runs/default":
        return os.path.join(run_dir, "checkpoints")
    return save_dir


def check_run_folders(run_dir: str, save_dir: str) -> None:
    """ValueError when run_dir or train.save_dir (or a folder above one) is an existing file."""
    for what, path in (("run_dir", run_dir), ("train.save_dir", save_dir)):
        probe = os.path.abspath(path)
        while True:
            if os.path.exists(probe) and not os.path.isdir(probe):
                where = "is" if probe == os.path.abspath(path) else f"is inside {probe}, which is"
                raise ValueError(f"{what} {path!r} {where} an existing file, not a folder: choose another "
                                 f"{what} (--{what}=...), or move the file away")
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat fields after the command name (field 3, the state, first), or [] without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, proc_start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: it holds nothing
        return False
    now = fields[19] if len(fields) > 19 else None
    return not (proc_start and now and now != proc_start)  # a reused pid is another process


def _describe(rec: dict) -> str:
    started = rec.get("started") or "an unknown time"
    return f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, started {started}"


class RunLock:
    """Locks on one or more folders, held by this process until release()."""

    def __init__(self, folders: list[str], stale_s: float, log: Callable[[str], None]):
        self.folders = list(dict.fromkeys(os.path.abspath(f) for f in folders))
        self.stale_s, self.log = stale_s, log
        self.paths: list[str] = []
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                       "time": time.time(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "token": os.urandom(8).hex()}
        self._stop = threading.Event()

    def acquire(self) -> "RunLock":
        try:
            for folder in self.folders:
                self._take(folder)
        except BaseException:
            self.release()
            raise
        threading.Thread(target=self._refresh, name="run-lock-refresh", daemon=True).start()
        return self

    def _take(self, folder: str) -> None:
        path = os.path.join(folder, LOCK_NAME)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            return  # a folder nothing can be written into needs no lock: the run's write checks name the problem
        data = json.dumps(self.record).encode()
        for _ in range(3):  # a stale lock replaced by a racing relaunch: look again
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._judge(path)  # raises unless the lock is stale (then it was removed)
                continue
            except OSError:
                # Read-only or full: no run can write here either, and the checkpoint folder's check before
                # step 1 (runtime/checkpoint.py check_dir, exit 5) says what is wrong and how to fix it.
                return
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.paths.append(path)
            return
        raise RunLockError(f"could not take the run lock {path}: other launches keep taking it")

    def _judge(self, path: str) -> None:
        """Remove a stale lock at path (with a note), else raise RunLockError naming its holder."""
        try:
            with open(path) as f:
                rec = json.load(f)
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            rec, age = {}, time.time() - os.path.getmtime(path) if os.path.exists(path) else 0.0
        if not rec and age < 5.0:  # being written this instant by another launch
            raise RunLockError(f"the run folder {os.path.dirname(path)} is being locked by another launch right now "
                               f"({path}): two launches into one folder; use another --run_dir")
        same_host = rec.get("host") == socket.gethostname()
        if not rec or (same_host and not _alive(int(rec.get("pid", -1)), rec.get("proc_start"))):
            self.log(f"note: taking over the run lock {path} of a run that has ended without releasing it "
                     f"({_describe(rec) if rec else 'unreadable record'}; killed or crashed): resuming its folder")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            return
        who = _describe(rec)
        if not same_host and age > self.stale_s:
            raise RunLockError(
                f"the run folder {os.path.dirname(path)} is locked by a run on another host ({who}), whose lock "
                f"has not been refreshed for {age:.0f} s (> train.lock_stale_s={self.stale_s:g}): that run has "
                f"probably ended without releasing it. If no run is using this folder on {rec.get('host')}, "
                f"remove the lock (rm {path}) and relaunch; otherwise use another --run_dir")
        raise RunLockError(
            f"the run folder {os.path.dirname(path)} is in use by another run ({who}; lock {path}): two runs in one "
            f"folder would overwrite each other's checkpoints and metrics. Wait for it to finish (or stop it), or "
            f"use another --run_dir (and train.save_dir)")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            for path in self.paths:
                try:
                    os.utime(path)
                except OSError:
                    pass

    def release(self) -> None:
        """Remove the locks this process holds (only if they still hold its record)."""
        self._stop.set()
        for path in self.paths:
            try:
                with open(path) as f:
                    if json.load(f).get("token") != self.record["token"]:
                        continue
                os.remove(path)
            except (OSError, ValueError):
                pass
        self.paths = []


_HELD: Optional[RunLock] = None


def acquire(folders: list[str], stale_s: float, log: Callable[[str], None]) -> RunLock:
    """Take the locks for this process (released by release_held, which every exit path calls)."""
    global _HELD
    _HELD = RunLock(folders, stale_s, log).acquire()
    return _HELD


def release_held() -> None:
    global _HELD
    if _HELD is not None:
        _HELD.release()
        _HELD = None
