"""wandb after a crash (WANDB_MODE=offline, no network): a run SIGKILLed between checkpoints, then resumed.

wandb's offline files are read back with runtime/wandb_replay.py's reader of the `.wandb` format; across
every launch's file of the run id the history must hold each step exactly once, with metrics.jsonl's values;
metrics.jsonl itself must hold each step once (rows after the checkpoint are dropped on resume and logged
again by the resumed run).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

from megatron_mhmoe.runtime import wandb_replay
from megatron_mhmoe.runtime.logging import MetricsLogger
from tests.runtime.test_train_launch import ROOT, byte_data, common_args  # noqa: F401

STEPS, SAVE, KILL = 6, 3, 5


def train(args: list[str], fault: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MHMOE_FAULT", "WANDB_API_KEY"):
        env.pop(k, None)
    if fault:
        env["MHMOE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "megatron_mhmoe.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def history(path: str) -> dict[int, dict]:
    """step -> {key: value} of a `.wandb` file's history rows."""
    from wandb.proto import wandb_internal_pb2
    out = {}
    for raw in wandb_replay.wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item}
            assert row["_step"] not in out, f"step {row['_step']} twice in {path}"
            out[row["_step"]] = row
    return out


def jsonl(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_killed_run_resumed_has_every_step_once_in_wandb_and_metrics(byte_data, tmp_path):
    run_dir = str(tmp_path / "run")
    args = [a for a in common_args(byte_data, run_dir) if not a.startswith(("--wandb.mode", "--train.train_steps",
                                                                            "--train.save_interval",
                                                                            "--train.eval_interval"))]
    args += ["--wandb.mode=offline", "--parallel.ep=1", f"--train.train_steps={STEPS}",
             f"--train.save_interval={SAVE}", f"--train.eval_interval={SAVE}"]
    r = train(args, fault=f"kill_rank:0:step:{KILL}")
    assert r.returncode == -9, r.stderr[-3000:]
    assert sorted(row["step"] for row in jsonl(run_dir) if "loss" in row) == list(range(1, KILL))
    manifest = json.load(open(os.path.join(run_dir, "checkpoints", f"step_{SAVE:08d}", "manifest.json")))
    run_id = manifest["wandb_id"]
    killed = wandb_replay.run_files(run_dir, run_id)
    assert len(killed) == 1
    before = sorted(history(killed[0]))  # what wandb had written when the kill came (often nothing)
    assert before == list(range(1, len(before) + 1)), before

    r = train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints at step {SAVE}" in r.stdout
    assert f"dropped the rows of steps {SAVE + 1}-{KILL - 1}" in r.stdout, r.stdout[-3000:]
    if len(before) < SAVE:
        assert f"wandb: sent {SAVE - len(before) + 1} row(s) of metrics.jsonl (steps {len(before) + 1}-{SAVE})" \
            in r.stdout, r.stdout[-3000:]  # + 1: the validation row of step SAVE

    rows = jsonl(run_dir)
    train_rows = {row["step"]: row for row in rows if "loss" in row}
    val_rows = [row["step"] for row in rows if "val/ppl" in row]
    assert sorted(row["step"] for row in rows if "loss" in row) == list(range(1, STEPS + 1))  # each once
    assert val_rows == [SAVE, STEPS]
    files = wandb_replay.run_files(run_dir, run_id)
    assert len(files) == 2
    steps, merged = [], {}
    for path in files:
        h = history(path)
        steps += sorted(h)
        merged.update(h)
    assert sorted(steps) == list(range(1, STEPS + 1)), steps  # every step, once, over both launches
    for step, row in train_rows.items():
        assert merged[step]["loss"] == row["loss"], step
        assert merged[step]["routing/layer0/tokens_per_expert"] == row["routing/layer0/tokens_per_expert"]
    assert merged[SAVE]["val/ppl"] == next(r["val/ppl"] for r in rows if r["step"] == SAVE and "val/ppl" in r)

    # A torn file (a service killed mid-write) reads up to the tear.
    torn = tmp_path / "torn.wandb"
    data = open(files[-1], "rb").read()
    torn.write_bytes(data[: len(data) // 2])
    got = wandb_replay.history_steps(str(torn))
    assert got == sorted(history(files[-1]))[: len(got)]


class _FakeRun:
    starting_step = 0

    def __init__(self):
        self.logged = []

    def log(self, row, step):
        self.logged.append((step, row))


def test_steps_wandb_holds_past_the_checkpoint_are_not_sent_twice(tmp_path, monkeypatch):
    """wandb wrote up to step 5, the checkpoint is at 3: nothing is replayed, the resumed steps 4-5 go to
    metrics.jsonl only, step 6 to both."""
    run_dir = str(tmp_path)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "time": 0.0, "loss": float(step)}) + "\n")
        f.write('{"step": 6, "ti')  # torn by the kill
    logger = MetricsLogger(run_dir, SimpleNamespace(mode="disabled"), {}, True, "run", resume_id="abc")
    logger.run, logger.mode, logger.wandb_dir = _FakeRun(), "offline", run_dir
    monkeypatch.setattr(wandb_replay, "last_wandb_step", lambda d, rid: 5 if (d, rid) == (run_dir, "abc") else None)
    logger.catch_up(3)
    assert logger.run.logged == []
    for step in (4, 5, 6):
        logger.log(step, {"loss": 10.0 + step})
    assert [s for s, _ in logger.run.logged] == [6]
    logger.run = None
    logger.close()
    assert [(r["step"], r["loss"]) for r in jsonl(run_dir)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0),
                                                                 (6, 16.0)]
    # wandb held steps up to 1: steps 2-3 are sent, with metrics.jsonl's values and no time
    logger = MetricsLogger(run_dir, SimpleNamespace(mode="disabled"), {}, True, "run", resume_id="abc")
    logger.run, logger.mode, logger.wandb_dir = _FakeRun(), "offline", run_dir
    monkeypatch.setattr(wandb_replay, "last_wandb_step", lambda d, rid: 1)
    logger.catch_up(3)
    assert logger.run.logged == [(2, {"loss": 2.0}), (3, {"loss": 3.0})]
    assert [r["step"] for r in jsonl(run_dir)] == [1, 2, 3]
