"""CoDyRA: continual dynamic rank-selective LoRA on both CLIP towers, merged after every task.

Paper: Lu et al., "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language
Models with Dynamic Rank-Selective LoRA" (arXiv 2412.01004; 2026 version "Take Only What You Need: Rank
Minimization as an Implicit Forgetting Regularizer in Continual Learning"). Reference code:
Artificer-AI-Lab/CoDyRA (``loralib/codyra.py``, ``models/codyra.py``, ``runner_codyra.sh``).

Per task: a fresh rank-r LoRA with per-rank gates ``w ~ N(0, 1)`` on q, k, v, out, fc, proj of every block of both
towers (``ΔW = B·diag(w)·A``, scaling 1); AdamW + cosine; loss `ctta.losses.seen_masked_clip_loss` (image→text CE
over [seen; current] classes with the seen columns at −inf, plus the text→image soft CE), current-class text
features recomputed every iteration through the LoRA'd text tower with the first template, seen-class features
computed once at the start of the task. After the task, zero-gate ranks are pruned, the rest merged into the base
weights and a fresh LoRA injected: inference is plain CLIP, no task id, no stored data. All of that is the training
path shared with the fixed-rank `ctta.strategies.lora_ft.LoRA` (`ctta.task_lora.TaskLoRA`); this strategy adds
only the gates and the L1 penalty on them, applied as a proximal step: after every optimizer step past the dense
phase, every gate is soft-thresholded by κ, with κ stepped through ``linspace(0, κ_max, 50)`` (`kappa_schedule`).

Deviations (deliberate):
- ``soft_threshold_`` is the proximal operator ``w ← sign(w)·max(|w| − κ, 0)`` of methods.md §4.2. The reference
  applies three masked in-place updates in sequence, so a gate in (κ, 2κ] is first shrunk below κ and then zeroed
  (it zeroes ``|w| < 2κ``); ``reference_threshold=True`` reproduces that.
- When the sparse phase ``iterations − dense`` is shorter than 50 iterations the reference's step interval is 0
  and κ never leaves 0 (no pruning at all); we then compress the ramp to one level per sparse iteration, so κ
  still climbs to κ_max. The cumulative shrinkage Σκ then scales with the task length: the world configs scale
  κ_max by 500/iterations to keep the reference's Σκ ≈ 0.65 (`kappa_schedule` gives the exact values).
- ``logit_scale=None`` uses the model's ``exp(logit_scale)`` as the reference does (100 for OpenAI weights).
- Without ``begin_task`` (hidden boundary) the whole training space is treated as the current task.
- Under torchrun (the reference is single-GPU) the text-to-image term softmaxes over each rank's share of the
  batch, as DDP training of CLIP without feature gathering does; the image-to-text term is exact.

On a ``ModifiedResNet`` image tower (CLIP RN50/RN101) the image side is the attention pool, mapped as in `LoRA`
(``ctta.strategies.lora_ft``: ``q``/``k``/``v``/``out`` on ``attnpool``'s projections; ours, the reference adapts ViTs).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ctta.adapters.lora import TARGETS, TOWERS
from ctta.checks import check_number
from ctta.stream import LabelSpace
from ctta.strategies.lora_ft import LoRA


def kappa_schedule(total: int, kappa_max: float, n_kappa: int = 50, dense_ratio: float = 0.5) -> list[float]:
    """κ applied after optimizer step ``i`` (0-based) of a task of ``total`` steps; 0 means no thresholding.

    Reference loop: before step i, if ``i ≥ dense`` and ``i % interval == 0`` the index into
    ``linspace(0, κ_max, n_kappa)`` advances by one (clamped at the end); after step i, gates are thresholded
    if ``i > dense``; ``dense = dense_ratio·total``, ``interval = (total − dense) // n_kappa``. If the sparse phase
    is shorter than ``n_kappa`` iterations, ``n_kappa`` becomes its length (interval 1), so κ still ramps to κ_max."""
    check_number("CoDyRA", "kappa_max", kappa_max)
    check_number("CoDyRA", "dense_ratio", dense_ratio, high=1.0)
    if total <= 0 or n_kappa <= 0:
        raise ValueError(f"bad κ schedule: total={total}, n_kappa={n_kappa}, dense_ratio={dense_ratio}, "
                         f"kappa_max={kappa_max}")
    dense = dense_ratio * total
    n_kappa = max(2, min(n_kappa, int(total - dense)))  # short tasks: one level per sparse iteration
    levels = np.linspace(0.0, kappa_max, n_kappa)
    interval = max(1, int((total - dense) // n_kappa))
    out, idx = [], 0
    for i in range(total):
        if i >= dense and i % interval == 0:
            idx += 1
        out.append(float(levels[min(n_kappa - 1, idx)]) if i > dense else 0.0)
    return out


@torch.no_grad()
def soft_threshold_(gates: Iterable[Tensor], kappa: float, reference: bool = False) -> None:
    """In place: ``w ← sign(w)·max(|w| − κ, 0)``; ``reference=True`` replays the reference's sequential masked
    updates (``w > κ: w −= κ``; ``w < −κ: w += κ``; then ``|w| < κ: w = 0``)."""
    for w in gates:
        if reference:
            w[w > kappa] -= kappa
            w[w < -kappa] += kappa
            w[w.abs() < kappa] = 0.0
        else:
            w.copy_(w.sign() * (w.abs() - kappa).clamp_min(0))


class RankSelectiveLoRA(LoRA):
    """CoDyRA (see the module docstring). Reference defaults; ``summary()`` reports per task the effective rank
    of every module and ``||θ_t − θ_0||_F``. The per-task LoRA lifecycle and state are `LoRA`'s; this class adds the
    gates and their κ schedule."""

    gated = True

    def __init__(self, *, rank: int = 16, targets: Sequence[str] = TARGETS, towers: Sequence[str] = TOWERS,
                 layers: Sequence[int] | Mapping | None = None, lr: float = 5e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.9999), warmup: int = 0, kappa_max: float = 0.005,
                 n_kappa: int = 50, dense_ratio: float = 0.5, reference_threshold: bool = False,
                 text_to_image: bool | None = None, logit_scale: float | None = None, batch_size: int = 64,
                 epochs: int = 1, iterations: int | None = 500, grad_clip: float | None = None, amp: bool = False):
        kappa_schedule(1, kappa_max, n_kappa, dense_ratio)  # validate now, not at the first task
        super().__init__(rank=rank, targets=targets, towers=towers, layers=layers, lr=lr, weight_decay=weight_decay,
                         betas=betas, warmup=warmup, text_to_image=text_to_image, logit_scale=logit_scale,
                         batch_size=batch_size, epochs=epochs, iterations=iterations, grad_clip=grad_clip, amp=amp)
        self.kappa_max, self.n_kappa, self.dense_ratio = kappa_max, n_kappa, dense_ratio
        self.reference_threshold = reference_threshold
        self._kappas: list[float] = []  # κ after each step of the current task
        self._it = 0  # steps taken in the current task

    def _start(self, space: LabelSpace, current: LabelSpace, total: int) -> None:
        super()._start(space, current, total)
        self._kappas = kappa_schedule(total, self.kappa_max, self.n_kappa, self.dense_ratio)
        self._it = 0

    def _after_step(self, stepped: bool) -> dict[str, float]:
        kappa = self._kappas[min(self._it, len(self._kappas) - 1)]
        if stepped and kappa > 0:  # proximal step of the L1 penalty on the gates
            soft_threshold_(self.task_lora.gates(), kappa, self.reference_threshold)
        self._it += 1
        return {"kappa": kappa}
