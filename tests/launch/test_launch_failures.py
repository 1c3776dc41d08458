"""Real launches through every launch/*.sh that fail: a MASTER_PORT held by a listening socket, and a worker
that fails (a data_path that does not exist; a rank SIGKILLed mid-step). Each ends with exactly one error
line, the failing worker's own (or the launch wrapper's for a busy port), its exit code, and no launcher
traceback or summary box; the good dataset is untouched.

The wrapper's parsing of torchrun's and deepspeed's failure output (megatron_mhmoe/launch/proctree.py) is
also checked on their captured output, which needs no launch.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import subprocess
import sys

import pytest

from megatron_mhmoe.launch import proctree
from tests.runtime.test_train_launch import ROOT, byte_data, common_args  # noqa: F401

LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["train_cpu.sh", "train_single_node.sh", "train_torchrun.sh", "train_multi_node.sh"]
ERROR_LINE = re.compile(r"^.*\berror: .*$", re.MULTILINE)


def script_env(name: str, port: int, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in {"GPUS", "NPROC", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "HOSTFILE",
                        "NO_SSH", "INCLUDE", "EXCLUDE", "NUM_NODES", "GPUS_PER_NODE", "LAUNCHER", "DRY_RUN",
                        "RDZV_BACKEND", "RDZV_ID", "TRAIN_MODULE", "SSH_PORT", "MHMOE_FAULT", "MHMOE_TRACEBACK"}}
    env.update(MASTER_PORT=str(port), DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHON=sys.executable)
    if name == "train_multi_node.sh":  # one node, started by hand: no ssh on a test machine
        hosts = tmp_path / "hosts"
        hosts.write_text("localhost slots=2\n")
        env.update(HOSTFILE=str(hosts), MASTER_ADDR="127.0.0.1", NO_SSH="1", NODE_RANK="0")
    else:
        env.update(GPUS="2", NPROC="2", NPROC_PER_NODE="2")
    return env


def run_script(name: str, env: dict, args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(LAUNCH, name), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single error line, which must be the last line of stderr."""
    both = r.stdout + r.stderr
    assert "Traceback" not in both and "ChildFailedError" not in both and "exits with return code" not in both, \
        both[-3000:]
    assert len(ERROR_LINE.findall(both)) == 1, both[-3000:]
    last = r.stderr.rstrip("\n").splitlines()[-1]
    assert ERROR_LINE.search(last), r.stderr[-3000:]
    return last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_hash(path: str) -> dict:
    folder = os.path.dirname(path)
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in os.listdir(folder)
            if n.startswith(os.path.basename(path))}


def tiny_args(data: str, run_dir: str) -> list[str]:
    return common_args(data, run_dir) + ["--parallel.ep=2", "--train.train_steps=4", "--parallel.timeout_s=30"]


# ------------------------------------------------------------------------------------------ busy port
@pytest.mark.parametrize("name", SCRIPTS)
def test_busy_master_port_is_one_line_and_exit_4(name, tmp_path, byte_data):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        r = run_script(name, script_env(name, port, tmp_path), tiny_args(byte_data, str(tmp_path / "run")))
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    assert one_error_line(r) == proctree.port_in_use_message("127.0.0.1", port)
    assert r.stderr.count("\n") == 1, r.stderr
    assert not os.path.exists(tmp_path / "run"), "nothing may start"


# ------------------------------------------------------------------------------------ worker failures
@pytest.mark.parametrize("name", SCRIPTS)
def test_worker_error_is_its_own_line_and_exit_code(name, tmp_path, byte_data):
    before = tree_hash(byte_data)
    missing = str(tmp_path / "missing_text_document")
    args = [a.replace(byte_data, missing) for a in tiny_args(byte_data, str(tmp_path / "run"))]
    r = run_script(name, script_env(name, free_port(), tmp_path), args)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert one_error_line(r).startswith(f"data error: dataset file {missing}.bin does not exist")
    assert tree_hash(byte_data) == before


