"""Weight-space merging of a `Clip` with a snapshot of its own trainable parameters.

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022; code mlfoundations/wise-ft) mixes the
fine-tuned weights with the zero-shot ones: ``θ ← (1 − α)·θ_zeroshot + α·θ``. ZSCL's continual "WiSE-FT" baseline
(Thunderbeee/ZSCL ``mtil/src/models/finetune.py``, ``--wise_merge``) applies it after every task, α = 0.8.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ctta.checks import check_number
from ctta.model import Clip


def check_alpha(alpha: float | None, name: str = "alpha") -> float | None:
    """An interpolation coefficient in [0, 1] (1 keeps the fine-tuned weights; ``None`` = no interpolation), or a
    `ValueError` naming the setting ``name``."""
    return check_number("WiSE-FT interpolation", name, alpha, high=1.0, none_ok=True)


@torch.no_grad()
def interpolate_(model: Clip, anchor_state: Mapping[str, Tensor], alpha: float) -> None:
    """In place, for every parameter named in ``anchor_state`` (e.g. a `Clip.trainable_state` snapshot):
    ``θ ← (1 − α)·anchor + α·θ``. ``α = 1`` leaves the model unchanged, ``α = 0`` restores the anchor. The anchor is
    only read, so it can be used again after every task. Parameters not in the anchor are left alone.
    BatchNorm running statistics in the anchor (a trainable BatchNorm's, see `Clip.trainable_state`) are blended
    the same way, as the WiSE-FT reference interpolates every ``state_dict`` entry; the integer batch counter keeps
    the fine-tuned count."""
    alpha = check_alpha(alpha)
    if alpha is None:
        raise ValueError("interpolate_ needs an alpha in [0, 1]")
    params = model.state_tensors()
    unknown = sorted(set(anchor_state) - set(params))
    if unknown:
        raise KeyError(f"anchor has parameters the model lacks: {unknown[:5]}")
    for name, a in anchor_state.items():
        p = params[name]
        if a.shape != p.shape:
            raise ValueError(f"anchor {name!r} has shape {tuple(a.shape)}, the model's is {tuple(p.shape)}")
        if not p.is_floating_point():  # num_batches_tracked
            continue
        # θ + (1 − α)(a − θ) = (1 − α)·a + α·θ; in place, so the text-head cache sees the version bump.
        p.lerp_(a.to(device=p.device, dtype=p.dtype), 1.0 - alpha)
