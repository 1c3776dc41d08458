"""launch/*.sh: syntax, conventions, and that bad input stops them before any launcher starts.

The scripts run for real (no DRY_RUN) with PYTHON pointing at a recording wrapper: it logs every
interpreter call and, instead of starting a launcher (deepspeed.launcher.runner / torch.distributed.run),
exits 97. So a refused launch shows only the launch_check call in the log, and an accepted one shows the
exact launcher command line, without any training starting. The launch wrapper (megatron_mhmoe/launch/proctree.py) in
front of the launcher runs for real. tests/launch/test_launch_failures.py runs real launches that fail.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["train_single_node.sh", "train_multi_node.sh", "train_cpu.sh", "train_torchrun.sh"]
LAUNCHED = 97
LAUNCHERS = ("deepspeed.launcher.runner", "torch.distributed.run")
# Variables a script may read without documenting them in its header.
INTERNAL = {"ROOT", "PYTHONPATH", "BASH_SOURCE"}


@pytest.fixture
def fake_python(tmp_path):
    log = tmp_path / "python_calls.log"
    wrapper = tmp_path / "fakepython"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f"printf '%s\\0' \"$@\" >> {str(log)!r}; printf '\\n' >> {str(log)!r}\n"
        # the launch wrapper runs for real; the launcher it starts is recorded, not run
        'if [[ "${2:-}" != megatron_mhmoe.launch.proctree ]]; then\n'
        '  for a in "$@"; do case "$a" in ' + "|".join(LAUNCHERS) + f") exit {LAUNCHED};; esac; done\n"
        "fi\n"
        f'exec {sys.executable!r} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper), log


def calls(log) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split("\0")[:-1] for line in log.read_text().split("\n") if line]


def run_script(name, env, args=(), cwd=None, python=None):
    e = {k: v for k, v in os.environ.items()
         if k not in {"GPUS", "NPROC", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT",
                      "HOSTFILE", "NO_SSH", "INCLUDE", "EXCLUDE", "NUM_NODES", "GPUS_PER_NODE", "LAUNCHER",
                      "DRY_RUN", "DS_ACCELERATOR", "RDZV_BACKEND", "RDZV_ID", "TRAIN_MODULE", "SSH_PORT"}}
    e.update(env)
    if python:
        e["PYTHON"] = python
    return subprocess.run(["bash", os.path.join(LAUNCH, name), *args], capture_output=True, text=True, env=e,
                          cwd=cwd, timeout=60)


# ------------------------------------------------------------------------------------------ static
@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    r = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_conventions(name):
    path = os.path.join(LAUNCH, name)
    text = open(path).read()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert os.access(path, os.X_OK)
    assert "set -euo pipefail" in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\beval\b|\bsed\b", code), "no eval, no sed templating"
    assert code.count("exec ") == 1 and 'exec "${cmd[@]}"' in code, "one launcher line"
    assert 'cmd=("$PYTHON" -m megatron_mhmoe.launch.proctree launch ' in code, "through the launch wrapper"
    assert code.count("megatron_mhmoe.launch.launch_check") == 1
    assert code.index("launch_check") < code.index('exec "${cmd[@]}"')
    assert '"$@"' in code and " $@" not in code and " $* " not in code
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", code)) - INTERNAL
    for var in used:
        assert re.search(rf"\b{var}\b", header), f"{name}: {var} is not documented in the header"


# ------------------------------------------------------------------------------- malicious input
def _pwned_cases(tmp):
    p = os.path.join(tmp, "pwned")
    hf_semicolon = os.path.join(tmp, "hf_semicolon")
    hf_subst = os.path.join(tmp, "hf_subst")
    hf_tick = os.path.join(tmp, "hf_tick")
    with open(hf_semicolon, "w") as f:
        f.write(f"node0 slots=1\na;touch {p} slots=1\n")
    with open(hf_subst, "w") as f:
        f.write(f"$(touch {p}) slots=1\n")
    with open(hf_tick, "w") as f:
        f.write(f"node0 slots=1\n`touch {p}` slots=1\n")
    good_hf = os.path.join(tmp, "hf_good")
    with open(good_hf, "w") as f:
        f.write("node0 slots=1\nnode1 slots=1\n")
    mn = {"MASTER_ADDR": "10.0.0.1", "HOSTFILE": good_hf}
    return [
        ("train_multi_node.sh", {**mn, "HOSTFILE": hf_semicolon}, [], "bad host name 'a;touch'"),
        ("train_multi_node.sh", {**mn, "HOSTFILE": hf_subst}, [], "bad host name"),
        ("train_multi_node.sh", {**mn, "HOSTFILE": hf_tick}, [], "bad host name"),
        ("train_multi_node.sh", {**mn, "MASTER_ADDR": f"$(touch {p})"}, [], "--master-addr: bad address"),
        ("train_multi_node.sh", {**mn, "MASTER_PORT": f"29500;touch {p}"}, [], "is not a port number"),
        ("train_multi_node.sh", {**mn, "NO_SSH": "1", "NODE_RANK": f"$(touch {p})"}, [], "--node-rank"),
        ("train_multi_node.sh", {**mn, "INCLUDE": f"node0;touch {p}"}, [], "bad host name"),
        ("train_multi_node.sh", {**mn, "SSH_PORT": f"22;touch {p}"}, [], "--ssh-port"),
        ("train_multi_node.sh", {**mn, "TRAIN_MODULE": f"x;touch {p}"}, [], "--module"),
        ("train_multi_node.sh", mn, [f"--wandb.name=$(touch {p})"], "remote shell"),
        ("train_multi_node.sh", {**mn, "NO_SSH": "x"}, [], "NO_SSH must be 0 or 1"),
        ("train_multi_node.sh", {"MASTER_ADDR": "10.0.0.1"}, [], "set HOSTFILE"),
        ("train_multi_node.sh", {"HOSTFILE": good_hf}, [], "set MASTER_ADDR"),
        ("train_single_node.sh", {"GPUS": f"2;touch {p}"}, [], "--gpus-per-node"),
        ("train_single_node.sh", {"GPUS": "2", "MASTER_PORT": f"$(touch {p})"}, [], "is not a port number"),
        ("train_single_node.sh", {"GPUS": "4"}, ["--parallel.tp=3"], "4 % 3 = 1"),
        ("train_cpu.sh", {"NPROC": f"$(touch {p})"}, [], "--gpus-per-node"),
        ("train_cpu.sh", {"NPROC": "2", "MASTER_PORT": "80"}, [], "port 80 is out of range"),
        ("train_cpu.sh", {"NPROC": "3"}, [], "3 % 2 = 1"),
        ("train_torchrun.sh", {"NPROC_PER_NODE": "2", "MASTER_ADDR": f"`touch {p}`"}, [], "bad address"),
        ("train_torchrun.sh", {"NPROC_PER_NODE": "2", "NNODES": "2", "MASTER_ADDR": "10.0.0.1",
                               "NODE_RANK": f"1;touch {p}"}, [], "--node-rank"),
        ("train_torchrun.sh", {"NPROC_PER_NODE": "2", "RDZV_BACKEND": "c10d", "RDZV_ID": f"j;touch {p}"}, [],
         "--rdzv-id"),
        ("train_torchrun.sh", {"NPROC_PER_NODE": "2", "NNODES": "2"}, [], "needs MASTER_ADDR"),
        ("train_torchrun.sh", {"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2",
                               "MASTER_ADDR": "10.0.0.1"}, [], "--node-rank 2 but there are 2 node(s)"),
    ]


def test_refused_before_anything_starts(tmp_path, fake_python):
    python, log = fake_python
    failures = []
    for i, (name, env, args, match) in enumerate(_pwned_cases(str(tmp_path))):
        if log.exists():
            log.unlink()
        r = run_script(name, env, args, cwd=str(tmp_path), python=python)
        launched = [c for c in calls(log) if any(x in c for x in LAUNCHERS)]
        if r.returncode == 0 or r.returncode == LAUNCHED or launched or match not in r.stderr \
                or (tmp_path / "pwned").exists():
            failures.append((i, name, env, args, r.returncode, r.stderr[-400:], launched))
    assert not failures, failures
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------- accepted launches
def test_single_node_launcher_line(tmp_path, fake_python):
    python, log = fake_python
    r = run_script("train_single_node.sh", {"GPUS": "2", "MASTER_PORT": "29611"},
                   ["--train.lr=1e-3", "--wandb.name=my run"], cwd=str(tmp_path), python=python)
    assert r.returncode == LAUNCHED, r.stderr
    assert "world 2 = 1 node(s) x 2 rank(s) per node" in r.stdout
    assert calls(log)[-1] == [
        "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29611", "--module",
        "megatron_mhmoe.train", "--train.lr=1e-3", "--wandb.name=my run"]


def test_cpu_launcher_line_and_env(tmp_path, fake_python):
    python, log = fake_python
    # the wrapper records the environment the launcher would get
    env_dump = tmp_path / "env"
    wrapper = tmp_path / "envpython"
    wrapper.write_text("#!/usr/bin/env bash\n"
                       f'for a in "$@"; do [[ "$a" == torch.distributed.run ]] && env > {str(env_dump)!r}; done\n'
                       f'exec {python!r} "$@"\n')
    wrapper.chmod(0o755)
    r = run_script("train_cpu.sh", {"NPROC": "4", "MASTER_PORT": "29612"}, ["--parallel.ep=4"],
                   cwd=str(tmp_path), python=str(wrapper))
    assert r.returncode == LAUNCHED, r.stderr
    assert calls(log)[-1] == ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "4",
                              "--master_addr", "127.0.0.1", "--master_port", "29612", "-m",
                              "megatron_mhmoe.train", "--parallel.ep=4"]
    env = dict(line.split("=", 1) for line in env_dump.read_text().splitlines() if "=" in line)
    assert env["OMP_NUM_THREADS"] == "1" and env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env.get("WANDB_MODE") == os.environ.get("WANDB_MODE", "offline")


def test_multi_node_launcher_lines(tmp_path, fake_python):
    python, log = fake_python
    hf = tmp_path / "hosts"
    hf.write_text("# two nodes\nnode0 slots=2\nnode1 slots=2\n")
    r = run_script("train_multi_node.sh", {"HOSTFILE": str(hf), "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29613"},
                   ["--train.lr=1e-3"], cwd=str(tmp_path), python=python)
    assert r.returncode == LAUNCHED, r.stderr
    assert calls(log)[-1] == ["-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hf), "--master_addr",
                              "10.0.0.1", "--master_port", "29613", "--launcher", "pdsh", "--module",
                              "megatron_mhmoe.train", "--train.lr=1e-3"]
    r = run_script("train_multi_node.sh", {"HOSTFILE": str(hf), "MASTER_ADDR": "127.0.0.1", "NO_SSH": "1",
                                           "NODE_RANK": "1", "GPUS_PER_NODE": "1", "LAUNCHER_ARGS": "-x a"},
                   [], cwd=str(tmp_path), python=python)
    assert r.returncode == LAUNCHED, r.stderr
    assert calls(log)[-1] == ["-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hf), "--master_addr",
                              "127.0.0.1", "--master_port", "29500", "--launcher", "pdsh", "--no_ssh",
                              "--node_rank", "1", "--num_gpus", "1", "--launcher_args", "-x a", "--module",
                              "megatron_mhmoe.train"]
    assert "world 2 = 2 node(s) x 1 rank(s) per node" in r.stdout


def test_torchrun_launcher_lines(tmp_path, fake_python):
    python, log = fake_python
    env = {"NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29614"}
    r = run_script("train_torchrun.sh", env, ["--train.lr=1e-3"], cwd=str(tmp_path), python=python)
    assert r.returncode == LAUNCHED, r.stderr
    assert calls(log)[-1] == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                              "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29614",
                              "--max_restarts", "0", "-m", "megatron_mhmoe.train", "--train.lr=1e-3"]
    r = run_script("train_torchrun.sh", {**env, "RDZV_BACKEND": "c10d", "RDZV_ID": "job-7"}, [],
                   cwd=str(tmp_path), python=python)
    assert r.returncode == LAUNCHED, r.stderr
    assert calls(log)[-1] == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                              "--rdzv_backend", "c10d", "--rdzv_endpoint", "10.0.0.1:29614", "--rdzv_id", "job-7",
                              "--max_restarts", "0", "-m", "megatron_mhmoe.train"]


def test_dry_run_prints_quoted_command(tmp_path):
    r = run_script("train_cpu.sh", {"NPROC": "2", "DRY_RUN": "1"}, ["--wandb.name=a b"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith(r"-m megatron_mhmoe.train --wandb.name=a\ b")
