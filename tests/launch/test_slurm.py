"""launch/train_slurm.sbatch under a faked Slurm allocation.

The test puts its own `scontrol` (expands the node list) and `srun` on PATH. The fake srun records its
arguments and then does what srun does with them: it runs the task command once per node with that
node's SLURM_NODEID. PYTHON is a recording wrapper: launch_check and the launch wrapper
(megatron_mhmoe/launch/proctree.py) run for real, torchrun is recorded instead of started. So the tests see the exact
srun line, the wrapper and torchrun lines each node runs, and that a refused launch never reaches srun.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "train_slurm.sbatch")
TORCHRUN = "torch.distributed.run"
# Anything the submitting shell or the machine might have set that the script reads.
SCRUB = {"FAKE_FAIL_NODE", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "MAX_RESTARTS", "SRUN_ARGS", "PYTHON", "TRAIN_MODULE",
         "MHMOE_ROOT", "MHMOE_DRY_RUN", "DRY_RUN", "DS_ACCELERATOR"}


def _executable(path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def slurm(tmp_path):
    """(run(env, args, script=SCRIPT) -> CompletedProcess, srun log, torchrun log, log of every python call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun_log, torchrun_log, python_log = tmp_path / "srun.log", tmp_path / "torchrun.log", tmp_path / "python.log"
    # Prints FAKE_HOSTS one per line, as `scontrol show hostnames gpu[07-08]` would.
    _executable(bin_dir / "scontrol",
                "#!/usr/bin/env bash\n"
                '[[ "$1 $2" == "show hostnames" ]] || exit 9\n'
                'for h in $FAKE_HOSTS; do echo "$h"; done\n')
    _executable(bin_dir / "srun", f"""#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
with open({str(srun_log)!r}, "a") as f:
    f.write("\\0".join(args) + "\\n")
i = 0
while args[i].startswith("-"):
    i += 1
opts, command = args[:i], args[i:]
nodes = int([o for o in opts if o.startswith("--nodes=")][0].split("=", 1)[1])
rc = 0
for node in range(nodes):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_STEP_ID="0")
    rc = max(rc, subprocess.call(command, env=env))
sys.exit(rc)
""")
    fake_python = _executable(
        tmp_path / "fakepython",
        "#!/usr/bin/env bash\n"
        f'{{ printf "%s\\0" "${{SLURM_NODEID:-}}" "$@"; printf "\\n"; }} >> {str(python_log)!r}\n'
        'if [[ "${2:-}" != megatron_mhmoe.launch.proctree ]]; then\n'
        f'  for a in "$@"; do if [[ "$a" == {TORCHRUN} ]]; then\n'
        f'    {{ printf "%s\\0" "$SLURM_NODEID" "$@"; printf "\\n"; }} >> {str(torchrun_log)!r}\n'
        # a node whose (recorded) run fails as a worker of the training program would
        '    if [[ "$SLURM_NODEID" == "${FAKE_FAIL_NODE:-}" ]]; then echo "data error: no such dataset" >&2; exit 1; fi\n'
        '    exit 0; fi; done\n'
        'fi\n'
        f'exec {sys.executable!r} "$@"\n')

    def run(env: dict, args=(), script: str = SCRIPT, cwd: str | None = None) -> subprocess.CompletedProcess:
        e = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith("SLURM_")}
        e.update({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": fake_python,
                  "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "FAKE_HOSTS": "gpu07 gpu08",
                  "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": ROOT})
        e.update(env)
        e = {k: v for k, v in e.items() if v is not None}
        return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=e, cwd=cwd or ROOT,
                              timeout=120)

    return run, srun_log, torchrun_log, python_log


def records(log) -> list[list[str]]:
    """One argument list per line; the fake python ends every argument with NUL, the fake srun separates them."""
    if not log.exists():
        return []
    return [line[:-1].split("\0") if line.endswith("\0") else line.split("\0")
            for line in log.read_text().split("\n") if line]


def torchrun_args(argv: list[str]) -> dict:
    """{option: value} of a torchrun command line up to `-m`, plus 'module' and 'train_args'."""
    cut = argv.index("-m")
    opts = dict(zip(argv[:cut:2], argv[1:cut:2]))
    return {**opts, "module": argv[cut + 1], "train_args": argv[cut + 2:]}


