"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr, as a LambdaLR factor."""
from __future__ import annotations

import math


def lr_factor(step: int, lr: float, min_lr: float, warmup: int, total: int, style: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based: the lr used by step+1)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if style == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr if lr > 0 else 0.0
    if style == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_lambda(train_cfg):
    t = train_cfg
    return lambda step: lr_factor(step, t.lr, t.min_lr, t.warmup_steps, t.train_steps, t.lr_decay_style)
