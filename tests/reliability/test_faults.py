"""Fault injection end to end: 2-process CPU training (EP=2, ZeRO-1) killed with SIGKILL at every stage of a
checkpoint save (MHMOE_FAULT hooks, runtime/faults.py), at random times (torchrun and every rank at once),
with a corrupted newest checkpoint, and with one rank dead or stuck mid-step.

- every relaunch resumes from the last complete checkpoint and the final metrics.jsonl holds, for every step,
  exactly (bitwise) the loss of an uninterrupted run;
- after every kill the checkpoint folder is valid or absent: each `step_*` folder has a manifest whose files
  all exist with their checksums, and `latest` names a complete folder;
- a truncated rank file in the newest checkpoint is detected by the manifest and the previous one is used,
  with a message;
- a rank that dies (or hangs) mid-step turns into a clear error on the surviving rank, exit code 4, within
  parallel.timeout_s, instead of a hang.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from megatron_mhmoe.runtime.checkpoint import LATEST, MANIFEST
from megatron_mhmoe.launch.proctree import descendants
from tests.distributed import free_port
from tests.runtime.test_train_launch import ROOT, byte_data, common_args, finish, losses, torchrun  # noqa: F401

STEPS = 12
KILL_POINTS_TRIED: list[str] = []  # reported at the end of the module (pytest -s), see test_zz_report


def fault_args(data: str, run_dir: str, steps: int = STEPS) -> list[str]:
    return common_args(data, run_dir) + ["--parallel.ep=2", f"--train.train_steps={steps}",
                                         "--train.save_interval=2", "--train.keep_last=3"]


def launch(args: list[str], fault: str = "") -> subprocess.Popen:
    """torchrun with 2 ranks: when one rank dies the agent stops the other (as in production)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("MHMOE_FAULT", None)
    if fault:
        env["MHMOE_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "megatron_mhmoe.train"] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it at once, like a node losing power. (torchrun starts
    each worker in its own session, so killing the launcher's process group would leave them running.)"""
    victims = descendants(pid) + [pid]
    for p in victims:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_killed(args: list[str], fault: str) -> str:
    proc = launch(args, fault)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    point = fault.split(":")[0]
    assert f"[fault] {point}" in out, out[-3000:]
    KILL_POINTS_TRIED.append(fault)
    return out


def sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def check_checkpoints(save_dir: str) -> tuple[list[int], int | None]:
    """Every step_* folder is complete and verified; `latest` (if any) names one. Returns (steps, latest)."""
    if not os.path.isdir(save_dir):
        return [], None
    steps = []
    for name in sorted(os.listdir(save_dir)):
        folder = os.path.join(save_dir, name)
        if not name.startswith("step_"):
            assert name == LATEST or name.startswith(".tmp-"), name  # a crash leaves only .tmp-* behind
            continue
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)  # a step_* folder without a readable manifest would be half-written
        assert sorted(e["file"] for e in manifest["files"]) == ["rank_00000.pt", "rank_00001.pt"]
        for e in manifest["files"]:
            path = os.path.join(folder, e["file"])
            assert os.path.getsize(path) == e["bytes"] and sha(path) == e["sha256"], path
        assert manifest["step"] == int(name[5:])
        steps.append(manifest["step"])
    latest = None
    if os.path.exists(os.path.join(save_dir, LATEST)):
        name = open(os.path.join(save_dir, LATEST)).read().strip()
        assert re.fullmatch(r"step_\d{8}", name), name
        latest = int(name[5:])
        assert latest in steps, (latest, steps)
    return steps, latest


def resumed_at(out: str) -> int | None:
    m = re.search(r"resumed from .* at step (\d+)", out)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def reference(byte_data, tmp_path_factory) -> dict[int, float]:
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    finish(torchrun(2, fault_args(byte_data, run_dir)))
    want = losses(run_dir)
    assert sorted(want) == list(range(1, STEPS + 1))
    return want


