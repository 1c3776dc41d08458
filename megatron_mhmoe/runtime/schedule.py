"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr, as a LambdaLR factor.

Resuming with another train.train_steps than the checkpoint's (train.resume_schedule, printed at resume):
- 'recompute' (default): warmup and decay follow the new train_steps from the resume step on, so the lr
  jumps there (raising train_steps from 30 to 60 moves a run that had decayed to min_lr back up the cosine);
- 'keep': the saved train_steps stays the schedule's length; past it the lr stays flat at its last value
  (min_lr for cosine/linear decay), which is how a finished run is continued without a new warmup or bump.
"""
from __future__ import annotations

import math
from typing import Optional


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


def make_lr_lambda(train_cfg, total: Optional[int] = None):
    """The LambdaLR factor of train_cfg's schedule over `total` steps (default train_cfg.train_steps)."""
    t = train_cfg
    return lambda step: lr_factor(step, t.lr, t.min_lr, t.warmup_steps, t.train_steps if total is None else total,
                                  t.lr_decay_style)


def resume_schedule_rule(train_cfg, scheduler_step: int, saved_steps: int) -> tuple[int, str]:
    """(schedule length to use, the note printed at resume) for a checkpoint saved with train_steps=saved_steps.

    scheduler_step: the scheduler's count of applied steps (its next lr is the factor at this index)."""
    t = train_cfg
    old = t.lr * lr_factor(scheduler_step, t.lr, t.min_lr, t.warmup_steps, saved_steps, t.lr_decay_style)
    total = saved_steps if t.resume_schedule == "keep" else t.train_steps
    new = t.lr * lr_factor(scheduler_step, t.lr, t.min_lr, t.warmup_steps, total, t.lr_decay_style)
    if t.resume_schedule == "keep":
        rule = (f"the saved schedule is kept (train.resume_schedule=keep: {t.lr_decay_style} over {saved_steps} "
                f"steps, flat past them); --train.resume_schedule=recompute fits it to {t.train_steps} steps")
    else:
        rule = (f"the schedule is recomputed for {t.train_steps} steps (train.resume_schedule=recompute); "
                f"--train.resume_schedule=keep keeps the saved one ({saved_steps} steps, flat past them)")
    note = (f"note: train.train_steps is {t.train_steps}, the checkpoint was trained for {saved_steps}: {rule}. "
            f"Learning rate of the next step: {old:.4g} under the saved schedule, {new:.4g} now")
    return total, note
