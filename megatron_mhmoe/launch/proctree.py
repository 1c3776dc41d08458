"""Processes under a launcher: the tree read from /proc (Linux), and the wrapper every launch script runs
its launcher through.

`descendants` (fault-injection tests, the soak tool): torchrun and the deepspeed launcher start workers in
their own sessions, so a process group or session does not find them; their parent links do.

`python -m megatron_mhmoe.launch.proctree launch [--rendezvous ADDR:PORT] -- LAUNCHER ARGS...` (launch/*.sh):
a MASTER_PORT already in use is one line and exit 4 before anything starts; a failed run ends with the
first worker error line and that worker's exit code instead of the launcher's traceback.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from typing import Optional


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
            except (OSError, IndexError, ValueError):
                continue  # exited while we looked
            children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below pid (children, grandchildren, ...), parents before children."""
    children, out, todo = _children(), [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


# ------------------------------------------------------------------------------ the launch wrapper
# Every launch script starts its launcher through `python -m megatron_mhmoe.launch.proctree launch`:
# torchrun answers a failed worker with its own traceback and a summary box (and exit 1 whatever the
# worker's code), the deepspeed launcher with its kill log (and the first exit code it happened to poll,
# often the SIGKILLed peer's). The wrapper passes the run's output through, drops that launcher noise, and
# ends with the first worker error line and that worker's exit code (runtime/exit_codes.py). With
# MHMOE_TRACEBACK set (as for train.py) everything is passed through unchanged, for debugging.
PROG = "launch"
# pdsh prefixes each remote line with "host: ", torch a worker's uncaught-exception lines with "[rankN]: ".
_HOST = r"(?:\[rank\d+\]: |[A-Za-z0-9][A-Za-z0-9.-]*: )?"
# The one-line errors megatron_mhmoe.train prints before it exits non-zero, with their exit codes; the code a
# launcher reports for that rank wins (deepspeed's reports only the first exit it polled).
_WORKER_LINES = (
    (re.compile(r"^(?:config|data|run folder) error: "), 2),
    (re.compile(r"^interrupted \(Ctrl-C\): "), 130),  # runtime/interrupt.py; the launcher's own line wins
    (re.compile(r"^stopping: \d+ non-finite steps in a row"), 3),
    (re.compile(r"^\[rank \d+\] error: (?:collective (?:failed|timed out)|could not join the process group)"), 4),
    (re.compile(r"^\[rank \d+\] error: CheckpointWriteError: "), 5),
    (re.compile(r"^\[rank \d+\] error: "), 1),
)
_RANK = re.compile(r"^\[rank (\d+)\]")
_HOST_RE = re.compile("^" + _HOST)
# torch.distributed.elastic's glog-style lines (W/E: its failure chatter) and deepspeed's launcher log.
_TORCH_LOG = re.compile(r"^[WE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/")
_STARS = re.compile(r"^\*{20,}$")  # the frame torchrun draws around its OMP_NUM_THREADS warning
_TORCH_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
_DS_LOG = re.compile(r"^\[[\d\- :,]+\] \[(?:INFO|ERROR)\] \[launch\.py:\d+:sigkill_handler\] (.*)$")
_DS_CODE = re.compile(r"exits with return code = (-?\d+)\s*$")
_BOX_RANK = re.compile(r"^\s*rank\s*: (\d+)")
_BOX_CODE = re.compile(r"^\s*exitcode\s*: (-?\d+)")
_CHILD_FAILED = "ChildFailedError"
_EMPTY_RANK_LINE = re.compile(r"^\[rank\d+\]:\s*$")
_TRACEBACK_STARTS = ("Traceback (most recent call last):", "During handling of the above exception",
                     "The above exception was the direct cause")
_GOT_SIGNAL = re.compile(r"SignalException: Process \d+ got signal: (\d+)")


def port_in_use(addr: str, port: int) -> bool:
    """True if `port` cannot be bound here while `addr` is one of this machine's addresses (so the
    rendezvous would start here); False when it is free or the rendezvous is on another machine."""
    try:
        ip = socket.getaddrinfo(addr, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError, UnicodeError):
        return False  # launch_check has vetted the address; an unresolvable one fails in the launcher
    with socket.socket() as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False  # not an address of this machine: the rendezvous is elsewhere
    with socket.socket() as s:
        # As the store does: a port held only by TIME_WAIT connections of an earlier run is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def port_in_use_message(addr: str, port: int) -> str:
    return (f"{PROG}: error: MASTER_PORT {port} is already in use on this machine (rendezvous {addr}:{port}; "
            f"EADDRINUSE: another job, or a process left over from an earlier run, holds it): set MASTER_PORT to "
            f"a free port (or stop that process) and relaunch")


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class _Report:
    """What the launcher's output said about the failure (filled by the stream readers)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.first_error: Optional[tuple[str, str, int]] = None  # (line, without a host prefix, code by kind)
        self.codes: dict[int, int] = {}  # rank (or local rank) -> exit code, as the launcher reported them
        self.ds_code: Optional[int] = None
        self.launcher_exception: Optional[str] = None
        self.port_busy = False
        self.stopped_by: Optional[int] = None  # the signal (Ctrl-C, scancel) that stopped the launcher


def _relay(stream, out, report: _Report, passthrough: bool) -> None:
    in_traceback = in_box = False
    box_rank = None
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        text = line.rstrip("\n")
        if passthrough:
            out.write(line)
            out.flush()
            continue
        if in_box:  # torchrun's failure summary: read the exit codes, show nothing
            m = _BOX_RANK.match(text)
            if m:
                box_rank = int(m.group(1))
            m = _BOX_CODE.match(text)
            if m and box_rank is not None:
                with report.lock:
                    report.codes.setdefault(box_rank, int(m.group(1)))
            continue
        # Only a line's own text after a pdsh "host: " prefix is matched; "pkg.Error: msg" looks like one too,
        # so traceback lines are matched as they are.
        body = _HOST_RE.sub("", text, count=1)
        if body.startswith(_TRACEBACK_STARTS) or text.startswith(_TRACEBACK_STARTS):
            in_traceback = True  # chained exceptions start over with a "During handling ..." line
            continue
        if _EMPTY_RANK_LINE.match(text):  # around torch's report of a worker's uncaught exception
            continue
        if in_traceback:
            if not text.strip() or text[:1].isspace() or body[:1].isspace() \
                    or body.startswith(("During handling", "The above exception")):
                continue
            in_traceback = False
            if _CHILD_FAILED in text:
                in_box = True
                continue
            stopped = _GOT_SIGNAL.search(text)
            with report.lock:
                if stopped:
                    report.stopped_by = int(stopped.group(1))
                report.launcher_exception = text
                report.port_busy = report.port_busy or "EADDRINUSE" in text or "address already in use" in text
            continue
        if _TORCH_LOG.match(text) or _STARS.match(text):
            m = _TORCH_FAILED.search(text)
            if m:
                with report.lock:
                    report.codes.setdefault(int(m.group(2)), int(m.group(1)))
            continue
        m = _DS_LOG.match(body)
        if m:
            c = _DS_CODE.search(m.group(1))
            if c:
                with report.lock:
                    report.ds_code = int(c.group(1)) if report.ds_code is None else report.ds_code
            continue
        kind = next((code for pattern, code in _WORKER_LINES if pattern.match(body)), None)
        if kind is not None:
            with report.lock:
                if report.first_error is None:
                    report.first_error = (text, body, kind)
            continue  # printed once, last, by launch()
        out.write(line)
        out.flush()


def _verdict(report: _Report, rc: int, rendezvous: Optional[tuple[str, int]] = None) -> tuple[Optional[str], int]:
    """(the last line to print, the exit code) once the launcher has exited with rc."""
    status = 128 - rc if rc < 0 else rc  # a launcher killed by a signal: the shell's 128+N
    if status == 0:  # e.g. torchrun --max_restarts recovered: the error is shown, the run still succeeded
        return (report.first_error[0] if report.first_error else None), 0
    if report.stopped_by is not None or rc < 0:
        num = report.stopped_by if report.stopped_by is not None else -rc
        return (f"{PROG}: error: the launch was stopped by {_signal_name(num)}; relaunch to resume from the last "
                f"complete checkpoint"), 128 + num
    if report.first_error is not None and rendezvous and "EADDRINUSE" in report.first_error[0]:
        return port_in_use_message(*rendezvous), 4  # rank 0 lost the race for the port after the check
    if report.first_error is not None:
        line, body, code = report.first_error
        m = _RANK.match(body)
        reported = report.codes.get(int(m.group(1))) if m else None
        return line, reported if reported is not None and reported > 0 else code
    if report.port_busy:  # taken between the check and the launcher's bind
        addr, port = rendezvous or ("?", "?")
        return port_in_use_message(addr, port), 4
    codes = dict(report.codes)
    if report.ds_code is not None:
        codes.setdefault(-1, report.ds_code)
    # A signal other than SIGTERM first: SIGTERM is how the launchers stop the ranks that were still running.
    for rank, code in sorted(codes.items(), key=lambda kv: (kv[1] >= 0, kv[1] == -signal.SIGTERM, kv[0])):
        who = "a rank" if rank < 0 else f"rank {rank}"
        if code < 0:
            return (f"{PROG}: error: {who} was killed by {_signal_name(-code)} before it printed an error (out of "
                    f"memory? killed by hand?); relaunch to resume from the last complete checkpoint"), 128 - code
        if code > 0:
            return f"{PROG}: error: {who} exited with code {code} without an error line (its output is above)", code
    if status == 0:
        return None, 0
    if report.launcher_exception:
        return f"{PROG}: error: the launcher failed: {report.launcher_exception}", status if status > 0 else 1
    return f"{PROG}: error: the launcher exited with code {status}", status


def launch(cmd: list[str], rendezvous: Optional[str] = None) -> int:
    """Run a launcher command line; return the exit code a launch script should exit with."""
    where = None
    if rendezvous:
        addr, _, port = rendezvous.rpartition(":")
        where = (addr, int(port))
        if port_in_use(*where):
            print(port_in_use_message(*where), file=sys.stderr, flush=True)
            return 4
    passthrough = bool(os.environ.get("MHMOE_TRACEBACK"))  # debugging: show everything as it is
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # worker lines arrive as they are printed
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as e:
        print(f"{PROG}: error: cannot start {cmd[0]}: {e.strerror}", file=sys.stderr, flush=True)
        return 127

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    # Ctrl-C reaches the launcher from the terminal itself; a handler (not SIG_IGN, which the launcher
    # would inherit) keeps the wrapper alive to report what follows.
    signal.signal(signal.SIGINT, lambda s, f: None)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)
    report = _Report()
    readers = [threading.Thread(target=_relay, args=(pipe, out, report, passthrough), daemon=True)
               for pipe, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
    for t in readers:
        t.start()
    rc = proc.wait()
    for t in readers:
        t.join(10)  # a worker that outlives its launcher may hold the pipe open: do not wait for it
    line, code = _verdict(report, rc, where)
    sys.stdout.flush()
    if line:
        print(line, file=sys.stderr, flush=True)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: python -m megatron_mhmoe.launch.proctree launch [--rendezvous ADDR:PORT] -- LAUNCHER "
             f"ARGS...")
    if not argv or argv[0] != "launch" or "--" not in argv:
        print(usage, file=sys.stderr)
        return 2
    cut = argv.index("--")
    opts, cmd = argv[1:cut], argv[cut + 1:]
    rendezvous = None
    if opts[:1] == ["--rendezvous"] and len(opts) == 2 and re.match(r"^.+:\d+$", opts[1]):
        rendezvous = opts[1]
    elif opts or not cmd:
        print(usage, file=sys.stderr)
        return 2
    return launch(cmd, rendezvous)


if __name__ == "__main__":
    sys.exit(main())
