"""ZeRO-3 with a dense model (model.moe=null) at world 2, with parameters really partitioned.

- resume: a run stopped after its step-3 checkpoint continues with exactly the losses of an uninterrupted
  run (CPU fp32: bit-identical floats), and every rank's file holds full tensors;
- reshard: the step-3 checkpoint converted to ZeRO-1 on one process and to ZeRO-3 on two again continues
  with the uninterrupted run's losses (rel 2e-5, the tolerance of tests/reliability/test_reshard.py);
- export: the exported single-process model's logits equal the trained ZeRO-3 model's (atol/rtol 1e-5);
- refused with a message: --zero-stage 3 for an MoE checkpoint; a rank file holding only a partition.
stage3_param_persistence_threshold=100 keeps biases and norms whole (DeepSpeed's persistent parameters)
and partitions the matrices, so both kinds go through save and load; the session asserts that some
parameters are partitioned, so nothing passes because ZeRO-3 left the model whole.
The runs of one world size share one run_workers session (Trainer.run in turn) to keep the file quick.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed import run_workers
from tests.reliability.test_reshard import REL_TOL, rel
from tests.runtime.test_train_launch import byte_data, losses  # noqa: F401 (fixture)

DS_ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100}}
TOKENS = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))


def run_args(data: str, run_dir: str, zero: int) -> list[str]:
    return [f"--run_dir={run_dir}", f"--data.data_path=[{data}]", "--model.vocab_size=300", "--model.moe=null",
            "--model.hidden_size=32", "--model.num_layers=2", "--model.ffn_hidden_size=64", "--model.max_seq_len=32",
            "--model.num_attention_heads=4", "--train.seq_len=16", "--train.micro_batch_size=2",
            "--train.global_batch_size=4", "--train.train_steps=5", "--train.warmup_steps=2", "--train.lr=3e-3",
            "--train.log_interval=1", "--train.eval_interval=100", "--train.eval_iters=1", "--train.save_interval=100",
            f"--train.zero_stage={zero}", "--parallel.tp=1", "--parallel.ep=1", "--wandb.mode=disabled",
            "--data.split=90,10,0"]


def _train(data: str, run_dir: str, zero: int, ds_path: str, world: int, extra=()):
    from megatron_mhmoe.launch.cli import resolve_config
    from megatron_mhmoe.runtime.run_config import check_ds_config_agrees
    from megatron_mhmoe.runtime.trainer import Trainer
    cfg = resolve_config(None, run_args(data, run_dir, zero) + list(extra))
    cfg.validate(world)
    with open(ds_path) as f:
        check_ds_config_agrees(cfg, json.load(f), ds_path)
    trainer = Trainer(cfg, ds_path)
    assert trainer.run() == 0
    return trainer


def _two_ranks(rank: int, world: int, data: str, d: str) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_mhmoe.parallel import comm
    from megatron_mhmoe.runtime import engine
    engine.init_distributed(120)
    ds = os.path.join(d, "ds_zero3.json")
    _train(data, os.path.join(d, "full"), 3, ds, world)
    _train(data, os.path.join(d, "parts"), 3, ds, world, ["--train.exit_interval=3"])
    trainer = _train(data, os.path.join(d, "parts"), 3, ds, world)
    params = dict(trainer.module.named_parameters())
    state = trainer.engine.model_state_dict()
    # A persistent parameter has a partition too, but stays gathered between forwards.
    facts = {"partitioned": sorted(n for n, p in params.items()
                                   if p.ds_tensor.numel() < p.ds_numel and not p.ds_persist),
             "persistent": sorted(n for n, p in params.items() if p.ds_persist),
             "wrong_shapes": sorted(n for n, p in params.items() if list(state[n].shape) != list(p.ds_shape))}
    trainer.engine.eval()
    with torch.no_grad():
        facts["logits"] = trainer.engine(TOKENS).logits[..., :300].clone()
    # Resume and reshard overwrite the weights from the optimizer's fp32 masters afterwards, so the load is
    # checked on its own: other weights in, the same out; a wrong shape is named.
    bumped = {k: v + 1 for k, v in state.items()}
    trainer.engine.load_model_state_dict(bumped)
    back = trainer.engine.model_state_dict()
    facts["round_trip"] = sorted(k for k in bumped if not torch.equal(back[k], bumped[k]))
    name = facts["partitioned"][0]
    try:
        trainer.engine.load_model_state_dict(dict(state, **{name: state[name][:1]}))
        facts["bad_shape"] = None
    except RuntimeError as e:
        facts["bad_shape"] = str(e)
    if rank == 0:
        from megatron_mhmoe.checkpoint.reshard import reshard
        step3 = os.path.join(d, "parts", "checkpoints", "step_00000003")
        for run, w, zero in (("z3w2", 2, 3), ("z1w1", 1, 1)):
            reshard(step3, os.path.join(d, run, "checkpoints"), w, 1, 1, zero, log=lambda m: None)
    comm.barrier()
    _train(data, os.path.join(d, "z3w2"), 3, ds, world)
    return facts


def _one_rank(rank: int, world: int, data: str, d: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megatron_mhmoe.runtime import engine
    engine.init_distributed(120)
    _train(data, os.path.join(d, "z1w1"), 1, os.path.join(d, "ds_zero1.json"), world)


@pytest.fixture(scope="module")
def runs(byte_data, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("zero3")
    (d / "ds_zero3.json").write_text(json.dumps(DS_ZERO3))
    (d / "ds_zero1.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    facts = run_workers(_two_ranks, 2, byte_data, str(d), timeout_s=300)
    run_workers(_one_rank, 1, byte_data, str(d), timeout_s=120)
    return {"dir": d, "facts": facts, "want": losses(str(d / "full"))}


def test_parameters_are_partitioned_and_saved_whole(runs):
    from megatron_mhmoe.checkpoint import consolidate as C
    from megatron_mhmoe.runtime.engine import checkpoint_safe_globals
    for f in runs["facts"]:
        assert any(".weight" in n or "embeddings" in n for n in f["partitioned"]), f["partitioned"]
        assert f["persistent"] and set(f["persistent"]).isdisjoint(f["partitioned"])
        assert f["wrong_shapes"] == [] and f["round_trip"] == []
        name = f["partitioned"][0]
        assert f"{name} [1, " in f["bad_shape"] and "given vs" in f["bad_shape"], f["bad_shape"]
    _, states = C.read_checkpoint(str(runs["dir"] / "parts" / "checkpoints" / "step_00000005"),
                                  checkpoint_safe_globals(), log=lambda m: None)
    for name, t in states[0]["model"].items():
        assert list(t.shape) == states[0]["universal"]["meta"][name]["local_shape"], name
        assert torch.equal(t, states[1]["model"][name]), name  # DP replicas: the same full tensor
    assert states[0]["optimizer"]["zero_stage"] == 3 and states[0]["optimizer"]["partition_count"] == 2


def test_interrupted_run_resumes_exactly(runs):
    want, got = runs["want"], losses(str(runs["dir"] / "parts"))
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5]
    assert [got[s] for s in (4, 5)] == [want[s] for s in (4, 5)]  # exact, not approximate
    assert want[5] < want[1]


@pytest.mark.parametrize("name", ["z3w2", "z1w1"])
def test_resharded_run_continues_with_the_same_losses(runs, name):
    got, want = losses(str(runs["dir"] / name)), runs["want"]
    assert sorted(got) == [4, 5]
    diffs = [rel(got[s], want[s]) for s in (4, 5)]
    print(f"ZeRO-3 world 2 -> {name}: max rel loss difference {max(diffs):.3g}")
    assert max(diffs) < REL_TOL, (got, want)


def test_exported_logits_equal_trained_logits(runs, tmp_path):
    out = str(tmp_path / "exported")
    from megatron_mhmoe.evaluation.generate import load_model
    from megatron_mhmoe.export.native import export
    export(str(runs["dir"] / "parts" / "checkpoints"), out, log=lambda m: None)
    model, info = load_model(out)
    assert info["step"] == 5
    with torch.no_grad():
        got = model(TOKENS).logits[..., :model.config.vocab_size]
    want = runs["facts"][0]["logits"]
    print(f"exported vs trained (ZeRO-3) logits: max abs difference {float((got - want).abs().max()):.3g}")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_refusals_name_the_problem(runs, tmp_path, capsys):
    from megatron_mhmoe.checkpoint import consolidate as C
    from megatron_mhmoe.runtime.checkpoint import CheckpointError
    meta = {"layers.0.moe.experts.w1": {"expert": True}, "layers.0.norm1.weight": {"expert": False}}
    with pytest.raises(CheckpointError, match="ZeRO-3 is refused with MoE layers"):
        C.check_target_zero_stage(meta, 3)
    C.check_target_zero_stage(meta, 2)
    C.check_target_zero_stage({"layers.0.norm1.weight": {"expert": False}}, 3)
    # A rank file that kept only its partition (what ZeRO-3 saved before parameters were gathered).
    manifest, states = C.read_checkpoint(str(runs["dir"] / "parts" / "checkpoints" / "step_00000005"),
                                         _safe(), log=lambda m: None)
    name = next(n for n, m in states[0]["universal"]["meta"].items() if len(m["local_shape"]) == 2)
    states[0]["model"][name] = torch.zeros(0)
    with pytest.raises(CheckpointError, match=f"{name} with shape \\[0\\].*only this rank's ZeRO-3 partition"):
        C.gather_full(manifest, states)


def _safe():
    from megatron_mhmoe.runtime.engine import checkpoint_safe_globals
    return checkpoint_safe_globals()
