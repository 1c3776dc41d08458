"""The ZeRO-0 clip policy in Engine.step, for the optimizer wrappers DeepSpeed puts around ours.

DeepSpeed's CPU accelerator has no fp16, so the fp16 (FP16_UnfusedOptimizer) branch is checked here on a stand-in
with the same attributes: its grads are the loss-scaled fp16 grads, and the norm must be divided by the loss
scale, which FP16_UnfusedOptimizer keeps in `loss_scale_config.cur_scale` (not `cur_scale`). The bf16 and fp32
branches run for real in test_deepspeed_equivalence.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.runtime.engine import Engine


class _FakeDS:
    def __init__(self, opt):
        self.opt, self.steps, self.skipped_steps = opt, 0, 0

    def _get_optimizer_loss_scale(self):  # DeepSpeed's accessor, as in 0.19.8's engine
        if hasattr(self.opt, "loss_scale_config"):
            return self.opt.loss_scale_config.cur_scale
        return getattr(self.opt, "cur_scale", None)

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.steps += 1


def _engine(precision: str, scale: float, clip: float):
    dense = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    expert = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    expert.expert = True
    # Loss-scaled grads: true gradient (3, 4, 0) dense and (0, 0, 0, 12) expert -> true norm 13.
    dense.grad = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float16) * scale
    expert.grad = torch.tensor([0.0, 0.0, 0.0, 12.0], dtype=torch.float16) * scale
    opt = SimpleNamespace(fp16_groups=[[dense], [expert]], loss_scale_config=SimpleNamespace(cur_scale=scale))
    eng = Engine.__new__(Engine)
    eng.ctx, eng.precision, eng.zero_stage, eng.clip_grad = ParallelContext.single_process(), precision, 0, clip
    eng.optimizer, eng.ds, eng.device, eng._skipped_here = opt, _FakeDS(opt), torch.device("cpu"), 0
    eng.module = torch.nn.Module()
    eng.module.dense, eng.module.expert = dense, expert
    return eng, dense, expert


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_fp16_zero0_norm_is_unscaled_and_counts_experts(scale):
    eng, dense, expert = _engine("fp16", scale, clip=0.0)
    assert eng.loss_scale == scale
    result = eng.step()
    assert result.grad_norm == pytest.approx(13.0, rel=1e-3)
    assert not result.skipped and eng.ds.steps == 1


def test_fp16_zero0_clips_the_scaled_grads_to_the_true_norm():
    eng, dense, expert = _engine("fp16", 1024.0, clip=1.3)
    result = eng.step()
    assert result.grad_norm == pytest.approx(13.0, rel=1e-3)
    true_after = torch.cat([dense.grad.float(), expert.grad.float()]) / 1024.0
    assert float(true_after.norm()) == pytest.approx(1.3, rel=2e-3)


def test_fp16_overflow_reaches_the_loss_scaler_on_every_rank():
    """A rank whose own grads are finite still hands DeepSpeed an overflow when the global norm is not."""
    eng, dense, expert = _engine("fp16", 1024.0, clip=1.0)
    eng._grads_the_optimizer_applies = lambda: ([(dense, dense.grad)], 1.0)
    import megatron_mhmoe.parallel.grads as grads
    real = grads.global_norm
    grads.global_norm = lambda pairs, ctx, device=None: torch.tensor(float("inf"))  # another rank overflowed
    try:
        result = eng.step()
    finally:
        grads.global_norm = real
    assert result.skipped and eng.ds.steps == 1  # DeepSpeed's step ran: its scaler skips and lowers the scale
    assert not torch.isfinite(dense.grad).all()


def test_nonfinite_norm_skips_the_update_without_fp16():
    eng, dense, expert = _engine("fp32", 1.0, clip=1.0)
    expert.grad[0] = float("inf")
    result = eng.step()
    assert result.skipped and eng.skipped_steps == 1
    assert dense.grad is None and expert.grad is None  # nothing for the optimizer to apply
