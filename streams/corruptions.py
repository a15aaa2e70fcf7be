"""Batched image corruptions at severities 1-5 (ImageNet-C / CIFAR-10-C style, scaled for 32 px).

``corrupt(images, name, severity, generator)`` takes float images [B, 3, H, W] in [0, 1] on any device
and returns a tensor of the same shape, clamped to [0, 1]. Random corruptions draw only from the given
``torch.Generator`` (which must live on the images' device), so a seed fixes the result. Severity
parameters start from Hendrycks & Dietterich's CIFAR-10-C / ImageNet-C values and were strengthened
where those barely move the micro-CLIP (crisp synthetic shapes survive mild noise, blur and JPEG): they
were calibrated so that severity 5 costs the micro-CLIP at least ~15 points of 100-way zero-shot accuracy
(see streams/WORLD_RESULTS.md). The colour shift is ours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness, adjust_hue, adjust_saturation, jpeg_codec_differentiable
from kornia.filters import gaussian_blur2d, motion_blur
from torch import Tensor

# name -> the five severity parameters
_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.06, 0.10, 0.14, 0.19, 0.24),   # sigma (CIFAR-10-C: 0.04..0.10, too mild here)
    "shot_noise": (60, 25, 12, 5, 3),                   # photons per unit intensity (ImageNet-C values)
    "impulse_noise": (0.02, 0.04, 0.07, 0.10, 0.14),    # salt-and-pepper fraction
    "gaussian_blur": (0.4, 0.7, 1.0, 1.3, 1.6),         # sigma in pixels
    "motion_blur": (5, 7, 9, 13, 17),                   # kernel length in pixels (odd)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),            # contrast factor around the image mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),          # added to the value channel
    "pixelate": (0.625, 0.44, 0.345, 0.28, 0.22),      # resolution kept: 20/14/11/9/7 px of 32 (CIFAR-C is too mild here)
    "jpeg": (40, 25, 15, 8, 4),                         # JPEG quality
    "colour_shift": (0.1, 0.2, 0.3, 0.4, 0.5),          # hue rotation (x pi/2 rad) and desaturation
}
CORRUPTIONS: tuple[str, ...] = tuple(_PARAMS)


def _check(images: Tensor, name: str, severity: int) -> None:
    if name not in _PARAMS:
        raise ValueError(f"unknown corruption {name!r}; known: {CORRUPTIONS}")
    if not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be float [B, 3, H, W], got {tuple(images.shape)} {images.dtype}")


def corrupt(images: Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to float images in [0, 1]; returns a new tensor."""
    _check(images, name, severity)
    x, p, g = images, _PARAMS[name][severity - 1], generator
    if name == "gaussian_noise":
        out = x + p * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    elif name == "shot_noise":
        out = torch.poisson(x.clamp(0, 1) * p, generator=g) / p
    elif name == "impulse_noise":
        u = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
        out = torch.where(u < p / 2, torch.zeros_like(x), torch.where(u > 1 - p / 2, torch.ones_like(x), x))
    elif name == "gaussian_blur":
        k = 2 * int(3 * p + 0.5) + 1
        out = gaussian_blur2d(x, (k, k), (p, p), border_type="reflect")
    elif name == "motion_blur":
        angle = torch.rand(x.shape[0], generator=g, device=x.device) * 180.0 - 90.0
        out = motion_blur(x, int(p), angle.to(x.dtype), torch.zeros_like(angle, dtype=x.dtype),
                          border_type="reflect")
    elif name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        out = (x - mean) * p + mean
    elif name == "brightness":
        out = adjust_brightness(x, p)  # additive, like the value-channel shift of ImageNet-C
    elif name == "pixelate":
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(max(1, round(h * p)), max(1, round(w * p))), mode="area")
        out = F.interpolate(small, size=(h, w), mode="nearest")
    elif name == "jpeg":
        quality = torch.full((x.shape[0],), float(p), device=x.device, dtype=x.dtype)
        out = _jpeg(x, quality)
    else:  # colour_shift: a global hue rotation plus desaturation, the same for every image
        out = adjust_saturation(adjust_hue(x, p * torch.pi / 2), 1.0 - p)
    return out.clamp(0, 1)


def _jpeg(x: Tensor, quality: Tensor) -> Tensor:
    # kornia's codec needs H and W divisible by 16; pad by replication and crop back.
    h, w = x.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    padded = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
    return jpeg_codec_differentiable(padded, quality)[..., :h, :w]
