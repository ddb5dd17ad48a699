"""The learning-rate schedule of a stage: linear warm-up, then cosine, linear or constant decay to a floor.

The schedule is a plain `torch.optim.lr_scheduler.LambdaLR`, so its state (`last_epoch`) saves and
resumes with the checkpoint like any torch scheduler. Optimizer step s (0-based) runs at lr x factor(s):
warm-up reaches the full lr on its last step (no step is wasted at lr 0), and decay reaches
`min_lr_ratio` x lr on the stage's last step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .recipe import Schedule


def lr_factor(step: int, schedule: Schedule, total_steps: int) -> float:
    """The multiplier of the peak lr at optimizer step `step` of a stage of `total_steps`."""
    if step < schedule.warmup:
        return (step + 1) / schedule.warmup
    if schedule.decay == "constant":
        return 1.0
    span = max(1, total_steps - schedule.warmup - 1)
    progress = min(1.0, (step - schedule.warmup) / span)
    floor = schedule.min_lr_ratio
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule.decay == "cosine" else 1 - progress
    return floor + (1 - floor) * shape


def build_scheduler(optimizer: Optimizer, schedule: Schedule, total_steps: int) -> LambdaLR:
    """A torch LR scheduler stepping once per optimizer step."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, schedule, total_steps))
