"""Continual-learning and test-time metrics as pure functions.

``R[i][j]`` is the accuracy on task ``j`` after training task ``i`` (0-indexed here; the formulas in methods.md §7
are 1-indexed). Accuracies may be fractions or percentages: every metric is linear in them (ECE excepted).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {R.shape}")
    if not np.isfinite(R).all():
        raise ValueError("accuracy matrix has non-finite entries")
    return R


def cil_step_accuracy(R, sizes: Sequence[int]) -> np.ndarray:
    """Class-incremental accuracy at each step: over all test samples of the tasks seen so far, sample-weighted
    (continuum's ``Logger.accuracy``), given that ``R[t][j]`` for ``j <= t`` was measured over the seen classes."""
    R = _matrix(R)
    n = np.asarray(sizes, dtype=np.float64)
    if n.shape != (R.shape[0],) or (n <= 0).any():
        raise ValueError(f"need one positive test-set size per task, got {list(sizes)}")
    return np.array([(R[t, : t + 1] * n[: t + 1]).sum() / n[: t + 1].sum() for t in range(R.shape[0])])


def average_incremental_accuracy(step_accuracies: Sequence[float]) -> float:
    """iCaRL's average incremental accuracy: the mean of the step accuracies, the first step included."""
    a = np.asarray(step_accuracies, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no step accuracies")
    return float(a.mean())


def last_accuracy(step_accuracies: Sequence[float]) -> float:
    return float(np.asarray(step_accuracies, dtype=np.float64)[-1])


def forgetting(R, *, continuum_quirk: bool = False) -> float:
    """Chaudhry et al. 2018, eq. 3: mean over the first T-1 tasks of the largest drop from any earlier row (from the
    task's own row to row T-2) to the last row. 0 for a single task.

    ``continuum_quirk=True`` reproduces continuum's code (commit 265a985, ``metrics.forgetting``), which skips task
    T-2 and row T-2 but still divides by T-1 — use it only to compare with logs produced by that code."""
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    if continuum_quirk:
        return float(sum((R[j : T - 2, j]).max() - R[T - 1, j] for j in range(T - 2)) / (T - 1))
    return float(np.mean([(R[j : T - 1, j] - R[T - 1, j]).max() for j in range(T - 1)]))


def bwt(R) -> float:
    """Backward transfer, GEM (Lopez-Paz & Ranzato 2017): mean of ``R[T][j] - R[j][j]`` over the first T-1 tasks."""
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def bwt_all_pairs(R, *, continuum_quirk: bool = False) -> float:
    """The all-pairs backward transfer of Díaz-Rodríguez et al. 2018 used by continuum's ``backward_transfer`` (the
    "bwt" field of RAPF / MoE-Adapters logs): ``2/(T(T-1)) Σ_{j<i} (R[i][j] - R[j][j])``. Not GEM's BWT.

    ``continuum_quirk=True`` reproduces continuum's code (commit 265a985), whose inner loop stops at ``j < i-1``
    (the pair (i, i-1) is skipped) while the divisor stays ``T(T-1)/2``."""
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    stop = 1 if continuum_quirk else 0
    return float(sum(R[i, j] - R[j, j] for i in range(1, T) for j in range(i - stop)) * 2 / (T * (T - 1)))


def forward_transfer(R) -> float:
    """Continuum's forward transfer: mean of ``R[i-1][i]`` (accuracy on a task just before training it)."""
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean([R[i - 1, i] for i in range(1, T)]))


def mtil_transfer(R) -> float:
    """MTIL Transfer (ZSCL ``results.ipynb``): for each task after the first, the mean of the entries above it in
    its column (accuracy before it was trained), averaged over those tasks."""
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        raise ValueError("MTIL transfer needs at least two tasks")
    return float(np.mean([R[:j, j].mean() for j in range(1, T)]))


def mtil_average(R) -> float:
    """MTIL Average: the mean of the whole T x T matrix."""
    return float(_matrix(R).mean())


def mtil_last(R) -> float:
    """MTIL Last: the mean of the last row."""
    return float(_matrix(R)[-1].mean())


def summarize(R, sizes: Sequence[int], scope: str) -> dict[str, float]:
    """The metrics that apply to a stream's evaluation scope ("seen" → CIL metrics; "own"/"all" → MTIL)."""
    R = _matrix(R)
    out = {"forgetting": forgetting(R), "bwt": bwt(R), "bwt_all_pairs": bwt_all_pairs(R),
           "forward_transfer": forward_transfer(R)}
    if scope == "seen":
        steps = cil_step_accuracy(R, sizes)
        out.update(step_accuracy=steps.tolist(), average=average_incremental_accuracy(steps),
                   last=last_accuracy(steps))
    else:
        out.update(average=mtil_average(R), last=mtil_last(R))
        if R.shape[0] > 1:
            out["transfer"] = mtil_transfer(R)
    return out


def expected_calibration_error(confidences: Tensor | np.ndarray, correct: Tensor | np.ndarray,
                               n_bins: int = 20) -> float:
    """ECE with ``n_bins`` equal-width confidence bins (C-TPT uses 20): ``Σ_b |B_b|/n · |acc(B_b) − conf(B_b)|``.
    A confidence of exactly 0 falls in the first bin; bins are (lo, hi] otherwise, with the edges ``k / n_bins``
    rounded to the confidences' own precision: a float32 confidence of 0.05 is float32(0.05), slightly above 0.05, and
    must still fall in the bin that ends at 0.05 (a uniform prediction over 20 classes)."""
    raw = torch.as_tensor(confidences).flatten()
    raw = raw if raw.is_floating_point() else raw.double()
    conf = raw.double()
    corr = torch.as_tensor(correct, dtype=torch.float64).flatten()
    if conf.shape != corr.shape or conf.numel() == 0:
        raise ValueError("confidences and correctness must be non-empty and of equal length")
    if ((conf < 0) | (conf > 1)).any():
        raise ValueError("confidences must lie in [0, 1]")
    edges = torch.tensor([k / n_bins for k in range(n_bins + 1)], dtype=torch.float64).to(raw.dtype)
    bins = torch.clamp(torch.searchsorted(edges, raw.contiguous()) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.double().mean().item() * abs(corr[m].mean().item() - conf[m].mean().item())
    return float(ece)
