"""Ordinary mistakes that must not lose work (issue 23), one piece each, without a training launch.

- rotation never deletes the newest usable checkpoint: with a rank file missing from the latest one, resume
  falls back and the next save keeps the fallback, moving the broken one aside;
- the run-folder lock: a live holder on this host is named (host, pid, start time), a dead one (or a reused
  pid) is taken over with a note, another host's lock is reported, old or fresh, with how to clear it;
  train.save_dir outside run_dir is locked too;
- the learning-rate rule on a resume with another train_steps, with the old and new lr, as the Trainer
  applies it to the restored scheduler;
- the export refuses a run's tokenizer that is not the one its data was made with;
- every shipped ds_configs/*.json passes DeepSpeed's key schema;
- the launch wrapper shows one line for a Ctrl-C; the start-up checks cost milliseconds.
The real launches (two runs into one folder, kill -9 and relaunch, Ctrl-C) are in test_run_lock_launch.py;
the one-line messages of the launch-time checks are rows of test_bad_inputs.py.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.runtime import run_lock
from megatron_mhmoe.runtime.checkpoint import Checkpointer, CheckpointLayout
from tests.runtime.test_train_launch import ROOT


# ---------------------------------------------------------------------- rotation
def test_rotation_keeps_the_newest_usable_checkpoint(tmp_path):
    logs: list[str] = []
    layout = CheckpointLayout(world_size=1, tp=1, ep=1, zero_stage=1, precision="fp32")
    ck = Checkpointer(str(tmp_path), ParallelContext.single_process(), layout, keep_last=2, log=logs.append)
    for step in (50, 70):
        ck.save(step, {"w": torch.full((4,), float(step)), "step": step})
    os.remove(tmp_path / "step_00000070" / "rank_00000.pt")  # the latest checkpoint lost a rank file
    step, state, _ = ck.load_latest()
    assert step == 50 and "step_00000070 is not usable (rank_00000.pt is missing)" in "\n".join(logs)
    ck.save(80, {"w": torch.full((4,), 80.0), "step": 80})  # the resumed run's next save, past the broken one
    assert ck.complete_steps() == [50, 80]  # keep_last=2 counted the usable ones: 50 survives
    aside = tmp_path / "unusable" / "step_00000070"
    assert (aside / "manifest.json").exists(), os.listdir(tmp_path)  # moved aside, not deleted
    assert any(f"moved aside to {aside}" in m for m in logs), logs
    ck.save(90, {"w": torch.full((4,), 90.0), "step": 90})
    assert ck.complete_steps() == [80, 90]  # usable checkpoints still rotate normally


# ---------------------------------------------------------------------- the run-folder lock
def _write_lock(folder, **rec):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, run_lock.LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"started": "2026-12-07 10:00:00 UTC", "time": time.time(), **rec}, f)
    return path


def test_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    notes: list[str] = []
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, never reaped (as after a kill -9 of a
    while run_lock._stat(zombie.pid)[:1] != ["Z"]:               # launcher, until init reaps its workers)
        time.sleep(0.01)
    try:
        host = socket.gethostname()
        path = _write_lock(tmp_path / "a", host=host, pid=live.pid, proc_start=run_lock._proc_start(live.pid))
        with pytest.raises(run_lock.RunLockError, match=rf"is in use by another run \(host {host}, pid {live.pid}, "
                                                        r"started 2026-12-07 10:00:00 UTC"):
            run_lock.RunLock([str(tmp_path / "a")], 600, notes.append).acquire()
        assert json.load(open(path))["pid"] == live.pid  # the holder's lock is left alone
        # the same pid, but another process (a reused pid): stale
        _write_lock(tmp_path / "b", host=host, pid=live.pid, proc_start="1")
        # a pid that no longer exists (kill -9, a crash): stale
        _write_lock(tmp_path / "c", host=host, pid=dead.pid)
        _write_lock(tmp_path / "d", host=host, pid=zombie.pid, proc_start=run_lock._proc_start(zombie.pid))
        folders = [str(tmp_path / sub) for sub in "bcd"]
        lock = run_lock.RunLock(folders, 600, notes.append).acquire()
        assert len([n for n in notes if n.startswith("note: taking over the run lock")]) == 3, notes
        for sub in "bcd":
            assert json.load(open(tmp_path / sub / run_lock.LOCK_NAME))["pid"] == os.getpid()
        lock.release()
        assert not os.path.exists(tmp_path / "b" / run_lock.LOCK_NAME)
        assert not os.path.exists(tmp_path / "c" / run_lock.LOCK_NAME)
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_lock_of_another_host_is_reported_fresh_or_stale(tmp_path):
    path = _write_lock(tmp_path, host="node-elsewhere", pid=4242)
    with pytest.raises(run_lock.RunLockError, match="in use by another run \\(host node-elsewhere, pid 4242"):
        run_lock.RunLock([str(tmp_path)], 600, print).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    with pytest.raises(run_lock.RunLockError) as e:
        run_lock.RunLock([str(tmp_path)], 600, print).acquire()
    assert ("has not been refreshed for 3600 s (> train.lock_stale_s=600)" in str(e.value)
            and f"rm {path}" in str(e.value)), str(e.value)
    assert os.path.exists(path)  # only a person can tell: never taken over


def test_save_dir_elsewhere_is_locked_too(tmp_path):
    from megatron_mhmoe.launch.cli import resolve_config
    from megatron_mhmoe.train import _locked_folders
    run = str(tmp_path / "run")
    inside = resolve_config(None, [f"--run_dir={run}"])
    inside.train.save_dir = run_lock.effective_save_dir(inside.run_dir, inside.train.save_dir)
    assert inside.train.save_dir == os.path.join(run, "checkpoints") and _locked_folders(inside) == [run]
    apart = resolve_config(None, [f"--run_dir={run}", f"--train.save_dir={tmp_path}/ckpts"])
    assert _locked_folders(apart) == [run, str(tmp_path / "ckpts")]


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = run_lock.RunLock([str(tmp_path)], 600, print).acquire()
    _write_lock(tmp_path, host="other", pid=1, token="theirs")
    lock.release()
    assert json.load(open(tmp_path / run_lock.LOCK_NAME))["token"] == "theirs"


# ---------------------------------------------------------------------- the schedule on resume
@pytest.mark.parametrize("rule", ["recompute", "keep"])
def test_resume_schedule_rule_states_old_and_new_lr(rule):
    from types import SimpleNamespace

    from megatron_mhmoe.runtime.schedule import lr_factor, make_lr_lambda, resume_schedule_rule
    t = SimpleNamespace(lr=3e-4, min_lr=1e-5, warmup_steps=2, lr_decay_style="cosine", train_steps=60,
                        resume_schedule=rule)
    total, note = resume_schedule_rule(t, 30, 30)  # trained to its end (lr at min_lr), then raised to 60
    old = 3e-4 * lr_factor(30, 3e-4, 1e-5, 2, 30, "cosine")
    assert old == pytest.approx(1e-5)
    if rule == "keep":
        assert total == 30 and "train.resume_schedule=keep" in note
        assert make_lr_lambda(t, total)(45) * 3e-4 == pytest.approx(1e-5)  # flat past the saved end
        new = old
    else:
        assert total == 60 and "recomputed for 60 steps" in note
        new = 3e-4 * lr_factor(30, 3e-4, 1e-5, 2, 60, "cosine")
        assert new > 1e-4  # the jump the note warns about
    assert f"{old:.4g} under the saved schedule, {new:.4g} now" in note


@pytest.mark.parametrize("rule", ["recompute", "keep"])
def test_trainer_applies_the_rule_to_the_resumed_scheduler(rule, capsys):
    """Trainer._apply_resume_schedule on a scheduler restored at step 30 of 30, resumed with 60 steps: the next
    step's lr (in the optimizer) and the steps after it follow the chosen rule."""
    from types import SimpleNamespace

    from megatron_mhmoe.launch.cli import resolve_config
    from megatron_mhmoe.runtime.schedule import lr_factor, make_lr_lambda
    from megatron_mhmoe.runtime.trainer import Trainer
    cfg = resolve_config(None, ["--train.train_steps=30", "--train.warmup_steps=2", "--train.lr=3e-4",
                                "--train.min_lr=1e-5", f"--train.resume_schedule={rule}"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(cfg.train))
    for _ in range(30):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    cfg.train.train_steps = 60  # the relaunch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(cfg.train))
    sched.load_state_dict(saved)
    opt.param_groups[0]["lr"] = saved["_last_lr"][0]  # as the loaded optimizer state holds it
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.ctx, trainer.engine = cfg, SimpleNamespace(rank=0), SimpleNamespace(lr_scheduler=sched)
    trainer._apply_resume_schedule(30)
    total = 30 if rule == "keep" else 60
    for step in (30, 31, 45):
        while sched.last_epoch < step:
            opt.step()
            sched.step()
        want = 3e-4 * lr_factor(step, 3e-4, 1e-5, 2, total, "cosine")
        assert opt.param_groups[0]["lr"] == pytest.approx(want), (rule, step)
    assert f"train.resume_schedule={rule}" in capsys.readouterr().out


# ---------------------------------------------------------------------- tokenizer at export
def test_export_refuses_a_tokenizer_the_data_was_not_made_with(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_mhmoe.export import native as mod
    from megatron_mhmoe.runtime.checkpoint import CheckpointError
    tokenizers = []
    for i, word in enumerate(("def", "class")):
        tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, word: 2}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.save(str(tmp_path / f"tok{i}.json"))
        tokenizers.append(str(tmp_path / f"tok{i}.json"))
    from megatron_mhmoe.data.tokenizer import build_tokenizer
    made = build_tokenizer("auto", tokenizers[0])
    prefix = str(tmp_path / "d_text_document")
    with open(prefix + ".meta.json", "w") as f:
        json.dump({"tokenizer_type": "hf", "tokenizer_sha256": made.sha256, "tokenizer_model": tokenizers[0]}, f)
    config = {"data": {"data_path": [prefix], "tokenizer_model": tokenizers[1]}, "model": {}}
    with pytest.raises(CheckpointError, match=rf"dataset {prefix} was tokenized with {tokenizers[0]} .* not with "
                                              rf"{tokenizers[1]} .* Pass --tokenizer"):
        mod.check_export_tokenizer(config, mod.find_tokenizer(config, None))
    config["data"]["tokenizer_model"] = tokenizers[0]
    mod.check_export_tokenizer(config, mod.find_tokenizer(config, None))  # the data's own: fine


# ---------------------------------------------------------------------- DeepSpeed keys
def test_shipped_ds_configs_pass_the_key_schema():
    from megatron_mhmoe.runtime.ds_schema import unknown_ds_keys
    files = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
    assert len(files) >= 6
    batch = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2}
    for path in files:
        with open(path) as f:
            assert unknown_ds_keys(json.load(f), batch) == [], path
    # keys DeepSpeed parses outside DeepSpeedConfig's first pass are known too
    elsewhere = {"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "activation_checkpointing": {},
                 "flops_profiler": {}, "gradient_clipping": 1.0, "sequence_parallel_size": 1}
    assert unknown_ds_keys(elsewhere, batch) == []


