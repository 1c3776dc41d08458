"""tools/reshard_checkpoint.py: a run saved at one layout continues at another with the same losses.

- Train 3 of 5 steps at world 4 (TP=2, EP=4, ZeRO-1), reshard the step-3 checkpoint to world 2 (TP=1, EP=2,
  ZeRO-2) and to one process (ZeRO-0), and continue: steps 4-5 match continuing at world 4 without
  resharding. The global batch stays 4 sequences (micro 2 x accumulation x DP) and every layout routes per
  micro-batch of 2, so the runs are the same maths in another reduction order. Tolerance: rel 2e-5
  (fp32; the max observed difference is printed, ~1e-7 on this machine).
- The aux-loss-free bias (on in every run here) is identical on every rank at step 3 and after the resumed
  steps 4-5, is carried by the tool, and after steps 4-5 at the new layout equals the world-4 run's exactly.
- A round trip world 4 -> 2 -> 1 -> 4 reproduces every original rank tensor (weights, fp32 masters, Adam
  moments, steps, scheduler) exactly, vocabulary padding included (RNG: rank 0's; the 1-rank hop keeps one).
- Loading a checkpoint of another layout without the tool still fails with the message naming the tool.
"""
from __future__ import annotations

import os

import pytest
import torch

from megatron_mhmoe.checkpoint.consolidate import run_checkpoint_tool
from megatron_mhmoe.checkpoint.reshard import reshard
from tests.runtime.test_train_launch import byte_data, finish, losses, torchrun  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REL_TOL = 2e-5


def run_args(data: str, run_dir: str, tp: int, ep: int, zero: int, extra=()) -> list[str]:
    return [f"--run_dir={run_dir}", f"--data.data_path=[{data}]", "--model.vocab_size=300",
            "--model.hidden_size=32", "--model.num_layers=2", "--model.ffn_hidden_size=64", "--model.max_seq_len=32",
            "--model.num_attention_heads=4", "--model.moe.num_experts=4", "--model.moe.expert_hidden_size=16",
            "--model.moe.num_heads=2", "--train.seq_len=16", "--train.micro_batch_size=2",
            "--train.global_batch_size=4", "--train.train_steps=5", "--train.warmup_steps=2",
            "--train.log_interval=1", "--train.eval_interval=100", "--train.eval_iters=1",
            "--train.save_interval=100", f"--train.zero_stage={zero}", f"--parallel.tp={tp}", f"--parallel.ep={ep}",
            "--model.moe.bias_update_rate=0.01", "--wandb.mode=disabled", "--data.split=90,10,0", *extra]


@pytest.fixture(scope="module")
def trained(byte_data, tmp_path_factory):  # noqa: F811
    """World-4 run stopped at step 3 (checkpoint), then continued to step 5 without resharding."""
    d = tmp_path_factory.mktemp("reshard")
    run = str(d / "a")
    out = finish(torchrun(4, run_args(byte_data, run, 2, 4, 1, ["--train.exit_interval=3"])))
    assert "exit_interval 3 reached at step 3" in out
    ckpt3 = os.path.join(run, "checkpoints", "step_00000003")
    keep = str(d / "a_step3")
    import shutil
    shutil.copytree(ckpt3, keep)  # the continuation below may prune it
    finish(torchrun(4, run_args(byte_data, run, 2, 4, 1)))
    return {"dir": d, "ckpt": keep, "want": losses(run), "data": byte_data,
            "final_bias": rank_biases(os.path.join(run, "checkpoints", "step_00000005"))}


def rank_biases(ckpt: str) -> list[dict]:
    """Every rank file's aux-loss-free biases (name -> (E,) tensor), from a checkpoint folder."""
    from megatron_mhmoe.checkpoint import consolidate as C
    _, states = C.read_checkpoint(ckpt, _safe(), log=lambda m: None)
    return [{k: v for k, v in st["model"].items() if k.endswith("expert_bias.value")} for st in states]


def assert_same_bias_everywhere(biases: list[dict], want: dict, where: str) -> None:
    assert want and all(v.dtype == torch.float32 and v.abs().sum() > 0 for v in want.values()), where
    for r, b in enumerate(biases):
        assert set(b) == set(want), (where, r)
        for k in b:
            assert torch.equal(b[k], want[k]), f"{where}: rank {r} {k} = {b[k].tolist()} != {want[k].tolist()}"


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("world,tp,ep,zero", [(2, 1, 2, 2), (1, 1, 1, 0)])
def test_resharded_run_continues_with_the_same_losses(trained, world, tp, ep, zero):
    run = str(trained["dir"] / f"w{world}")
    save_dir = os.path.join(run, "checkpoints")
    reshard(trained["ckpt"], save_dir, world, tp, ep, zero, log=lambda m: None)
    out = finish(torchrun(world, run_args(trained["data"], run, tp, ep, zero)))
    assert "universal per-parameter copy" in out and "at step 3" in out
    got, want = losses(run), trained["want"]
    assert sorted(got) == [4, 5]
    diffs = [rel(got[s], want[s]) for s in (4, 5)]
    print(f"world {world} TP={tp} EP={ep} ZeRO-{zero}: max rel loss difference {max(diffs):.3g}")
    assert max(diffs) < REL_TOL, (got, want)
    # The aux-loss-free bias: the resharded checkpoint carries step 3's on every rank, and after two more
    # steps at the new layout (world 1: two micro-batches per step) it equals the world-4 run's, exactly.
    assert_same_bias_everywhere(rank_biases(os.path.join(save_dir, "step_00000003")), rank_biases(trained["ckpt"])[0],
                                f"resharded to world {world}")
    assert_same_bias_everywhere(rank_biases(os.path.join(save_dir, "step_00000005")), trained["final_bias"][0],
                                f"world {world} after steps 4-5")


