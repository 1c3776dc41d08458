"""Resume compatibility: the manifest records the settings that define the data and the routing; a resume that
changes one is refused with each change and the fix, unless train.allow_changed_resume=true.

- one process through the real entry point (world 1, global batch 4 = micro 2 x accumulation 2): a run stops
  at step 3 (12 samples); a relaunch with global batch 8 and top_k 1 is refused with exit 1, one line naming
  both changes, the checkpoint untouched; with the override it resumes at step 3 and the data position stays
  in samples: consumed_samples 12 + 8 per step (20, 28, 36), with a note that the sample order is redrawn;
  a smaller global batch is refused: the train set (train_steps x global batch) cannot hold the rest;
- a checkpoint written before the record existed resumes with a one-line note;
- the record compares data prefixes as absolute paths, and a dense model records no routing settings.
"""
from __future__ import annotations

import json
import os

from megatron_mhmoe.runtime import checkpoint as C
from megatron_mhmoe.runtime.run_config import program_defaults
from tests.reliability.test_checkpoint_dir import one_error_line, ranks, tree
from tests.runtime.test_train_launch import byte_data, common_args  # noqa: F401


def args(data: str, run_dir: str, *extra: str) -> list[str]:
    return common_args(data, run_dir) + ["--parallel.ep=1", "--train.train_steps=6", "--train.eval_interval=0",
                                         "--train.global_batch_size=4"] + list(extra)


def consumed(run_dir: str) -> dict[int, int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["consumed_samples"] for r in recs if "consumed_samples" in r}


def test_changed_resume_is_refused_then_allowed_and_keeps_the_sample_position(byte_data, tmp_path):
    run = str(tmp_path / "run")
    (rc, out), = ranks(args(byte_data, run, "--train.exit_interval=3"), world=1)
    assert rc == 0, out[-3000:]
    save = os.path.join(run, "checkpoints")
    before = tree(save)

    (rc, out), = ranks(args(byte_data, run, "--train.global_batch_size=8", "--model.moe.top_k=1"), world=1)
    assert rc == 1, out[-3000:]
    line = one_error_line(out, 0)
    assert (f"CheckpointError: checkpoint {save}/step_00000003 was trained with other data or routing settings than "
            f"this run: train.global_batch_size 4 saved vs 8 now; model.moe.top_k 2 saved vs 1 now. Relaunch with the "
            f"saved values (its manifest.json has them), or pass --train.allow_changed_resume=true") in line, line
    assert tree(save) == before

    (rc, out), = ranks(args(byte_data, run, "--train.global_batch_size=2", "--train.micro_batch_size=1",
                            "--train.allow_changed_resume=true"), world=1)
    assert rc == 1, out[-3000:]
    assert (f"checkpoint {save}/step_00000003 has consumed 12 samples; the 3 steps left to train.train_steps=6 at "
            f"global batch 2 need 18, but the train set holds 12") in one_error_line(out, 0)
    assert tree(save) == before

    (rc, out), = ranks(args(byte_data, run, "--train.global_batch_size=8", "--train.allow_changed_resume=true"),
                       world=1)
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and "at step 3 (12 samples consumed)" in out, out[-3000:]
    assert ("WARNING: resuming with changed settings (train.allow_changed_resume=true): train.global_batch_size 4 "
            "saved vs 8 now") in out
    assert ("note: the train set now holds train_steps x global_batch_size = 48 samples, the checkpoint's held 24: "
            "training continues at sample 12 of a reshuffled order") in out
    assert consumed(run) == {1: 4, 2: 8, 3: 12, 4: 20, 5: 28, 6: 36}

    # As written before the record existed: resumes (at the changed batch too) with one note.
    manifest = os.path.join(save, "step_00000006", C.MANIFEST)
    m = json.load(open(manifest))
    for key in ("resume_settings", "train_samples"):
        del m[key]
    json.dump(m, open(manifest, "w"))
    (rc, out), = ranks(args(byte_data, run, "--train.train_steps=7", "--train.global_batch_size=8"), world=1)
    assert rc == 0, out[-3000:]
    notes = [ln for ln in out.splitlines() if "predates" in ln]
    assert notes == [f"note: checkpoint {save}/step_00000006 predates the record of data and routing settings: "
                     f"resuming without comparing them with this run's"], out[-3000:]
    assert consumed(run)[7] == 44


def test_record_and_changes(tmp_path, monkeypatch):
    cfg = program_defaults().to_dict()
    cfg["data"]["data_path"] = [0.3, "data/a", 0.7, os.path.abspath("data/b")]
    rec = C.resume_record(cfg)
    assert set(rec) == set(C.RESUME_KEYS)
    assert rec["data.data_path"] == [0.3, os.path.abspath("data/a"), 0.7, os.path.abspath("data/b")]
    assert C.resume_changes(rec, C.resume_record(json.loads(json.dumps(cfg)))) == []
    monkeypatch.chdir(tmp_path)  # relative prefixes launched elsewhere name other files
    moved = C.resume_changes(rec, C.resume_record(cfg))
    assert len(moved) == 1 and moved[0].startswith("data.data_path [0.3, ")
    changed = json.loads(json.dumps(cfg))
    changed["train"]["seq_len"] = 128
    changed["model"]["moe"]["gate"] = "softmax"
    changed["data"]["split"] = "98,1,1"
    assert C.resume_changes(C.resume_record(cfg), C.resume_record(changed)) == [
        "train.seq_len 64 saved vs 128 now", "data.split '969,30,1' saved vs '98,1,1' now",
        "model.moe.gate 'xmoe' saved vs 'softmax' now"]
    dense = json.loads(json.dumps(cfg))
    dense["model"]["moe"] = None
    assert C.resume_record(dense)["model.moe.num_experts"] is None
    assert C.resume_changes({"train.seed": 1}, C.resume_record(cfg)) == ["train.seed 1 saved vs 1234 now"]
