"""Credentials never leave the process: not in logs, saved configs, checkpoints, wandb files or errors.

A real (tiny, single-process) training run is started with a wandb API key and a HuggingFace token in
its environment, and the key also pasted into the command line (wandb run name and tags), as users do
by mistake. Every byte the run writes, and its stdout/stderr, is then searched for both secrets.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.runtime.test_train_launch import ROOT, byte_data, common_args  # noqa: F401  (fixture)

WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # the 40-hex shape of a real wandb key
HF_TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWx"
# A key of a local wandb server, or any key in another format: it matches no generic credential pattern,
# so only redacting the literal value of WANDB_API_KEY keeps it out.
PLAIN_KEY = "local-NotHexKey_xyz"


def run_train(args: list[str], env_extra: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **env_extra)
    return subprocess.run([sys.executable, "-m", "megatron_mhmoe.train"] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def files_containing(root: str, needles: list[bytes]) -> list[str]:
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            hits += [f"{path}: {n.decode()}" for n in needles if n in data]
    return hits


@pytest.mark.parametrize("key", [WANDB_KEY, PLAIN_KEY])
def test_training_run_writes_no_credentials(tmp_path, byte_data, key):  # noqa: F811
    run_dir = str(tmp_path / "run")
    args = common_args(byte_data, run_dir) + ["--wandb.mode=offline", "--train.train_steps=4", "--model.moe.num_experts=2", "--parallel.ep=1",
             f"--wandb.name=run-{key}", f"--wandb.group=g-{key}", f'--wandb.tags=["{key}", "{HF_TOKEN}"]']
    proc = run_train(args, {"WANDB_API_KEY": key, "HF_TOKEN": HF_TOKEN, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = os.listdir(run_dir)
    assert "checkpoints" in written and "metrics.jsonl" in written and "wandb" in written, written
    needles = [key.encode(), HF_TOKEN.encode()]
    assert files_containing(run_dir, needles) == []
    for stream in (proc.stdout, proc.stderr):
        assert key not in stream and HF_TOKEN not in stream
    assert "***" in proc.stdout  # the printed config shows where a value was redacted


@pytest.mark.parametrize("override", [f"--train.lr={WANDB_KEY}", f"--data.data_path={HF_TOKEN}",
                                      f"--wandb.api_key={WANDB_KEY}"])
def test_config_errors_do_not_echo_credentials(override):
    proc = run_train(["--parallel.ep=1", override], {"WANDB_API_KEY": WANDB_KEY, "WANDB_MODE": "disabled"},
                     timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # A data_path string is a prefix (Megatron's form), so that case fails at the data check, not the config's.
    assert "config error" in proc.stderr or "data error" in proc.stderr, proc.stderr[-2000:]
    assert WANDB_KEY not in proc.stderr + proc.stdout and HF_TOKEN not in proc.stderr + proc.stdout


def test_print_config_redacts():
    proc = run_train(["--print-config", f"--wandb.name={WANDB_KEY}", f"--wandb.group={HF_TOKEN}"],
                     {"WANDB_MODE": "disabled"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert WANDB_KEY not in proc.stdout and HF_TOKEN not in proc.stdout and '"***"' in proc.stdout


def test_print_config_redacts_a_wandb_key_of_any_form():
    """The value of WANDB_API_KEY is redacted wherever it appears, even when it looks like no key."""
    proc = run_train(["--print-config", f"--wandb.group={PLAIN_KEY}", f"--wandb.name=run-{PLAIN_KEY}-1",
                      f'--wandb.tags=["{PLAIN_KEY}"]'],
                     {"WANDB_API_KEY": PLAIN_KEY, "WANDB_MODE": "disabled"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert PLAIN_KEY not in proc.stdout + proc.stderr
    assert '"group": "***"' in proc.stdout and '"name": "run-***-1"' in proc.stdout


def test_config_error_does_not_echo_a_wandb_key_of_any_form():
    proc = run_train(["--parallel.ep=1", f"--train.lr={PLAIN_KEY}"],
                     {"WANDB_API_KEY": PLAIN_KEY, "WANDB_MODE": "disabled"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error" in proc.stderr and PLAIN_KEY not in proc.stderr + proc.stdout


def test_redact_replaces_the_wandb_key_at_any_depth(monkeypatch):
    from megatron_mhmoe.runtime.logging import redact, redact_text
    monkeypatch.setenv("WANDB_API_KEY", f" {PLAIN_KEY}\n")  # as pasted, with whitespace around it
    cfg = {"wandb": {"group": PLAIN_KEY, "tags": ["a", f"x{PLAIN_KEY}y"]}, "data": {"paths": (f"/d/{PLAIN_KEY}",)}}
    assert redact(cfg) == {"wandb": {"group": "***", "tags": ["a", "x***y"]}, "data": {"paths": ("/d/***",)}}
    assert redact_text(f"error: bad value {PLAIN_KEY!r}") == "error: bad value '***'"
    monkeypatch.delenv("WANDB_API_KEY")
    assert redact(cfg) == cfg  # without the key, the same text is no credential