def test_sigkill_at_every_checkpoint_stage_and_corrupt_latest_resume_exactly(byte_data, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    save_dir = os.path.join(run_dir, "checkpoints")
    args = fault_args(byte_data, run_dir)
    # 1. rank 1 dies right after writing its file of step 4: step 2 is the last complete checkpoint.
    out = run_killed(args, "kill_after_rank_file:4@1")
    assert resumed_at(out) is None
    assert check_checkpoints(save_dir) == ([2], 2)
    # 2. rank 0 dies after gathering the checksums, before the manifest of step 4.
    out = run_killed(args, "kill_before_manifest:4")
    assert resumed_at(out) == 2
    assert check_checkpoints(save_dir) == ([2], 2)
    # 3. manifest written, folder not yet renamed: still only a .tmp- folder.
    out = run_killed(args, "kill_before_rename:6")
    assert resumed_at(out) == 2
    assert check_checkpoints(save_dir) == ([2, 4], 4)
    # 4. step_8 complete but `latest` still names step_6: the pointer wins.
    out = run_killed(args, "kill_before_latest:8")
    assert resumed_at(out) == 4
    assert check_checkpoints(save_dir) == ([2, 4, 6, 8], 6)
    # 5. corrupt the checkpoint `latest` points at: the manifest checksum catches it, step 4 is used.
    victim = os.path.join(save_dir, "step_00000006", "rank_00001.pt")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    KILL_POINTS_TRIED.append("truncated rank file of the latest checkpoint")
    out = run_killed(args, "kill_before_prune:10")
    assert "checkpoint" in out and "step_00000006 is not usable" in out and "truncated" in out, out[-3000:]
    assert "trying the previous one" in out
    assert resumed_at(out) == 4
    steps, latest = check_checkpoints(save_dir)
    assert latest == 10 and steps[-1] == 10 and 6 in steps  # step 6 rewritten, now valid
    # 6. finish.
    out = finish(launch(args))
    assert resumed_at(out) == 10
    assert check_checkpoints(save_dir)[1] == STEPS
    got = losses(run_dir)  # the last record of each step: relaunches rewrite the steps they redo
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [reference[s] for s in sorted(reference)]  # bitwise


def test_sigkill_whole_job_at_random_times_resumes_exactly(byte_data, reference, tmp_path):
    """SIGKILL torchrun and both ranks at a random point of training, then relaunch; three times."""
    seed = int(os.environ.get("MHMOE_FAULT_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    run_dir = str(tmp_path / "run")
    save_dir = os.path.join(run_dir, "checkpoints")
    args = fault_args(byte_data, run_dir)
    report, kills, resume_step = [], 0, 0
    for attempt in range(6):
        proc = launch(args)
        lines: list[str] = []
        started = threading.Event()

        def read(p=proc, acc=lines, ev=started):
            for line in p.stdout:
                acc.append(line)
                if re.match(r"step +\d+/", line) or "resumed from" in line:
                    ev.set()
            ev.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert started.wait(240), "".join(lines)[-3000:]
        # A random step of what is left, then a random fraction of a step: forward, backward, optimizer,
        # logging, evaluation or a checkpoint save may be under way.
        first = resume_step + 1
        target = rng.randint(first, STEPS - 1) if first < STEPS else STEPS
        while proc.poll() is None and not any(re.match(rf"step +{target}/", x) for x in list(lines)):
            time.sleep(0.002)
        delay = rng.uniform(0.0, 0.1)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            kill_tree(proc.pid)
        proc.wait(60)
        reader.join(10)
        last = max([int(m.group(1)) for m in (re.match(r"step +(\d+)/", x) for x in lines) if m] or [0])
        steps, latest = check_checkpoints(save_dir)  # valid or absent after every kill
        resume_step = latest or 0
        report.append(f"seed {seed} attempt {attempt}: {delay:.3f}s after the line of step {target}, "
                      f"{'killed' if killed else 'finished before the kill'}; last logged step {last}, "
                      f"complete checkpoints {steps}, latest {latest}")
        if killed:
            kills += 1
            KILL_POINTS_TRIED.append(f"random SIGKILL of torchrun + both ranks {delay:.3f}s after step {target} "
                                     f"(last logged step {last}, latest checkpoint then {latest})")
        if not killed or kills == 3 or latest == STEPS:
            break
    print("\n".join(report))
    out = finish(launch(args))
    steps, latest = check_checkpoints(save_dir)
    assert latest == STEPS, out[-2000:]
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), report
    assert [got[s] for s in sorted(got)] == [reference[s] for s in sorted(reference)], report


# ---------------------------------------------------------------------- dead or stuck peer: no hang
def launch_ranks(args: list[str], fault: str, world: int = 2, only: list[int] | None = None) -> list[subprocess.Popen]:
    """Each rank as a plain process (no torchrun agent to clean up): what survivors do is up to them."""
    port = free_port()
    procs = []
    for r in (range(world) if only is None else only):
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", RANK=str(r),
                   LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("MHMOE_FAULT", None)
        if fault:
            env["MHMOE_FAULT"] = fault
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_mhmoe.train"] + args, cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


class Watch:
    """Reads a process's output in a thread; remembers when a pattern first appeared."""

    def __init__(self, proc: subprocess.Popen, pattern: str):
        self.proc, self.lines, self.seen_at = proc, [], None
        self.pattern = re.compile(pattern)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.seen_at is None and self.pattern.search(line):
                self.seen_at = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.parametrize("fault, timeout_s, needle", [
    ("kill_rank:1:step:3", 20, r"collective failed: a peer rank died or is stuck"),
    ("hang_rank:1:step:3", 8, r"collective timed out after 8s \(parallel.timeout_s\): a peer rank died or is stuck"),
])
def test_dead_or_stuck_peer_is_a_clear_error_within_the_timeout(byte_data, tmp_path, fault, timeout_s, needle):
    args = fault_args(byte_data, str(tmp_path / "run")) + [f"--parallel.timeout_s={timeout_s}"]
    procs = launch_ranks(args, fault)
    watches = [Watch(procs[0], r"error: "), Watch(procs[1], r"\[fault\]")]
    try:
        procs[0].wait(240)
        ended = time.monotonic()
        watches[0].thread.join(10)
        out0 = watches[0].text
        assert procs[0].returncode == 4, out0[-3000:]
        assert re.search(r"\[rank 0\] error: " + needle, out0), out0[-3000:]
        assert "resumes from the last complete checkpoint" in out0 and "Traceback" not in out0
        assert watches[1].seen_at is not None, watches[1].text[-2000:]
        waited = ended - watches[1].seen_at
        print(f"{fault}: rank 0 exited {waited:.1f}s after rank 1's fault (timeout {timeout_s}s)")
        assert waited < timeout_s + 15
        if fault.startswith("hang"):
            assert waited > timeout_s - 1  # it really waited for the timeout, not less
        KILL_POINTS_TRIED.append(fault)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)


def test_peer_that_never_arrives_is_a_clear_error(byte_data, tmp_path):
    """Only rank 0 of a 2-rank job starts: joining the group fails after parallel.timeout_s, exit 4."""
    args = fault_args(byte_data, str(tmp_path / "run")) + ["--parallel.timeout_s=4"]
    proc = launch_ranks(args, "", world=2, only=[0])
    t0 = time.monotonic()
    try:
        out, _ = proc[0].communicate(timeout=120)
    finally:
        if proc[0].poll() is None:
            proc[0].kill()
    waited = time.monotonic() - t0
    assert proc[0].returncode == 4, out[-3000:]
    assert "[rank 0] error: could not join the process group of 2 ranks at 127.0.0.1:" in out
    assert "within parallel.timeout_s=4s" in out and "Traceback" not in out
    assert waited < 60
    KILL_POINTS_TRIED.append("peer never started (rendezvous timeout)")
