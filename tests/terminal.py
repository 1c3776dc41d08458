"""Run a command with stderr on a pseudo-terminal, to test what a person at a terminal sees (progress bars)."""
from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios


def run_on_terminal(cmd: list[str], cwd: str, timeout: float = 120) -> tuple[int, str]:
    """(exit code, everything written to stderr) with stderr on a 120 x 30 pseudo-terminal, stdout discarded."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    shown = bytearray()
    while True:
        try:
            block = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not block:
            break
        shown += block
    os.close(master)
    return proc.wait(timeout=timeout), shown.decode("utf-8", errors="replace")
