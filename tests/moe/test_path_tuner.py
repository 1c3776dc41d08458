"""moe/path_tuner.py in one process with a fake clock: the trial's order, what decides, what does not count.
(Every EP rank taking the slowest rank's pick is tested at world 4 in test_two_level.py.)"""
from __future__ import annotations

import torch

from megatron_mhmoe.moe.path_tuner import PathTuner

FWD = {"flat": 3.0, "two_level": 2.0}  # seconds of each path's forward on the fake clock


def make(forwards=2, bwd=None, fwd=None):
    now = [0.0]
    fwd = {p: list(v) for p, v in (fwd or {}).items()}  # per path, the cost of each forward in turn
    tuner = PathTuner(forwards, clock=lambda: now[0])

    class Costed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, path):
            ctx.path = path
            now[0] += fwd[path].pop(0) if fwd.get(path) else FWD[path]
            return x * 2

        @staticmethod
        def backward(ctx, g):
            now[0] += (bwd or {}).get(ctx.path, 0.0)
            return g * 2, None

    def forward(key=("S",), prior="flat", backward=True):
        path = tuner.pick(key, prior)
        x = torch.ones(3, requires_grad=True)
        y = tuner.timed(key, lambda v: Costed.apply(v, path), x)
        if backward and torch.is_grad_enabled():
            y.sum().backward()
            assert torch.equal(x.grad, torch.full((3,), 2.0))  # the clocks pass gradients through unchanged
        return path
    return tuner, forward


def test_trial_alternates_from_the_prior_then_keeps_the_faster():
    tuner, forward = make(forwards=2)
    assert [forward() for _ in range(6)] == ["flat", "two_level"] * 3  # 1 warm-up + 2 measured per path
    assert [forward() for _ in range(3)] == ["two_level"] * 3
    assert tuner.decided[("S",)] == dict(picked="two_level", flat_ms=3000.0, two_level_ms=2000.0, with_backward=True)


def test_the_backward_counts():
    tuner, forward = make(forwards=1, bwd={"two_level": 5.0})  # faster forward, slower fwd + bwd
    for _ in range(5):
        forward(prior="two_level")
    assert tuner.decided[("S",)] == dict(picked="flat", flat_ms=3000.0, two_level_ms=7000.0, with_backward=True)


def test_without_backward_the_forward_decides():
    tuner, forward = make(forwards=1, bwd={"two_level": 5.0})
    for _ in range(5):
        forward(backward=False)
    assert tuner.decided[("S",)]["picked"] == "two_level" and not tuner.decided[("S",)]["with_backward"]


def test_evaluation_forwards_and_other_shapes_do_not_count():
    tuner, forward = make(forwards=1)
    with torch.no_grad():
        assert [forward() for _ in range(6)] == ["flat"] * 6
    assert not tuner.decided
    assert [forward(key=("A",)), forward(key=("B",)), forward(key=("A",))] == ["flat", "flat", "two_level"]


def test_zero_forwards_is_the_cost_model_alone():
    tuner, forward = make(forwards=0)
    assert [forward(prior="two_level") for _ in range(6)] == ["two_level"] * 6 and not tuner.decided


def test_a_disturbed_sample_does_not_decide():
    # flat measures 3 s once and 10 s once (the host was busy): its best run decides, not its median.
    tuner, forward = make(forwards=2, fwd={"flat": [3.0, 3.0, 10.0], "two_level": [4.0, 4.0, 4.0]})
    for _ in range(7):
        forward()
    assert tuner.decided[("S",)]["picked"] == "flat" and tuner.decided[("S",)]["flat_ms"] == 3000.0