def test_killed_rank_ends_with_the_surviving_ranks_error(tmp_path, byte_data):
    """rank 1 SIGKILLs itself in step 2: rank 0's one-line error and its exit 4 (or, when the launcher stops
    rank 0 before it prints, the wrapper's line naming the signal and exit 128 + 9)."""
    env = dict(script_env("train_cpu.sh", free_port(), tmp_path), MHMOE_FAULT="kill_rank:1:step:2")
    r = run_script("train_cpu.sh", env, tiny_args(byte_data, str(tmp_path / "run")))
    assert "[fault] kill_rank in step 2 on rank 1" in r.stderr, r.stderr[-3000:]
    line = one_error_line(r)
    if r.returncode == 4:
        assert line.startswith("[rank 0] error: collective failed: a peer rank died or is stuck"), line
    else:
        assert r.returncode == 137 and line.startswith("launch: error: rank 1 was killed by SIGKILL"), line


# ----------------------------------------------------------------------- the launchers' failure output
TORCHRUN_FAILURE = """\
[fault] kill_rank in step 2 on rank 1: SIGKILL pid 11279
W1201 20:42:48.794000 11265 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 11278 closing signal SIGTERM
E1201 20:42:48.909000 11265 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 11279) of binary: python
[rank 0] error: collective failed: a peer rank died or is stuck (detail)
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
megatron_mhmoe.train FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 11279)  (SIGKILL)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 4 (pid: 11278)
============================================================
"""


def relay(text: str) -> tuple[str, proctree._Report]:
    report, out = proctree._Report(), io.StringIO()
    proctree._relay(io.BytesIO(text.encode()), out, report, passthrough=False)
    return out.getvalue(), report


def test_torchrun_failure_output_is_reduced_to_the_workers_line():
    shown, report = relay(TORCHRUN_FAILURE)
    assert shown == "[fault] kill_rank in step 2 on rank 1: SIGKILL pid 11279\n"
    assert report.codes == {1: -9, 0: 4}
    assert proctree._verdict(report, 1) == ("[rank 0] error: collective failed: a peer rank died or is stuck "
                                            "(detail)", 4)
    assert proctree._verdict(report, 0) == ("[rank 0] error: collective failed: a peer rank died or is stuck "
                                            "(detail)", 0), "a launcher that recovered (restarts) succeeded"
    # the same failure without rank 0's line: the signal that killed rank 1, not torchrun's SIGTERM of rank 0
    _, report = relay(TORCHRUN_FAILURE.replace("[rank 0] error", "[rank 0] info").replace(": 4 (pid", ": -15 (pid"))
    line, code = proctree._verdict(report, 1)
    assert code == 128 + 9 and line.startswith("launch: error: rank 1 was killed by SIGKILL"), line


def test_deepspeed_failure_output_and_pdsh_prefixes():
    text = ("[2026-12-01 20:36:17,455] [INFO] [launch.py:253:sigkill_handler] Killing subprocess 1516\n"
            "node1: config error: train.lr must be > 0\n"
            "[2026-12-01 20:36:17,496] [ERROR] [launch.py:259:sigkill_handler] ['python', '-u'] exits with "
            "return code = 2\n"
            "node1: step 1/4 | loss 5.5\n")
    shown, report = relay(text)
    assert shown == "node1: step 1/4 | loss 5.5\n"
    assert proctree._verdict(report, 2) == ("node1: config error: train.lr must be > 0", 2)
    _, report = relay("Traceback (most recent call last):\n  File \"x\", line 1\n"
                      "torch.distributed.DistNetworkError: port: 29777, name: EADDRINUSE, message: address already "
                      "in use\n")
    assert proctree._verdict(report, 1, ("127.0.0.1", 29777)) == (
        proctree.port_in_use_message("127.0.0.1", 29777), 4)


def test_ctrl_c_is_one_line_and_exit_130():
    text = ("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1, in <module>\n"
            "[rank0]: KeyboardInterrupt\n[rank0]: \n[rank0]: During handling of the above exception, another "
            "exception occurred:\n[rank0]: \n[rank0]: Traceback (most recent call last):\n[rank0]:   File \"y\"\n"
            "[rank0]: KeyboardInterrupt\n"
            "Traceback (most recent call last):\n  File \"run.py\", line 9\n"
            "torch.distributed.elastic.multiprocessing.api.SignalException: Process 10296 got signal: 2\n")
    shown, report = relay(text)
    assert shown == ""
    assert proctree._verdict(report, 1) == (
        "launch: error: the launch was stopped by SIGINT; relaunch to resume from the last complete checkpoint", 130)