# ---------------------------------------------------------------------- cost of the checks
def test_start_up_checks_are_cheap(tmp_path):
    """What the checks add to a launch (docs/reliability.md: ~2 ms measured, asserted below 100 ms here): the
    run-folder and resume-step checks, the tokenizer-vs-data check, the DeepSpeed key check (DeepSpeed
    itself is imported by the engine anyway), and taking and releasing the lock."""
    import statistics

    import deepspeed  # noqa: F401  (the engine's import, not the check's)
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_mhmoe.data.vocab import check_training_tokenizer
    from megatron_mhmoe.runtime.checkpoint import latest_step
    from megatron_mhmoe.runtime.ds_schema import check_ds_config_keys
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "def": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    prefix = str(tmp_path / "d_text_document")
    with open(prefix + ".meta.json", "w") as f:
        json.dump({"tokenizer_type": "hf", "tokenizer_sha256": "0" * 64}, f)
    with open(os.path.join(ROOT, "ds_configs", "zero2_offload_bf16.json")) as f:
        ds = json.load(f)
    batch = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2}
    run = str(tmp_path / "run")

    def checks():
        run_lock.check_run_folders(run, run + "/checkpoints")
        latest_step(run + "/checkpoints")
        check_training_tokenizer(str(tmp_path / "tok.json"), [prefix], 300, allow_mismatch=True)
        check_ds_config_keys(ds, "ds.json", batch)
        run_lock.RunLock([run], 600, print).acquire().release()
    checks()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        checks()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    print(f"start-up checks: {ms:.2f} ms")
    assert ms < 100, ms


