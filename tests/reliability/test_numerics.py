"""Numerics: non-finite losses/gradients end to end, the non-finite step logic, and fp32 routing under bf16.

End to end (2 CPU processes, EP=2, MHMOE_FAULT=nan_loss:S poisons the loss of step S on every rank):
- one NaN step is detected, reported, its update skipped (ZeRO-1 fp32/bf16: DeepSpeed's overflow check;
  ZeRO-0 fp32: train.py drops the grads), and the run finishes with finite losses afterwards;
- NaN from step 3 on: the run stops after train.max_nonfinite_steps steps in a row with exit code 3 on every
  rank, writes no checkpoint from the non-finite state and keeps the last good one (finite weights).

fp16: DeepSpeed's fp16 engine is not supported on the CPU accelerator (launch_check refuses it; see
tests/launch/test_launch_check.py::test_fp16_refused_on_cpu_accelerator), so the fp16 overflow-skip
path is tested at unit level: NonFiniteGuard does not count steps the loss scaler skipped.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.metrics import summarize
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.runtime import faults
from megatron_mhmoe.runtime.checkpoint import MANIFEST
from megatron_mhmoe.runtime.exit_codes import EXIT_NONFINITE
from megatron_mhmoe.runtime.trainer import NonFiniteGuard
from tests.reliability.test_faults import Watch, check_checkpoints, fault_args, launch_ranks
from tests.runtime.test_train_launch import byte_data, finish, losses, torchrun  # noqa: F401

SP = ParallelContext.single_process()


# ---------------------------------------------------------------------- unit: the guard and the fault spec
def test_guard_counts_nonfinite_steps_in_a_row_and_resets():
    g = NonFiniteGuard(3)
    assert not g.update(2.0, 1.0) and g.clean
    assert g.update(float("nan"), 1.0) and not g.clean and not g.should_stop
    assert g.update(2.0, float("inf")) and g.in_a_row == 2  # finite loss, inf grad norm, not skipped: counts
    assert not g.update(2.0, 1.0) and g.clean and g.in_a_row == 0  # reset
    for i in range(3):
        g.update(float("inf"), float("nan"))
    assert g.should_stop and g.total == 5


def test_guard_fp16_overflow_skips_are_loss_scale_calibration_not_failures():
    """fp16 dynamic loss scaling starts high and skips steps until the scale fits: never a stop."""
    g = NonFiniteGuard(2)
    for _ in range(10):
        assert not g.update(5.0, float("inf"), overflow_skip=True)
    assert g.clean and not g.should_stop and g.overflow_skips == 10
    # ... but a NaN loss is a NaN loss even when the scaler skipped the step
    g.update(float("nan"), float("inf"), overflow_skip=True)
    g.update(float("nan"), float("inf"), overflow_skip=True)
    assert g.should_stop


def test_fault_spec_parsing(monkeypatch):
    fs = faults.parse("kill_after_rank_file:4@1, kill_before_latest:8,kill_rank:1:step:3,nan_loss:3-5,inf_loss:7")
    assert [(f.kind, f.first, f.last, f.rank) for f in fs] == [
        ("kill_after_rank_file", 4, 4, 1), ("kill_before_latest", 8, 8, None), ("kill_rank", 3, 3, 1),
        ("nan_loss", 3, 5, None), ("inf_loss", 7, 7, None)]
    for bad in ("kill_after_manifest:3", "nan_loss:x", "nan_loss:5-3", "kill_rank:1:3", "kill_before_latest:-1"):
        with pytest.raises(ValueError, match="MHMOE_FAULT"):
            faults.parse(bad)
    monkeypatch.setenv(faults.ENV, "nan_loss:3-4")
    assert [faults.loss_value(s) for s in (2, 3, 4, 5)][0] is None
    assert math.isnan(faults.loss_value(3)) and faults.loss_value(5) is None
    assert "fault injection armed" in faults.check()
    faults.at_checkpoint("kill_before_latest", 3, 0)  # not armed for that point: returns
    monkeypatch.delenv(faults.ENV)
    assert faults.active() == [] and faults.check() is None


def test_malformed_fault_spec_is_a_config_error(monkeypatch, capsys):
    from megatron_mhmoe.train import main
    monkeypatch.setenv(faults.ENV, "nan_los:3")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    assert main(["--parallel.ep=1"]) == 2
    assert "config error: MHMOE_FAULT: cannot parse 'nan_los:3'" in capsys.readouterr().err


# ---------------------------------------------------------------------- unit: routing stays fp32 in bf16
def _layer(gate: str, E: int = 64, proj: bool = False, dtype=torch.float32) -> MHMoELayer:
    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=2, num_heads=4, head_projection=proj, expert_hidden_size=16, gate=gate))
    return MHMoELayer(cfg, SP).to(dtype)


@pytest.mark.parametrize("gate", ["xmoe", "softmax"])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_router_statistics_finite_and_routing_exact_in_bf16(gate, scale):
    """A bf16 layer routes exactly like an fp32 layer holding the same (bf16-representable) weights, even for
    large activations, and every statistic, loss and router gradient is finite."""
    torch.manual_seed(0)
    bf = _layer(gate, dtype=torch.bfloat16)
    fp = _layer(gate)
    fp.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})
    x = (torch.randn(16, 4, 64) * scale).to(torch.bfloat16)
    y_bf, st_bf = bf(x)
    y_fp, st_fp = fp(x.float())
    assert y_bf.dtype == torch.bfloat16 and torch.isfinite(y_bf.float()).all()
    # without the head projection the router sees identical values: fp32 routing gives identical choices
    assert torch.equal(st_bf.selections, st_fp.selections) and torch.equal(st_bf.kept, st_fp.kept)
    assert torch.equal(st_bf.divergence, st_fp.divergence)
    for a, b in ((st_bf.aux_loss, st_fp.aux_loss), (st_bf.z_loss, st_fp.z_loss)):
        assert a.dtype == torch.float32 and torch.isfinite(a)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(st_bf.selections.sum()) == 16 * 4 * 4 * 2  # tokens x heads x top-k: nothing lost
    report = summarize([st_bf], 0.5)
    assert all(math.isfinite(float(v)) for v in report.values()), report
    (y_bf.float().square().mean() + st_bf.aux_loss + st_bf.z_loss).backward()
    for name, p in bf.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name


def test_bf16_with_head_projection_keeps_statistics_finite():
    torch.manual_seed(1)
    layer = _layer("xmoe", E=128, proj=True, dtype=torch.bfloat16)
    _, st = layer((torch.randn(32, 2, 64) * 1000).to(torch.bfloat16))
    assert torch.isfinite(st.aux_loss) and torch.isfinite(st.z_loss) and st.z_loss.dtype == torch.float32
    assert int(st.kept.sum()) == 32 * 2 * 4 * 2


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize("zero, precision", [(0, "fp32"), (1, "bf16")])
def test_one_nan_step_is_skipped_and_training_continues(byte_data, tmp_path, zero, precision):
    run_dir = str(tmp_path / "run")
    args = fault_args(byte_data, run_dir, steps=6) + [f"--train.zero_stage={zero}",
                                                       f"--train.precision={precision}"]
    procs = launch_ranks(args, "nan_loss:3")
    outs = [Watch(p, "x") for p in procs]
    for p in procs:
        p.wait(240)
    for w in outs:
        w.thread.join(10)
    assert [p.returncode for p in procs] == [0, 0], outs[0].text[-3000:] + outs[1].text[-3000:]
    assert "non-finite loss nan" in outs[0].text and "at step 3 (1 in a row" in outs[0].text
    got = losses(run_dir)
    assert math.isnan(got[3]) and all(math.isfinite(got[s]) for s in (1, 2, 4, 5, 6)), got
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    last = [r for r in recs if r.get("step") == 6 and "loss" in r][-1]
    moe = {k: v for k, v in last.items() if k.startswith("moe/") or k in ("activation_ratio", "divergence")}
    assert moe and all(math.isfinite(v) for v in moe.values()), moe  # routing statistics stay finite
    # the weights were not poisoned: the saved final checkpoint holds finite tensors only
    steps, latest = check_checkpoints(os.path.join(run_dir, "checkpoints"))
    assert latest == 6
    _assert_finite_checkpoint(os.path.join(run_dir, "checkpoints", "step_00000006"))


def _assert_finite_checkpoint(folder: str) -> None:
    from megatron_mhmoe.runtime.engine import checkpoint_safe_globals
    for name in sorted(os.listdir(folder)):
        if name == MANIFEST:
            continue
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            state = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
        for k, v in state["model"].items():
            assert torch.isfinite(v.float()).all(), (name, k)


def test_repeated_nan_stops_with_exit_3_and_keeps_last_good_checkpoint(byte_data, tmp_path):
    run_dir = str(tmp_path / "run")
    save_dir = os.path.join(run_dir, "checkpoints")
    args = fault_args(byte_data, run_dir, steps=10) + ["--train.max_nonfinite_steps=3"]
    procs = launch_ranks(args, "nan_loss:3-10")
    outs = [Watch(p, "x") for p in procs]
    for p in procs:
        p.wait(240)
    for w in outs:
        w.thread.join(10)
    out = outs[0].text
    assert [p.returncode for p in procs] == [EXIT_NONFINITE, EXIT_NONFINITE], out[-3000:]
    assert "not saving a checkpoint at step 4: it is non-finite" in out
    assert "stopping: 3 non-finite steps in a row" in out
    assert f"the last good checkpoint is {os.path.join(save_dir, 'step_00000002')}" in out
    assert "Traceback" not in out
    assert check_checkpoints(save_dir) == ([2], 2)
    _assert_finite_checkpoint(os.path.join(save_dir, "step_00000002"))
    assert max(losses(run_dir)) == 5  # stopped at step 5 = 3rd non-finite step in a row
