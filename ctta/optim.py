"""Optimizer and schedule factories shared by strategies."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                       min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_ratio``·lr at ``total_steps``
    (the schedule of ZSCL / WiSE-FT's ``cosine_lr``)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def adamw_cosine(params, total_steps: int, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, warmup: int = 0) -> tuple[torch.optim.AdamW, LambdaLR]:
    """The optimizer + schedule pair most fine-tuning strategies rebuild at each task (ZSCL, CoDyRA)."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return optimizer, cosine_with_warmup(optimizer, total_steps, warmup)


def steps_per_task(n_samples: int, batch_size: int, epochs: int, iterations: int | None) -> int:
    """The number of batches the runner feeds for a task: ``iterations`` if set, else ``epochs`` full passes."""
    if iterations is not None:
        return iterations
    return epochs * -(-n_samples // batch_size)
