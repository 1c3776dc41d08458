"""The README's "Train on your own text" walk-through, run as a new user would run it: every command of its
bash blocks, in order, read from README.md itself, in a fresh folder holding only the user's text files and
the checkout's entry points (`.venv`, `tools/`, `launch/`, `megatron_mhmoe/`, `ds_configs/`, as links).

The commands run as written, with tiny sizes appended to the training commands and a small `--limit` to the
evaluation. Two lines cannot run literally on one CPU machine, and are run as close as it allows:
- the 8-GPU line is `DRY_RUN=1` in the README already (launch_check validates it and prints the launcher line);
- the pdsh line runs with DRY_RUN=1 (no ssh here), and the NO_SSH line runs twice at once, as node 0 and
  node 1 of a two-line hostfile on 127.0.0.1: a real two-node job through the DeepSpeed launcher.
Launches get a free MASTER_PORT in their environment (the default 29500 may be held by another job here).
A command the test does not recognise fails it, so a step added to the README is a step run here.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import socket
import subprocess
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Train on your own text"
LINKS = (".venv", "tools", "launch", "megatron_mhmoe", "ds_configs")
TINY = ["--train.train_steps=4", "--train.save_interval=4", "--train.eval_interval=4", "--train.eval_iters=1",
        "--train.log_interval=2", "--model.num_layers=2", "--train.micro_batch_size=4", "--train.seq_len=32",
        "--model.max_seq_len=32", "--train.warmup_steps=1"]


def walkthrough_commands() -> list[str]:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index(SECTION):]
    section = section[:section.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workspace(tmp_path) -> str:
    """A new user's folder: links to the checkout's entry points, and 40 text files (stdlib sources)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in LINKS:
        os.symlink(os.path.join(ROOT, name), ws / name)
    texts = ws / "my_texts"
    texts.mkdir()
    sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "[a-m]*.py")))[:40]
    for i, src in enumerate(sources):
        (texts / f"doc{i}.txt").write_text(open(src, encoding="utf-8", errors="replace").read())
    (ws / "hosts").write_text("node0 slots=1\nnode1 slots=1\n")
    return str(ws)


def run(command: str, ws: str, env_extra: dict | None = None, extra_args: list[str] = (), timeout: int = 300,
        background: bool = False):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MHMOE_FAULT")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1", **(env_extra or {}))
    line = command + "".join(" " + shlex.quote(a) for a in extra_args)
    if background:
        return subprocess.Popen(["bash", "-c", line], cwd=ws, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(["bash", "-c", line], cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def test_readme_walkthrough_runs_as_written(tmp_path):
    commands = walkthrough_commands()
    ws = workspace(tmp_path)
    done = []
    for command in commands:
        if "tools/train_tokenizer.py" in command:
            run(command, ws)
            assert os.path.exists(os.path.join(ws, "data", "mytok.model"))
        elif "tools/preprocess_data.py" in command:
            run(command, ws)
            prefix = os.path.join(ws, "data", "mine_text_document")
            assert os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")
        elif "launch/train_cpu.sh" in command:  # a free port: other jobs on this machine may hold 29500
            out = run(command, ws, {"MASTER_PORT": str(free_port())}, extra_args=TINY)
            assert "full config: runs/mine/config.json" in out and re.search(r"^step 4/4 \|", out, re.M), out[-3000:]
            assert os.path.exists(os.path.join(ws, "runs", "mine", "checkpoints", "latest"))
        elif "launch/train_single_node.sh" in command:
            assert command.startswith("DRY_RUN=1 "), command  # 8 GPUs: validated and printed, not run
            out = run(command, ws, extra_args=TINY)
            assert "deepspeed" in out and re.search(r"--num_gpus[ =]8\b", out), out[-3000:]
        elif "launch/train_multi_node.sh" in command and "NO_SSH=1" not in command:
            out = run(command, ws, env_extra={"DRY_RUN": "1"}, extra_args=TINY)  # pdsh: no ssh here
            assert "world 2 = 2 node(s) x 1 rank(s) per node" in out and "--launcher pdsh" in out, out[-3000:]
        elif "launch/train_multi_node.sh" in command:
            local = command.replace("MASTER_ADDR=10.0.0.1", "MASTER_ADDR=127.0.0.1")
            assert local != command and "NODE_RANK=0 " in local, command
            port = {"MASTER_PORT": str(free_port())}
            node1 = run(local.replace("NODE_RANK=0 ", "NODE_RANK=1 "), ws, port, TINY, background=True)
            try:
                out = run(local, ws, port, TINY, timeout=400)
            finally:
                out1 = node1.communicate(timeout=120)[0]
            assert node1.returncode == 0, out1[-3000:]
            assert "world 2 = 2 node(s) x 1 rank(s) per node" in out and re.search(r"^step 4/4 \|", out, re.M), out
            assert os.path.exists(os.path.join(ws, "runs", "mine-nodes", "checkpoints", "latest"))
        elif "tools/export_checkpoint.py" in command:
            run(command, ws)
            assert os.path.exists(os.path.join(ws, "exported", "mine", "model.safetensors"))
        elif "tools/generate.py" in command:
            out = run(command, ws, extra_args=["--max-new-tokens", "8"])
            assert out.strip(), "generate.py printed nothing"
        elif "tools/export_hf.py" in command:
            run(command, ws)
            assert os.path.exists(os.path.join(ws, "exported", "mine-hf", "config.json"))
        elif "tools/evaluate.py" in command:
            run(command, ws, extra_args=["--limit", "2", "--no-wandb"], timeout=400)
            res = json.load(open(os.path.join(ws, "runs", "mine", "eval.json")))["results"]
            assert {"acc", "acc_stderr"} <= set(res["mhmoe_next_line"]), res  # what the README says to read
        else:
            raise AssertionError(f"the walk-through has a command this test does not run: {command}")
        done.append(command)
    assert len(done) == len(commands) == 10, commands
