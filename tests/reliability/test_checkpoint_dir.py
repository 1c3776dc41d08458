"""The checkpoint folder, checked before step 1 and when a save fails, through the real entry point.

- a read-only save_dir (a read-only bind mount) and one too small for a checkpoint (a 2 MB tmpfs) stop the run
  before step 1 with exit 5 and one line: the path, and for space "needs ~X MB, Y MB free on <fs>";
- an 8 MB tmpfs takes two checkpoints but not a third (keep_last=2 keeps both while it is written): exit 5 on every rank, one line with the path and
  the bytes, the `.tmp-step_N` folder is removed and the second checkpoint stays `latest`, intact;
- two "nodes" (two torchrun invocations on loopback) with a folder each, as node-local disks would give, are
  refused before step 1: the folder must be shared;
- in one process, a write error at each stage of a save (ENOSPC for real on a tmpfs, EIO/EROFS injected into the
  manifest, rename and `latest` writes) leaves the previous checkpoint `latest` and byte-identical, no `.tmp-*`.
Mounting needs root (CAP_SYS_ADMIN): the tests that mount are skipped, with the reason, where that is refused.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.runtime import checkpoint as C
from megatron_mhmoe.runtime.exit_codes import EXIT_CHECKPOINT_WRITE
from tests.distributed import free_port
from tests.reliability.test_faults import check_checkpoints
from tests.runtime.test_train_launch import ROOT, byte_data, common_args, torchrun  # noqa: F401

# About 3x the launch tests' model: 3.2 MB a checkpoint at world 2, more than a 2 MB tmpfs holds.
WIDER = ["--model.hidden_size=64", "--model.ffn_hidden_size=128", "--model.moe.expert_hidden_size=64"]


def _mount(args: list[str]) -> None:
    r = subprocess.run(["mount"] + args, capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount here ({r.stderr.strip() or r.returncode}): these checks need root")


def _umount(path: str) -> None:
    if subprocess.run(["umount", path], capture_output=True).returncode:
        subprocess.run(["umount", "-l", path], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: str, size: str):
    os.makedirs(path, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", path])
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(src: str, dst: str):
    os.makedirs(dst, exist_ok=True)
    _mount(["--bind", src, dst])
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", dst], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot remount read-only ({r.stderr.strip()})")
        yield dst
    finally:
        _umount(dst)


def tree(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def ranks(args: list[str], world: int) -> list[tuple[int, str]]:
    """Each rank a plain process (no torchrun agent in between): every rank's own exit code."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", RANK=str(r),
                   LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("MHMOE_FAULT", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_mhmoe.train"] + args, cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.wait(240), p.communicate()[0]) for p in procs]


def one_error_line(out: str, rank: int) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith(f"[rank {rank}] error: ")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    return lines[0]


def test_read_only_save_dir_is_refused_before_step_1(byte_data, tmp_path):
    src = tmp_path / "ckpts"
    ck = C.Checkpointer(str(src), ParallelContext.single_process(), C.CheckpointLayout(1, 1, 1, 1, "fp32"),
                        log=lambda m: None)
    ck.save(5, {"w": torch.ones(3)})  # a good checkpoint in the folder, which must stay as it is
    before = tree(str(src))
    with read_only(str(src), str(tmp_path / "ro")) as ro:
        run = str(tmp_path / "run")
        (rc, out), = ranks(common_args(byte_data, run) + ["--parallel.ep=1", f"--train.save_dir={ro}"], world=1)
        assert rc == EXIT_CHECKPOINT_WRITE, out[-3000:]
        line = one_error_line(out, 0)
        assert f"CheckpointWriteError: checkpoint folder {ro} is not writable on rank 0 (EROFS (Read-only file " \
               f"system) on {ro}/.tmp-probe." in line and "set train.save_dir to a writable folder" in line, line
        assert not os.path.exists(os.path.join(run, "metrics.jsonl"))  # stopped before step 1
    assert tree(str(src)) == before


def test_too_small_save_dir_is_refused_before_step_1(byte_data, tmp_path):
    with tmpfs(str(tmp_path / "small"), "2m") as mnt:
        save = os.path.join(mnt, "ck")
        run = str(tmp_path / "run")
        (rc, out), = ranks(common_args(byte_data, run) + WIDER + ["--parallel.ep=1", f"--train.save_dir={save}"],
                           world=1)
        assert rc == EXIT_CHECKPOINT_WRITE, out[-3000:]
        line = one_error_line(out, 0)
        m = re.search(rf"checkpoint folder {save} has too little free space for one checkpoint: needs ~([\d.]+) MB, "
                      rf"([\d.]+) MB free on {mnt} \(tmpfs\)", line)
        assert m and float(m.group(1)) > float(m.group(2)), line
        assert not os.path.exists(os.path.join(run, "metrics.jsonl"))
        assert os.listdir(save) == []  # the probe is gone


def test_full_disk_mid_run_keeps_the_previous_checkpoint_latest(byte_data, tmp_path):
    with tmpfs(str(tmp_path / "disk"), "8m") as mnt:
        save = os.path.join(mnt, "ck")
        args = common_args(byte_data, str(tmp_path / "run")) + WIDER + [
            "--parallel.ep=2", f"--train.save_dir={save}", "--train.train_steps=3", "--train.save_interval=1"]
        results = ranks(args, world=2)
        for r, (rc, out) in enumerate(results):
            assert rc == EXIT_CHECKPOINT_WRITE, out[-3000:]
            line = one_error_line(out, r)
            assert re.search(rf"CheckpointWriteError: rank \d could not write checkpoint step_00000003: ENOSPC \(No "
                             rf"space left on device\) writing {save}/\S+ \(the checkpoint needs ~[\d.]+ MB, [\d.]+ MB "
                             rf"free on {mnt} \(tmpfs\)\); {save}/step_00000002 stays the latest checkpoint\. Free "
                             rf"space", line), line
        assert f"saved checkpoint {save}/step_00000002" in results[0][1]
        # keep_last=2 keeps step 1 while step 3 is written: the third does not fit
        assert sorted(os.listdir(save)) == ["latest", "step_00000001", "step_00000002"]  # no .tmp-*
        assert check_checkpoints(save) == ([1, 2], 2)  # complete, checksums verified


def test_node_local_save_dirs_are_refused_on_two_nodes(byte_data, tmp_path):
    port = str(free_port())
    dirs = [str(tmp_path / f"node{r}" / "ck") for r in (0, 1)]
    nodes = [torchrun(1, common_args(byte_data, str(tmp_path / f"node{r}" / "run")) + [
        "--parallel.ep=2", f"--train.save_dir={dirs[r]}"],
        ["--nnodes", "2", "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", port]) for r in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in nodes]
    for r, (p, out) in enumerate(zip(nodes, outs)):
        assert p.returncode != 0 and re.search(r"exitcode\s*: 5", out), out[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith(f"[rank {r}] error: ")]
        assert len(line) == 1, out[-3000:]
        assert f"checkpoint folder {dirs[1]} is not shared between nodes: rank 1 (the first rank on host" in line[0]
        assert "does not see the marker file rank 0 wrote there" in line[0] and "must be a folder" in line[0]
        assert 'File "' + os.path.join(ROOT, "megatron_mhmoe") not in out  # no traceback of ours
        assert not os.path.exists(os.path.join(tmp_path, f"node{r}", "run", "metrics.jsonl"))
    assert os.listdir(dirs[0]) == [] and os.listdir(dirs[1]) == []  # marker and probes removed


# ---------------------------------------------------------------------- one process, every stage of a save
def _checkpointer(save_dir: str) -> C.Checkpointer:
    return C.Checkpointer(save_dir, ParallelContext.single_process(), C.CheckpointLayout(1, 1, 1, 1, "fp32"),
                          log=lambda m: None)


def test_first_save_on_a_full_tmpfs(tmp_path):
    with tmpfs(str(tmp_path / "tiny"), "2m") as mnt:
        save = os.path.join(mnt, "ck")
        ck = _checkpointer(save)
        ck.check_dir(1000)  # room for a small one: passes, leaves nothing
        assert os.listdir(save) == []
        with pytest.raises(C.CheckpointWriteError) as e:
            ck.save(1, {"w": torch.zeros(750_000)})  # 3 MB
        msg = str(e.value)
        assert re.fullmatch(rf"rank 0 could not write checkpoint step_00000001: ENOSPC \(No space left on device\) "
                            rf"writing {save}/\.tmp-step_00000001/rank_00000\.pt \(the checkpoint needs ~3\.0 MB, "
                            rf"2\.1 MB free on {mnt} \(tmpfs\)\); no earlier checkpoint exists\. Free space or fix "
                            rf"the storage .*, then relaunch: training resumes from the latest checkpoint", msg), msg
        assert os.listdir(save) == []
        with pytest.raises(C.CheckpointWriteError, match=r"needs ~3\.0 MB, 2\.1 MB free on"):
            ck.check_dir(3_000_000)


@pytest.mark.parametrize("stage", ["manifest", "rename", "latest"])
def test_write_error_at_each_stage_keeps_the_previous_checkpoint(tmp_path, monkeypatch, stage):
    save = str(tmp_path / "ck")
    ck = _checkpointer(save)
    ck.save(1, {"w": torch.ones(10)})
    before = tree(save)
    real_write, real_replace = C._fsync_write, os.replace

    def failing_write(path, write, binary=True):
        if (stage, os.path.basename(path)) in (("manifest", C.MANIFEST), ("latest", C.LATEST)):
            raise OSError(errno.EIO, "Input/output error", path)
        return real_write(path, write, binary)

    def failing_replace(src, dst):
        if stage == "rename" and os.path.basename(src) == ".tmp-step_00000002":
            raise OSError(errno.EROFS, "Read-only file system", src)
        return real_replace(src, dst)

    monkeypatch.setattr(C, "_fsync_write", failing_write)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(C.CheckpointWriteError) as e:
        ck.save(2, {"w": torch.ones(10)})
    where = {"manifest": f"{save}/.tmp-step_00000002/manifest.json", "rename": f"{save}/step_00000002",
             "latest": f"{save}/latest"}[stage]
    code = "EROFS (Read-only file system)" if stage == "rename" else "EIO (Input/output error)"
    assert f"could not write checkpoint step_00000002: {code} writing {where} (the checkpoint needs ~0.0 MB" \
           in str(e.value) and f"{save}/step_00000001 stays the latest checkpoint" in str(e.value), str(e.value)
    assert tree(save) == before  # step 2 removed (even renamed), no .tmp-*, `latest` unchanged
    monkeypatch.undo()
    step, state, _ = ck.load_latest()
    assert step == 1 and torch.equal(state["w"], torch.ones(10))


def test_estimate_covers_a_real_checkpoint(tmp_path):
    from megatron_mhmoe.config import ModelConfig, MoEConfig
    from megatron_mhmoe.model.gpt import GPTModel
    model = GPTModel(ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, ffn_hidden_size=64, max_seq_len=32,
                                 moe=MoEConfig(num_experts=4, expert_hidden_size=32, num_heads=2)),
                     ParallelContext.single_process(), seed=1)
    n = sum(p.numel() for p in model.parameters())
    est = C.estimate_rank_bytes(model, 1, 1, 1, "fp32")
    # weights + fp32 master + 2 moments + universal fp32 + 2 moments = 28 bytes a parameter
    assert 28 * n < est < 28 * n * 1.1 + 70_000