def test_launch_wrapper_shows_one_line_for_a_ctrl_c():
    """Through the launch scripts (megatron_mhmoe/launch/proctree.py) the ranks' interrupt line is not shown beside the
    wrapper's own: one line. A rank interrupted alone (the launcher was not) ends with its line and 130."""
    import io

    from megatron_mhmoe.launch import proctree
    from megatron_mhmoe.runtime.interrupt import MESSAGE

    def relay(text):
        report, out = proctree._Report(), io.StringIO()
        proctree._relay(io.BytesIO(text.encode()), out, report, passthrough=False)
        return out.getvalue(), report
    shown, report = relay(f"step 3/8 | loss 5.5\n{MESSAGE}\nTraceback (most recent call last):\n  File \"run.py\"\n"
                          "torch.distributed.elastic.multiprocessing.api.SignalException: Process 10 got signal: 2\n")
    assert shown == "step 3/8 | loss 5.5\n"
    assert proctree._verdict(report, 1) == (
        "launch: error: the launch was stopped by SIGINT; relaunch to resume from the last complete checkpoint", 130)
    shown, report = relay(f"{MESSAGE}\n")
    assert shown == "" and proctree._verdict(report, 130) == (MESSAGE, 130)
    shown, report = relay("run folder error: the run folder /r is in use by another run (host h, pid 1, ...)\n")
    assert shown == "" and proctree._verdict(report, 2)[1] == 2