def test_script_conventions():
    text = open(SCRIPT).read()
    assert text.startswith("#!/usr/bin/env bash\n") and os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    lines = text.splitlines()
    first_code = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    sbatch = [line for line in lines[:first_code] if line.startswith("#SBATCH ")]  # sbatch stops at the first command
    for opt in ("--job-name=", "--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--time=", "--output="):
        assert any(line.startswith(f"#SBATCH {opt}") for line in sbatch), opt
    assert all(" #" not in line for line in sbatch), "sbatch would take a trailing comment as part of the option"
    assert "set -euo pipefail" in text
    code = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert not re.search(r"\beval\b|\bsed\b", code)
    assert code.count("exec \"${cmd[@]}\"") == 1 and code.count("megatron_mhmoe.launch.launch_check") == 1
    assert code.index("launch_check") < code.index("cmd=(srun")
    header = "\n".join(line for line in lines if line.startswith("#"))
    for var in set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", code)) - {"ROOT", "PYTHONPATH", "BASH_SOURCE"}:
        assert re.search(rf"\b{var}\b", header), f"{var} is not documented in the header"


def test_dry_run_prints_the_srun_line(slurm, tmp_path):
    run, srun_log, _, _ = slurm
    cfg = tmp_path / "run.yaml"
    cfg.write_text("parallel:\n  ep: 4\n")
    r = run({"MHMOE_DRY_RUN": "1", "SLURM_CPUS_PER_TASK": "16"}, ["--config", str(cfg), "--train.seed=3"])
    assert r.returncode == 0, r.stderr
    assert not srun_log.exists()
    assert "launch plan: world 8 = 2 node(s) x 4 rank(s) per node" in r.stdout and "EP 4 x EDP 2" in r.stdout
    argv = shlex.split(r.stdout.strip().splitlines()[-1])
    b = argv.index("bash")
    assert argv[:b] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--cpus-per-task=16"]
    assert argv[b + 1] == "-c" and "$SLURM_NODEID" in argv[b + 2]  # expanded by each task, not here
    assert argv[b + 3] == os.path.join(str(tmp_path), "fakepython") and argv[b + 4] == "gpu07:24242"
    t = torchrun_args(argv[b + 5:])
    assert (t["--nnodes"], t["--nproc_per_node"], t["--master_addr"], t["--master_port"]) == ("2", "4", "gpu07", "24242")
    assert t["module"] == "megatron_mhmoe.train" and t["train_args"] == ["--config", str(cfg), "--train.seed=3"]
    assert "gpu07:24242" in r.stderr


def test_srun_starts_one_torchrun_per_node_with_its_node_rank(slurm, tmp_path):
    run, srun_log, torchrun_log, python_log = slurm
    cfg = tmp_path / "my run.yaml"  # a space: the arguments must arrive intact through srun and bash -c
    cfg.write_text("parallel:\n  ep: 2\n")
    args = ["--config", str(cfg), "--wandb.name=a b;$(touch x)"]
    r = run({"FAKE_HOSTS": "n1 n2 n3", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NNODES": "3",
             "SLURM_GPUS_ON_NODE": "2", "MASTER_PORT": "29777", "SRUN_ARGS": "--cpu-bind=none --label"}, args)
    assert r.returncode == 0, r.stderr
    (srun,) = records(srun_log)
    assert srun[:6] == ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpu-bind=none",
                        "--label"]
    per_node = records(torchrun_log)
    assert [rec[0] for rec in per_node] == ["0", "1", "2"]  # SLURM_NODEID of the task that ran it
    for node, rec in enumerate(per_node):
        argv = rec[1:]
        assert argv[:2] == ["-m", TORCHRUN]
        t = torchrun_args(argv[2:])
        assert t["--node_rank"] == str(node)
        assert (t["--nnodes"], t["--nproc_per_node"], t["--master_addr"], t["--master_port"]) == ("3", "2", "n1", "29777")
        assert t["--max_restarts"] == "0" and t["module"] == "megatron_mhmoe.train"
        assert t["train_args"] == args
    assert not os.path.exists(os.path.join(ROOT, "x"))
    # torchrun ran through the launch wrapper on every node; only node 0, which binds the port, checks it.
    wrappers = [rec for rec in records(python_log) if rec[1:4] == ["-m", "megatron_mhmoe.launch.proctree", "launch"]]
    assert [rec[0] for rec in wrappers] == ["0", "1", "2"]
    assert wrappers[0][4:7] == ["--rendezvous", "n1:29777", "--"]
    assert all(rec[4] == "--" for rec in wrappers[1:])
    for rec, run_rec in zip(wrappers, per_node):
        assert rec[rec.index("--") + 1:] == [os.path.join(str(tmp_path), "fakepython")] + run_rec[1:]


@pytest.mark.parametrize("env,nproc", [
    ({"GPUS_PER_NODE": "2"}, "2"),  # explicit wins over the allocation
    ({"SLURM_GPUS_ON_NODE": None, "SLURM_NTASKS_PER_NODE": "2"}, "2"),
    ({"SLURM_GPUS_ON_NODE": None}, "1"),
])
def test_ranks_per_node_sources(slurm, env, nproc):
    run, _, _, _ = slurm
    r = run({"MHMOE_DRY_RUN": "1", **env}, ["--parallel.ep=2"])
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.strip().splitlines()[-1])
    assert argv[argv.index("--nproc_per_node") + 1] == nproc


