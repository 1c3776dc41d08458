"""Checkpoints in one process: round trip, latest/prune, crash leftovers, corruption fallback, layout
mismatch, exact RNG restore, and refusal of pickled code."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.runtime.checkpoint import (LATEST, MANIFEST, CheckpointError, Checkpointer, CheckpointLayout,
                                               rng_state, set_rng_state, step_dirname)

LAYOUT = CheckpointLayout(world_size=1, tp=1, ep=1, zero_stage=0, precision="fp32")


def make(save_dir, keep_last=2, layout=LAYOUT):
    logs: list[str] = []
    ck = Checkpointer(str(save_dir), ParallelContext.single_process(), layout, keep_last=keep_last,
                      log=logs.append)
    return ck, logs


def state_for(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(4, 3, generator=g), "b": torch.arange(3, dtype=torch.int64) + step},
            "optimizer": {"step": step, "lr": 0.1 * step, "betas": [0.9, 0.98]},
            "data": {"consumed": 16 * step, "epoch": 0}, "name": f"s{step}", "flag": True, "none": None,
            "rng": rng_state()}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def read_latest(save_dir) -> str:
    return (save_dir / LATEST).read_text().strip()


# ---------------------------------------------------------------------- round trip, latest, prune
def test_save_load_round_trip(tmp_path):
    ck, logs = make(tmp_path)
    assert ck.load_latest() is None  # nothing saved yet (save_dir does not even exist)
    st = state_for(10)
    folder = ck.save(10, st, extra_manifest={"run_id": "abc"})
    assert folder == str(tmp_path / step_dirname(10))
    assert sorted(os.listdir(folder)) == [MANIFEST, "rank_00000.pt"]
    assert any("saved checkpoint" in line for line in logs)
    step, loaded, manifest = ck.load_latest()
    assert step == 10
    assert_same(st, loaded)
    assert manifest["step"] == 10 and manifest["run_id"] == "abc"
    assert manifest["layout"] == LAYOUT.__dict__
    [entry] = manifest["files"]
    path = os.path.join(folder, entry["file"])
    assert entry["bytes"] == os.path.getsize(path)
    assert entry["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    # nothing temporary is left behind
    assert sorted(os.listdir(tmp_path)) == [LATEST, step_dirname(10)]


def test_latest_points_to_newest_and_keep_last_prunes(tmp_path):
    ck, _ = make(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        ck.save(step, state_for(step))
        assert read_latest(tmp_path) == step_dirname(step)
    assert ck.complete_steps() == [3, 4]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("step_")) == [step_dirname(3), step_dirname(4)]
    step, loaded, _ = ck.load_latest()
    assert step == 4
    assert_same(state_for(4)["model"], loaded["model"])


def test_keep_last_zero_keeps_everything(tmp_path):
    ck, _ = make(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        ck.save(step, {"x": torch.tensor(step)})
    assert ck.complete_steps() == [1, 2, 3]


def test_resave_same_step_replaces_it(tmp_path):
    ck, _ = make(tmp_path)
    ck.save(5, {"x": torch.tensor(1)})
    ck.save(5, {"x": torch.tensor(2)})
    step, loaded, _ = ck.load_latest()
    assert step == 5 and loaded["x"].item() == 2


# ---------------------------------------------------------------------- crash leftovers
def test_crash_mid_save_leftovers_are_ignored(tmp_path):
    ck, _ = make(tmp_path, keep_last=5)
    ck.save(100, state_for(100))
    # a crash while writing step 200: the temp folder holds a half-written rank file and no manifest
    tmp = tmp_path / f".tmp-{step_dirname(200)}"
    tmp.mkdir()
    (tmp / "rank_00000.pt").write_bytes(b"half a file")
    # a crash in some other version of the code: a final-named folder without a manifest
    bare = tmp_path / step_dirname(300)
    bare.mkdir()
    torch.save(state_for(300), bare / "rank_00000.pt")
    assert ck.complete_steps() == [100]
    step, loaded, _ = ck.load_latest()
    assert step == 100
    assert_same(state_for(100)["model"], loaded["model"])
    # the next save of that step clears the leftover temp folder
    ck.save(200, state_for(200))
    assert not tmp.exists()
    assert ck.load_latest()[0] == 200


def test_complete_folder_newer_than_latest_pointer_is_not_used(tmp_path):
    """Crash after the rename but before `latest` moved: the pointer stays authoritative."""
    ck, _ = make(tmp_path, keep_last=5)
    ck.save(1, state_for(1))
    ck.save(2, state_for(2))
    (tmp_path / LATEST).write_text(step_dirname(1))
    assert ck.load_latest()[0] == 1


# ---------------------------------------------------------------------- corruption fallback
def _flip_bytes(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, mid + 8):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("damage, needle", [(_flip_bytes, "checksum differs"), (_truncate, "truncated"),
                                            (os.remove, "is missing")])
def test_damaged_rank_file_falls_back_to_previous(tmp_path, damage, needle):
    ck, logs = make(tmp_path, keep_last=3)
    ck.save(1, state_for(1))
    ck.save(2, state_for(2))
    bad = tmp_path / step_dirname(2) / "rank_00000.pt"
    damage(str(bad))
    step, loaded, _ = ck.load_latest()
    assert step == 1
    assert_same(state_for(1)["model"], loaded["model"])
    warnings = [line for line in logs if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert step_dirname(2) in warnings[0] and "rank_00000.pt" in warnings[0] and needle in warnings[0]


def test_unreadable_manifest_falls_back(tmp_path):
    ck, logs = make(tmp_path, keep_last=3)
    ck.save(1, state_for(1))
    ck.save(2, state_for(2))
    (tmp_path / step_dirname(2) / MANIFEST).write_text("{not json")
    assert ck.load_latest()[0] == 1
    assert any("manifest unreadable" in line for line in logs)


def test_every_checkpoint_damaged_gives_none(tmp_path):
    ck, logs = make(tmp_path)
    ck.save(1, state_for(1))
    _flip_bytes(str(tmp_path / step_dirname(1) / "rank_00000.pt"))
    assert ck.load_latest() is None
    assert len([line for line in logs if line.startswith("WARNING")]) == 1


# ---------------------------------------------------------------------- layout mismatch
def test_layout_mismatch_names_reshard_tool(tmp_path):
    saved = CheckpointLayout(world_size=2, tp=1, ep=2, zero_stage=1, precision="bf16")
    ck, _ = make(tmp_path, layout=saved)
    ck.save(7, {"x": torch.ones(2)})
    current = CheckpointLayout(world_size=2, tp=1, ep=1, zero_stage=1, precision="bf16")
    ck2, _ = make(tmp_path, layout=current)
    with pytest.raises(CheckpointError) as e:
        ck2.load_latest()
    msg = str(e.value)
    assert "tools/reshard_checkpoint.py" in msg
    assert "EP=2" in msg and "EP=1" in msg and "--ep 1" in msg


def test_zero_stage_mismatch_is_a_layout_error(tmp_path):
    ck, _ = make(tmp_path, layout=CheckpointLayout(1, 1, 1, 2, "fp32"))
    ck.save(1, {"x": torch.ones(1)})
    ck2, _ = make(tmp_path, layout=CheckpointLayout(1, 1, 1, 0, "fp32"))
    with pytest.raises(CheckpointError, match="ZeRO-2"):
        ck2.load_latest()


# ---------------------------------------------------------------------- RNG
def _draws():
    return (torch.rand(5), torch.randn(3), np.random.rand(4), np.random.standard_normal(3),
            [random.random() for _ in range(3)], random.gauss(0, 1))


def test_rng_state_restores_all_streams_exactly(tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    # leave a cached gaussian in numpy and python so the restore has to carry it too
    np.random.standard_normal(1)
    random.gauss(0, 1)
    state = rng_state()
    ck, _ = make(tmp_path)
    ck.save(1, {"rng": state})
    first = _draws()
    # scramble every stream
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    _draws()
    _, loaded, _ = ck.load_latest()  # through torch.save / weights_only torch.load
    set_rng_state(loaded["rng"])
    second = _draws()
    for a, b in zip(first, second):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and straight from memory
    set_rng_state(state)
    third = _draws()
    for a, b in zip(first, third):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------- refuse pickled code
class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    save_dir = tmp_path / "ckpt"
    marker = tmp_path / "pwned"
    ck, logs = make(save_dir)
    ck.save(1, state_for(1))
    # plant step 2: a rank file whose unpickling would create `marker`, with a manifest that matches it
    folder = save_dir / step_dirname(2)
    folder.mkdir()
    rank_file = folder / "rank_00000.pt"
    torch.save({"model": _Evil(str(marker))}, rank_file)
    with open(rank_file, "rb") as f:
        data = f.read()
    manifest = {"format_version": 1, "step": 2, "layout": LAYOUT.__dict__, "time": 0.0,
                "files": [{"file": "rank_00000.pt", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    (save_dir / LATEST).write_text(step_dirname(2))
    # sanity: the same payload, loaded without weights_only, does run (so the refusal below means something)
    probe_marker = tmp_path / "probe_ran"
    probe = tmp_path / "probe.pt"
    torch.save({"model": _Evil(str(probe_marker))}, probe)
    torch.load(probe, weights_only=False)["model"].close()
    assert probe_marker.exists()
    assert ck.complete_steps() == [1, 2]
    with pytest.raises((pickle.UnpicklingError, RuntimeError)) as e:
        ck.load_latest()
    assert "weights_only" in str(e.value) or "Unsupported global" in str(e.value)
    assert not marker.exists()
    # the planted global is not loadable even though the checksum matches
    assert ck._verify(str(folder)) is None
