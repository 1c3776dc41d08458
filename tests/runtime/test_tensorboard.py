"""TensorBoard logging (tensorboard.enabled): the event files hold every scalar of metrics.jsonl under the same
name and step, with the same value (float32 in the event file: equal within 1e-6 relative)."""
from __future__ import annotations

import json
import os

import pytest

from tests.runtime.test_train_launch import byte_data, common_args, finish, torchrun  # noqa: F401 (fixture)

pytest.importorskip("tensorboard")


def test_tensorboard_scalars_equal_metrics_jsonl(byte_data, tmp_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = str(tmp_path / "tb")
    finish(torchrun(1, common_args(byte_data, run) + ["--parallel.ep=1", "--train.train_steps=2",
                                                      "--train.warmup_steps=1", "--tensorboard.enabled=true"]))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {}
    for row in rows:
        for k, v in row.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                want[(k, row["step"])] = float(v)
    assert {k for k, _ in want} == tags
    got = {(tag, e.step): e.value for tag in tags for e in acc.Scalars(tag)}
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key
    assert "loss" in tags and "val/ppl" in tags
