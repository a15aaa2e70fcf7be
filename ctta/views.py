"""Test-time augmented views, batched on the model's device with kornia (TPT, C-TPT, TDA).

`tpt_views` returns, per image, view 0 = the eval view (the image itself at model resolution: resize + centre crop
when it is not already that size) followed by ``n_views`` random views. As in TPT (azshue/TPT
``data/datautils.py::AugMixAugmenter``) each random view is a random resized crop (torchvision's sampling rule,
scale (0.08, 1), ratio (3/4, 4/3)) plus a horizontal flip with probability 1/2; crop, flip and resize of all
``B · n_views`` views are ONE ``kornia.geometry.transform.crop_and_resize`` call (the flip is a mirrored box).
``augmix=True`` adds TPT's AugMix (``data/augmix_ops.py`` at severity 1, see `augmix`).

The random views are cropped from ``images`` as given: the whole photograph when the stream keeps it
(``source_side`` of `streams.images.ImageFiles`, on in the ImageNet test-time recipes), as the reference augmenter
crops from the photograph; an eval crop otherwise (then the views come from that square).

Random parameters are drawn from ``generator`` on the generator's device (CPU by default) and moved to the
images' device, so one seed gives the same views on any device. Deviations from the PIL reference: bilinear
resampling without antialiasing for crops, rotations, shears and translations (PIL: bilinear with antialias for
the crop; nearest for shear/translate); pixel ops on float images instead of uint8.
"""
from __future__ import annotations

import math
from typing import Any

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from ctta.data import check_images

AUGMIX_OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
              "translate_y")  # TPT's list: AugMix's ops without the colour ops that overlap ImageNet-C
_GEOMETRIC = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=dev)


def eval_view(images: Tensor, size: int) -> Tensor:
    """The model's eval input: resize the shorter side to ``size`` (bicubic, antialiased) + centre crop."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size].clamp(0, 1)


MAX_ASPECT = 4  # a source's longer side is at most this many times ``side`` (a thin strip would stay huge)


def check_source_side(side: Any, image_size: int) -> int:
    """``side`` for `shrink_to`, refused in words unless an integer >= the model's ``image_size``."""
    if isinstance(side, bool) or not isinstance(side, int) or side < image_size:
        raise ValueError(f"source_side must be an integer >= the model's image size ({image_size}), got {side!r}")
    return side


def shrink_to(images: Tensor, side: int) -> Tensor:
    """The whole image, aspect kept, resized (bicubic, antialiased) so that its shorter side is ``side`` when it is
    longer than that, and its longer side at most ``MAX_ASPECT * side`` (a strip shrinks further); other images are
    returned as they are. The source the random views are cropped from."""
    h, w = images.shape[-2:]
    by_short, by_long = side / min(h, w), MAX_ASPECT * side / max(h, w)
    if min(by_short, by_long) >= 1:
        return images
    if by_short <= by_long:  # the shorter side becomes exactly ``side`` (rounding never takes it below)
        size = (max(side, round(h * by_short)), max(side, round(w * by_short)))
    else:
        size = (max(1, round(h * by_long)), max(1, round(w * by_long)))
    x = F.interpolate(images if images.dim() == 4 else images[None], size=size, mode="bicubic", antialias=True,
                      align_corners=False)
    return (x if images.dim() == 4 else x[0]).clamp_(0, 1)