def _assert_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, (where, a, b)


def test_bias_is_identical_on_every_rank(trained):
    """The world-4 run's bias after 3 steps and after the resumed steps 4-5, on all 4 rank files."""
    for ckpt_bias, where in ((rank_biases(trained["ckpt"]), "step 3"), (trained["final_bias"], "step 5")):
        assert len(ckpt_bias) == 4
        assert_same_bias_everywhere(ckpt_bias, ckpt_bias[0], where)
    first = next(iter(trained["final_bias"][0]))
    assert not torch.equal(trained["final_bias"][0][first], rank_biases(trained["ckpt"])[0][first])  # it moved


def test_round_trip_4_2_1_4_is_exact(trained, tmp_path):
    from megatron_mhmoe.checkpoint import consolidate as C
    src = trained["ckpt"]
    cur = src
    for i, (world, tp, ep, zero) in enumerate([(2, 1, 2, 2), (1, 1, 1, 0), (4, 2, 4, 1)]):
        out = str(tmp_path / f"hop{i}")
        cur = reshard(cur, out, world, tp, ep, zero, log=lambda m: None)
    _, orig = C.read_checkpoint(src, _safe(), log=lambda m: None)
    manifest, back = C.read_checkpoint(cur, _safe(), log=lambda m: None)
    assert manifest["universal_only"] and manifest["layout"]["world_size"] == 4
    moments = [e["exp_avg_sq"].abs().sum() for s in orig for e in s["universal"]["params"].values()]
    assert len(moments) >= len(orig[0]["universal"]["meta"]) and all(m > 0 for m in moments)  # real state
    for r in range(4):
        assert "optimizer" not in back[r]
        _assert_equal(orig[r]["model"], back[r]["model"], f"rank{r}.model")
        _assert_equal(orig[r]["universal"]["params"], back[r]["universal"]["params"], f"rank{r}.universal")
        _assert_equal(orig[r]["universal"]["meta"], back[r]["universal"]["meta"], f"rank{r}.meta")
        _assert_equal(orig[r]["scheduler"], back[r]["scheduler"], f"rank{r}.scheduler")
        if r == 0:  # the 1-process hop keeps one RNG stream: rank r takes old rank r mod old world
            _assert_equal(orig[r]["rng"], back[r]["rng"], f"rank{r}.rng")
        assert back[r]["consumed_samples"] == orig[r]["consumed_samples"] == 12


def test_tool_refuses_bad_targets_with_clear_errors(trained, tmp_path, capsys):
    """What tools/reshard_checkpoint.py returns and prints: run_checkpoint_tool around reshard()."""
    def tool(out, world, tp, ep):
        return run_checkpoint_tool(lambda: reshard(trained["ckpt"], str(tmp_path / out), world, tp, ep,
                                                   log=lambda m: None), trained["ckpt"])
    assert tool("x", 2, 1, 3) == 2
    assert "does not divide world size" in capsys.readouterr().err
    assert tool("y", 8, 1, 8) == 2
    assert "experts do not split over EP=8" in capsys.readouterr().err
    assert tool("z", 1, 1, 1) == 0
    assert tool("z", 1, 1, 1) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_other_layout_without_tool_names_the_tool(trained, tmp_path):
    from megatron_mhmoe.parallel.context import ParallelContext
    from megatron_mhmoe.runtime.checkpoint import CheckpointError, Checkpointer, CheckpointLayout
    import shutil
    save_dir = tmp_path / "ckpt"
    shutil.copytree(trained["ckpt"], save_dir / "step_00000003")
    (save_dir / "latest").write_text("step_00000003")
    ck = Checkpointer(str(save_dir), ParallelContext.single_process(), CheckpointLayout(1, 1, 1, 0, "fp32"),
                      log=lambda m: None)
    with pytest.raises(CheckpointError, match="tools/reshard_checkpoint.py"):
        ck.check_layout(str(save_dir / "step_00000003"))


def _safe():
    from megatron_mhmoe.runtime.engine import checkpoint_safe_globals
    return checkpoint_safe_globals()