def test_master_port_from_the_job_id_never_evaluated(slurm, tmp_path):
    run, _, _, _ = slurm
    r = run({"MHMOE_DRY_RUN": "1", "SLURM_JOB_ID": "1234567"}, ["--parallel.ep=2"])
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout.strip().splitlines()[-1])
    assert argv[argv.index("--master_port") + 1] == str(20000 + 1234567 % 10000)
    pwned = tmp_path / "pwned"
    r = run({"MHMOE_DRY_RUN": "1", "SLURM_JOB_ID": f"a[$(touch {pwned})]"}, ["--parallel.ep=2"])
    assert r.returncode == 0, r.stderr
    assert not pwned.exists()
    argv = shlex.split(r.stdout.strip().splitlines()[-1])
    assert argv[argv.index("--master_port") + 1] == "29500"


@pytest.mark.parametrize("env,args,message", [
    ({"SLURM_GPUS_ON_NODE": "3"}, ["--parallel.ep=4"], "expert-parallel size 4 does not divide world size 6"),
    ({}, ["--parallel.tp=3"], "tensor-parallel size 3 does not divide world size 8"),
    ({"MASTER_PORT": "80"}, ["--parallel.ep=2"], "port 80 is out of range"),
    ({"GPUS_PER_NODE": "x"}, ["--parallel.ep=2"], "--gpus-per-node"),
    ({}, ["--parallel.ep=2", "--no.such_key=1"], "unknown top-level key(s) ['no']"),
])
def test_bad_launch_is_refused_by_launch_check_before_srun(slurm, env, args, message):
    run, srun_log, torchrun_log, python_log = slurm
    r = run(env, args)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("launch_check: error: ") and message in errors[0], r.stderr
    assert not srun_log.exists() and not torchrun_log.exists()


@pytest.mark.parametrize("env,message", [
    ({"SLURM_JOB_NODELIST": None}, "not inside a Slurm allocation"),
    ({"SLURM_NNODES": "3"}, "names 2 host(s) but SLURM_NNODES=3"),
    ({"SLURM_NNODES": "two"}, "is not a positive integer"),
    ({"FAKE_HOSTS": ""}, "names 1 host(s) but SLURM_NNODES=2"),
])
def test_bad_allocation_is_refused(slurm, env, message):
    run, srun_log, _, _ = slurm
    r = run(env, ["--parallel.ep=2"])
    assert r.returncode == 2 and f"train_slurm.sbatch: error: " in r.stderr and message in r.stderr, r.stderr
    assert not srun_log.exists()


def test_runs_from_the_spool_copy_sbatch_makes(slurm, tmp_path):
    run, _, _, _ = slurm
    spool = tmp_path / "spool" / "job4242"
    spool.mkdir(parents=True)
    copy = str(spool / "slurm_script")
    shutil.copy(SCRIPT, copy)
    elsewhere = str(tmp_path)
    r = run({"MHMOE_DRY_RUN": "1"}, ["--parallel.ep=2"], script=copy, cwd=elsewhere)
    assert r.returncode == 0, r.stderr  # found through SLURM_SUBMIT_DIR
    r = run({"MHMOE_DRY_RUN": "1", "SLURM_SUBMIT_DIR": elsewhere}, ["--parallel.ep=2"], script=copy, cwd=elsewhere)
    assert r.returncode == 2 and "set MHMOE_ROOT" in r.stderr
    r = run({"MHMOE_DRY_RUN": "1", "SLURM_SUBMIT_DIR": elsewhere, "MHMOE_ROOT": ROOT}, ["--parallel.ep=2"],
            script=copy, cwd=elsewhere)
    assert r.returncode == 0, r.stderr


def test_a_busy_rendezvous_port_and_a_failing_node_end_with_their_line_and_code(slurm):
    run, srun_log, torchrun_log, _ = slurm
    local = {"FAKE_HOSTS": "localhost localhost", "SLURM_JOB_NODELIST": "localhost"}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        r = run({**local, "MASTER_PORT": str(port)}, ["--parallel.ep=2"])
    assert r.returncode == 4, r.stderr
    assert f"launch: error: MASTER_PORT {port} is already in use" in r.stderr
    assert [rec[0] for rec in records(torchrun_log)] == ["1"]  # node 0 refused before starting torchrun
    torchrun_log.unlink()
    r = run({**local, "FAKE_FAIL_NODE": "1"}, ["--parallel.ep=2"])
    assert r.returncode == 2, r.stderr  # the training program's exit code for a data error, not torchrun's 1
    assert r.stderr.strip().splitlines()[-1] == "data error: no such dataset"
    assert [rec[0] for rec in records(torchrun_log)] == ["0", "1"]
