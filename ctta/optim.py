"""Learning-rate schedules and the per-task step count shared by strategies.

Both schedules start with a linear warm-up from ``lr/warmup`` to ``lr`` over ``warmup`` steps (WiSE-FT / ZSCL's
``cosine_lr`` warms up the same way); ``"cosine"`` then decays to ``min_ratio·lr`` at ``total_steps`` (ZSCL, WiSE-FT,
CoDyRA), ``"constant"`` stays at ``lr``. A schedule is a `LambdaLR` over a small callable object rather than a
closure, so that its length is part of ``scheduler.state_dict()`` (torch saves the ``__dict__`` of callable objects,
not of functions) and a schedule loaded into a placeholder continues with the saved length.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES: tuple[str, ...] = ("cosine", "constant")


class WarmupCosine:
    """The factor of ``lr`` after ``step`` scheduler steps: linear warm-up, then cosine decay to ``min_ratio``."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0):
        self.total_steps, self.warmup_steps, self.min_ratio = int(total_steps), int(warmup_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupConstant:
    """The factor of ``lr`` after ``step`` scheduler steps: linear warm-up, then 1."""

    def __init__(self, warmup_steps: int = 0):
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        return (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0


def check_schedule(schedule: str, warmup: int) -> None:
    """Validate a schedule name and warm-up length (at construction, before any work)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 steps, got {warmup}")


def lr_schedule(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup: int = 0) -> LambdaLR:
    """A fresh per-task schedule on ``optimizer`` (``"cosine"`` or ``"constant"``, see the module docstring).

    Built on an optimizer that already ran a schedule (optimizer kept across tasks), it restarts from the
    optimizer's ``initial_lr``, i.e. the configured ``lr``, not from where the previous schedule ended."""
    check_schedule(schedule, warmup)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    factor = WarmupCosine(total_steps, warmup) if schedule == "cosine" else WarmupConstant(warmup)
    return LambdaLR(optimizer, factor)


def steps_per_task(n_samples: int, batch_size: int, epochs: int, iterations: int | None) -> int:
    """The number of batches the runner feeds for a task: ``iterations`` if set, else ``epochs`` full passes."""
    if iterations is not None:
        return iterations
    return epochs * -(-n_samples // batch_size)
