"""LR schedule: linear warmup to the peak, then cosine / linear decay to min_lr, or constant."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_mhmoe.runtime.run_config import TrainConfig
from megatron_mhmoe.runtime.schedule import lr_factor, make_lr_lambda

LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 100


def factors(style, lr=LR, min_lr=MIN_LR, warmup=WARMUP, total=TOTAL, upto=None):
    return [lr_factor(s, lr, min_lr, warmup, total, style) for s in range((upto or total) + 1)]


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_near_zero_to_one(style):
    f = factors(style)
    assert f[0] == pytest.approx(1 / WARMUP)  # ~0: the first step uses a tenth of the peak
    assert f[WARMUP - 1] == pytest.approx(1.0)
    steps = [f[i + 1] - f[i] for i in range(WARMUP - 1)]
    assert all(d == pytest.approx(1 / WARMUP) for d in steps)  # equal increments
    assert f[WARMUP] == pytest.approx(1.0)  # the decay starts from the peak


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_decay_ends_at_min_lr_and_is_monotone(style):
    f = factors(style, upto=TOTAL + 20)
    assert f[TOTAL] == pytest.approx(MIN_LR / LR)
    assert all(x == pytest.approx(MIN_LR / LR) for x in f[TOTAL:])  # stays at the floor past train_steps
    after = f[WARMUP - 1:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert min(f[WARMUP:]) >= MIN_LR / LR - 1e-12


def test_cosine_shape():
    floor = MIN_LR / LR
    mid = WARMUP + (TOTAL - WARMUP) // 2
    assert lr_factor(mid, LR, MIN_LR, WARMUP, TOTAL, "cosine") == pytest.approx(floor + (1 - floor) * 0.5)
    expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_factor(10 + 20, LR, MIN_LR, 10, 90, "cosine") == pytest.approx(expected)  # 20 of 80 decay steps


def test_linear_shape():
    floor = MIN_LR / LR
    f = factors("linear")
    decrements = [f[i] - f[i + 1] for i in range(WARMUP, TOTAL)]
    assert all(d == pytest.approx((1 - floor) / (TOTAL - WARMUP)) for d in decrements)


def test_constant_stays_at_peak():
    f = factors("constant", upto=TOTAL + 5)
    assert all(x == 1.0 for x in f[WARMUP - 1:])


def test_no_warmup_starts_at_peak():
    assert lr_factor(0, LR, MIN_LR, 0, TOTAL, "cosine") == 1.0
    assert lr_factor(TOTAL, LR, MIN_LR, 0, TOTAL, "cosine") == pytest.approx(MIN_LR / LR)


def test_warmup_covering_all_steps_never_decays():
    assert lr_factor(TOTAL - 1, LR, MIN_LR, TOTAL, TOTAL, "cosine") == pytest.approx(1.0)
    assert lr_factor(TOTAL + 3, LR, MIN_LR, TOTAL, TOTAL, "cosine") == 1.0


def test_zero_peak_lr_decays_to_zero_floor():
    assert lr_factor(TOTAL, 0.0, 0.0, WARMUP, TOTAL, "cosine") == pytest.approx(0.0)


def test_make_lr_lambda_drives_torch_scheduler():
    t = TrainConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, train_steps=TOTAL, lr_decay_style="cosine")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda(t))
    seen = []
    for _ in range(TOTAL):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(LR / WARMUP)
    assert max(seen) == pytest.approx(LR)
    assert seen[WARMUP - 1] == pytest.approx(LR)
    assert opt.param_groups[0]["lr"] == pytest.approx(MIN_LR)  # after train_steps steps
    assert all(b <= a + 1e-15 for a, b in zip(seen[WARMUP - 1:], seen[WARMUP:]))