def crop_params(n: int, height: int, width: int, generator: torch.Generator | None = None,
                scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                trials: int = 10) -> Tensor:
    """``n`` crops ``(top, left, h, w)`` by torchvision's ``RandomResizedCrop.get_params`` rule, vectorised: up to
    10 (area, log-ratio) trials per crop, the first that fits wins, else a centre crop clamped to ``ratio``."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * _rand((n, trials), generator))
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * _rand((n, trials), generator))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(1)
    rows = torch.arange(n, device=w.device)
    w, h, found = w[rows, first], h[rows, first], ok.any(1)
    # fallback: centre crop with the aspect ratio clamped into the allowed range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    u = _rand((n, 2), generator)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), torch.full_like(h, (height - fh) // 2))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), torch.full_like(w, (width - fw) // 2))
    return torch.stack([top, left, h, w], 1)


def random_resized_crops(images: Tensor, n_views: int, size: int, generator: torch.Generator | None = None, *,
                         scale: tuple[float, float] = (0.08, 1.0), flip: bool = True) -> Tensor:
    """``[B, n_views, 3, size, size]``: random resized crops (+ horizontal flips) of each image, one kornia call."""
    b, _, height, width = images.shape
    p = crop_params(b * n_views, height, width, generator, scale).to(images.device, images.dtype)
    top, left, h, w = p.unbind(1)
    # continuous box edges chosen so that kornia's align_corners=True sampling puts output pixel k at input
    # position left - 0.5 + (k + 0.5)·w/size: torchvision's (align_corners=False) resize of the integer crop
    x1, x2 = left - 0.5 + 0.5 * w / size, left + w - 0.5 - 0.5 * w / size
    y1, y2 = top - 0.5 + 0.5 * h / size, top + h - 0.5 - 0.5 * h / size
    if flip:  # a mirrored box flips the crop inside the same warp
        f = (_rand((b * n_views,), generator) < 0.5).to(images.device)
        x1, x2 = torch.where(f, x2, x1), torch.where(f, x1, x2)
    boxes = torch.stack([torch.stack([x1, y1], -1), torch.stack([x2, y1], -1),
                         torch.stack([x2, y2], -1), torch.stack([x1, y2], -1)], 1)
    src = images.repeat_interleave(n_views, dim=0)
    out = kornia.geometry.transform.crop_and_resize(src, boxes, (size, size), mode="bilinear",
                                                    padding_mode="border", align_corners=True)
    return out.clamp_(0, 1).view(b, n_views, 3, size, size)


def _autocontrast(x: Tensor) -> Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)


def _affine_inverse_maps(ops: list[str], u: list[float], sign: list[float], size: int,
                         device: torch.device) -> Tensor:
    """3×3 maps from output to input pixel coordinates for the geometric ops (PIL's ``transform`` convention).
    ``u`` (levels) and ``sign`` are Python floats: the maps are built in Python and become one tensor."""
    c = (size - 1) / 2
    maps = []
    for op, lv, s in zip(ops, u, sign):
        a = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        if op == "rotate":  # int(level·30/10) degrees about the centre, random direction
            t = math.radians(int(lv * 3) * s)
            cos, sin = math.cos(t), math.sin(t)
            a[0], a[1] = [cos, -sin, c - cos * c + sin * c], [sin, cos, c - sin * c - cos * c]
        elif op == "shear_x":  # level·0.3/10
            a[0][1] = lv * 0.03 * s
        elif op == "shear_y":
            a[1][0] = lv * 0.03 * s
        elif op == "translate_x":  # int(level·(size/3)/10) pixels
            a[0][2] = int(lv * size / 30) * s
        elif op == "translate_y":
            a[1][2] = int(lv * size / 30) * s
        maps.append(a)
    return torch.tensor(maps, dtype=torch.float32, device=device)


def _warp(images: Tensor, inv: Tensor) -> Tensor:
    """Bilinear warp with zero padding of ``images [N, C, S, S]`` by the output→input pixel maps ``inv [N, 3, 3]``:
    ``kornia.geometry.transform.warp_affine`` (align_corners=True) of the inverse maps, without inverting twice:
    the pixel map is conjugated into normalised coordinates (pixel centres 0 and S − 1 at −1 and +1), its grid
    built by broadcasting, and the images sampled in one ``grid_sample``."""
    size = images.shape[-1]
    to_norm = inv.new_tensor([[2 / (size - 1), 0.0, -1.0], [0.0, 2 / (size - 1), -1.0], [0.0, 0.0, 1.0]])
    from_norm = inv.new_tensor([[(size - 1) / 2, 0.0, (size - 1) / 2], [0.0, (size - 1) / 2, (size - 1) / 2],
                                [0.0, 0.0, 1.0]])
    t = (to_norm @ inv @ from_norm)[:, :2].transpose(1, 2)[:, :, None, None, :].to(images.dtype)  # [N, 3, 1, 1, 2]
    c = torch.linspace(-1, 1, size, device=images.device, dtype=images.dtype)
    # the grid [N, S, S, 2] by broadcasting: affine_grid's batched matmul with a 3-wide inner dimension is slower
    grid = t[:, 0] * c.view(1, 1, size, 1) + t[:, 1] * c.view(1, size, 1, 1) + t[:, 2]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _apply_ops(x: Tensor, ops: list[str | None], u: list[float], sign: list[float], *,
               inplace: bool = False) -> Tensor:
    """One AugMix step: image k gets ``ops[k]`` (None = unchanged; levels ``u`` and signs as Python floats); each op
    is one batched call on its subset. ``inplace`` writes into ``x`` (the caller owns it) instead of a copy."""
    out = x if inplace else x.clone()
    size = x.shape[-1]
    groups: dict[str, list[int]] = {}
    for k, op in enumerate(ops):
        if op is not None:
            groups.setdefault("geometric" if op in _GEOMETRIC else op, []).append(k)
    for name, idx_list in groups.items():
        idx = torch.tensor(idx_list, device=x.device)
        sub = x[idx]
        if name == "autocontrast":
            sub = _autocontrast(sub)
        elif name == "equalize":
            sub = kornia.enhance.equalize(sub)
        elif name == "posterize":  # 4 − int(level·4/10) = 4 bits at severity 1: keep the top 4 of 8 bits
            sub = ((sub * 255).to(torch.uint8) & 0xF0).to(sub.dtype) / 255  # = kornia.enhance.posterize(sub, 4)
        elif name == "solarize":  # threshold 256 − int(level·256/10) on the 0..255 scale
            thr = torch.tensor([(256 - int(u[k] * 25.6)) / 255.0 for k in idx_list], device=x.device)
            sub = torch.where(sub >= thr.view(-1, 1, 1, 1), 1.0 - sub, sub)
        else:
            inv = _affine_inverse_maps([ops[k] for k in idx_list], [u[k] for k in idx_list],
                                       [sign[k] for k in idx_list], size, x.device)
            sub = _warp(sub, inv)
        out[idx] = sub
    return out


def augmix(views: Tensor, generator: torch.Generator | None = None, width: int = 3, max_depth: int = 3) -> Tensor:
    """TPT's AugMix on crops ``[N, 3, S, S]``: per view, ``w ~ Dirichlet(1, …, 1)`` over ``width`` chains, each
    chain 1–``max_depth`` ops drawn uniformly from `AUGMIX_OPS` at severity 1 (level ~ U(0.1, 1)), ``m ~ Beta(1, 1)``;
    result ``m · view + (1 − m) · Σ_i w_i · chain_i`` (mixing in [0, 1] equals TPT's mixing after normalisation,
    because the normalisation is affine and the weights sum to one). Dirichlet(1) is drawn as normalised
    exponentials and Beta(1, 1) as a uniform, so only ``generator`` is used."""
    n = views.shape[0]
    e = -torch.log(_rand((n, width), generator).clamp_min(1e-12))
    wts = (e / e.sum(1, keepdim=True)).to(views.device, views.dtype)
    m = _rand((n,), generator).to(views.device, views.dtype)
    depth = 1 + (_rand((width * n,), generator) * max_depth).long().clamp_max(max_depth - 1)
    op_idx = (_rand((max_depth, width * n), generator) * len(AUGMIX_OPS)).long().clamp_max(len(AUGMIX_OPS) - 1)
    level = 0.1 + 0.9 * _rand((max_depth, width * n), generator)
    sign = torch.where(_rand((max_depth, width * n), generator) < 0.5, -1.0, 1.0)
    chains = views.repeat(width, 1, 1, 1)  # chain i of view k sits at row i·n + k
    # the draws as Python lists once: per-element tensor indexing cost more than the image ops themselves
    depth_l, op_l, level_l, sign_l = depth.tolist(), op_idx.tolist(), level.tolist(), sign.tolist()
    for d in range(max_depth):
        ops = [AUGMIX_OPS[o] if d < dp else None for o, dp in zip(op_l[d], depth_l)]
        chains = _apply_ops(chains, ops, level_l[d], sign_l[d], inplace=True)  # chains is ours: no copy
    mix = (chains.view(width, n, *views.shape[1:]) * wts.t().reshape(width, n, 1, 1, 1)).sum(0)
    mm = m.view(n, 1, 1, 1)
    return (mm * views + (1 - mm) * mix).clamp_(0, 1)


def tpt_views(images: Tensor, size: int, n_views: int = 63, *, augmix_views: bool = False,
              generator: torch.Generator | None = None, scale: tuple[float, float] = (0.08, 1.0)) -> Tensor:
    """``[B, 1 + n_views, 3, size, size]`` in [0, 1]: view 0 = `eval_view`, then random resized crops + flips
    (+ AugMix with ``augmix_views``)."""
    check_images(images)
    if n_views < 0:
        raise ValueError(f"n_views must be >= 0, got {n_views}")
    b = images.shape[0]
    first = eval_view(images, size)[:, None]
    if n_views == 0:
        return first
    crops = random_resized_crops(images, n_views, size, generator, scale=scale)
    if augmix_views:
        crops = augmix(crops.flatten(0, 1), generator).view(b, n_views, 3, size, size)
    return torch.cat([first, crops], dim=1)
