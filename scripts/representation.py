"""Representation report of a micro-CLIP on the synthetic world: are image features organised by class?

Test-time cache methods (TDA's positive/negative caches, prototype caches) and TPT's confident-view selection
assume that images of one class lie close together in feature space, also under shift; on the world the class is
the colour x shape combo (100 classes, 20 of them never seen in pre-training). This module measures that
(issue #16):

- ``nn_same_class``: leave-one-out nearest neighbour (cosine) over a balanced image set (``per_class`` images of
  each of the 100 classes, filled + outline styles as the world's test sets): the share whose nearest other image
  has the same class; also the same-colour and same-shape shares (diagnostics);
- ``cos_same_class`` / ``cos_same_colour_other_shape``: mean cosine over pairs of distinct images of one class,
  and over pairs with the same colour and a different shape;
- the same NN rate and the 100-way zero-shot accuracy at severities 1 / 3 / 5, averaged over gaussian noise,
  contrast, motion blur and JPEG (``streams/corruptions.py``, as the shift streams apply them); the NN gallery is
  the corrupted set itself, as a cache filled from the shifted stream would be;
- ``crop_holds_object``: the share of TPT's random resized crops (torchvision's rule, scale (0.08, 1), ratio
  (3/4, 4/3), ``ctta.views.crop_params``) that hold at least half of the object's rendered (anti-aliased) pixel
  mass; ``crop_object_share`` is the mean share of the object's mass inside a crop.

The model enters only through ``encode`` (images in [0, 1] -> L2-normalised features), so the same functions
serve the full report (``eval_micro.py``) and the quick periodic check in ``pretrain_micro.py``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from streams import synthetic as W
from streams.corruptions import corrupt

REPORT_CORRUPTIONS = ("gaussian_noise", "contrast", "motion_blur", "jpeg")
REPORT_SEED = 20261201
STYLES = ("filled", "outline")


def class_balanced_factors(per_class: int, seed: int = REPORT_SEED) -> W.Factors:
    """``per_class`` images of every colour x shape combo (held-out ones included), class-major order."""
    if per_class < 2:
        raise ValueError(f"per_class must be >= 2 for a leave-one-out neighbour, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    return W.Factors.cat([W.sample_factors(per_class, g, combos=[(c, s)], styles=STYLES)
                          for c in W.COLOURS for s in W.SHAPES])


def nearest_other(features: Tensor, chunk: int = 1024) -> Tensor:
    """Index of each row's most similar other row (cosine on L2-normalised ``features [N, D]``: leave-one-out), in
    chunks of rows so that long streams need no N x N matrix."""
    out = []
    for i in range(0, len(features), chunk):
        sim = features[i:i + chunk] @ features.T
        rows = torch.arange(len(sim))
        sim[rows, rows + i] = -float("inf")  # not itself
        out.append(sim.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def nn_rates(features: Tensor, f: W.Factors) -> dict[str, float]:
    """Leave-one-out nearest-neighbour agreement (percent) of class, colour and shape; features L2-normalised."""
    nn = nearest_other(features)
    cls = f.combo_index()
    return {"nn_same_class": 100.0 * (cls[nn] == cls).float().mean().item(),
            "nn_same_colour": 100.0 * (f.colour[nn] == f.colour).float().mean().item(),
            "nn_same_shape": 100.0 * (f.shape[nn] == f.shape).float().mean().item()}


def pair_cosines(features: Tensor, f: W.Factors) -> dict[str, float]:
    """Mean cosine over pairs of distinct images of one class, and of one colour with different shapes."""
    sim = features @ features.T
    same_colour = f.colour[:, None] == f.colour[None]
    same_shape = f.shape[:, None] == f.shape[None]
    distinct = ~torch.eye(len(f), dtype=torch.bool)
    same_style = f.style[:, None] == f.style[None]
    return {"cos_same_class": sim[same_colour & same_shape & distinct].mean().item(),
            "cos_same_colour_other_shape": sim[same_colour & ~same_shape].mean().item(),
            # the sharper pair: one class across styles vs one colour and style across shapes
            "cos_same_class_other_style": sim[same_colour & same_shape & ~same_style].mean().item(),
            "cos_same_colour_style_other_shape": sim[same_colour & same_style & ~same_shape].mean().item()}


def object_mask(f: W.Factors) -> Tensor:
    """[N, H, W] the object's anti-aliased coverage (alpha) as the renderer draws it: the same factors rendered
    white on a black plain background (the textured style covers the filled style's pixels)."""
    g = W.Factors(**{k: getattr(f, k) for k in f.__dataclass_fields__})
    g.colour = torch.full_like(f.colour, W.COLOURS.index("white"))
    g.tint = torch.full_like(f.tint, 2.0)  # white x 2 clamps to 1 in every channel
    g.background = torch.zeros_like(f.background)
    g.bg_colours = torch.zeros_like(f.bg_colours)
    g.style = torch.where(f.style == 2, torch.zeros_like(f.style), f.style)
    return W.render(g)[:, 0]


def crop_coverage(f: W.Factors, views_per_image: int = 16, seed: int = REPORT_SEED,
                  scale: tuple[float, float] = (0.08, 1.0), hold: float = 0.5) -> dict[str, float]:
    """Share (percent) of TPT random resized crops holding >= ``hold`` of the object's pixel mass, and the mean
    share of that mass inside a crop. Crops come from ``ctta.views.crop_params`` (TPT's sampling rule)."""
    from ctta.views import crop_params  # the crops TPT draws at test time

    mask = object_mask(f)
    n, h, w = mask.shape
    g = torch.Generator().manual_seed(seed)
    top, left, ch, cw = crop_params(n * views_per_image, h, w, g, scale).long().unbind(1)
    # mass inside a box from a summed-area table: S[y, x] = sum of mask[:y, :x]
    sat = torch.zeros(n, h + 1, w + 1)
    sat[:, 1:, 1:] = mask.cumsum(1).cumsum(2)
    i = torch.arange(n).repeat_interleave(views_per_image)
    inside = (sat[i, top + ch, left + cw] - sat[i, top, left + cw] - sat[i, top + ch, left] + sat[i, top, left])
    share = inside / sat[i, h, w].clamp_min(1e-6)
    return {"crop_holds_object": 100.0 * (share >= hold).float().mean().item(),
            "crop_object_share": 100.0 * share.mean().item()}


@torch.no_grad()
def representation(encode: Callable[[Tensor], Tensor], combo_head: Tensor, per_class: int = 20,
                   severities: tuple[int, ...] = (1, 3, 5), corruptions: tuple[str, ...] = REPORT_CORRUPTIONS,
                   seed: int = REPORT_SEED, crops: bool = True) -> dict[str, float]:
    """The report as a flat dict (percent, cosines raw). ``encode``: images [B, 3, 32, 32] in [0, 1] ->
    L2-normalised features; ``combo_head``: the 100 normalised text features of "a {colour} {shape}."
    (index colour * 10 + shape). Keys: ``nn_same_class`` etc. on clean images, ``nn_same_class_s{k}`` and
    ``zs100_s{k}`` averaged over ``corruptions`` (and ``..._{name}_s{k}`` per corruption)."""
    f = class_balanced_factors(per_class, seed)
    images = W.render(f)
    labels = f.combo_index()
    feats = encode(images)
    res = nn_rates(feats, f)
    res.update(pair_cosines(feats, f))
    res["zs100"] = 100.0 * ((feats @ combo_head.T).argmax(1) == labels).float().mean().item()
    for s in severities:
        nn_k, zs_k = [], []
        for name in corruptions:
            g = torch.Generator().manual_seed(seed + 100 * s + len(name))
            x = encode(corrupt(images, name, s, g))
            nn_k.append(nn_rates(x, f)["nn_same_class"])
            zs_k.append(100.0 * ((x @ combo_head.T).argmax(1) == labels).float().mean().item())
            res[f"nn_same_class_{name}_s{s}"], res[f"zs100_{name}_s{s}"] = nn_k[-1], zs_k[-1]
        res[f"nn_same_class_s{s}"] = sum(nn_k) / len(nn_k)
        res[f"zs100_s{s}"] = sum(zs_k) / len(zs_k)
    if crops:
        res.update(crop_coverage(f, seed=seed))
    return res


def markdown(res: dict[str, float], per_class: int) -> str:
    """The report as a markdown section for WORLD_RESULTS.md."""
    sev = sorted(int(k.rsplit("_s", 1)[1]) for k in res if k.startswith("nn_same_class_s"))
    lines = ["## Representation: are image features organised by class?", "",
             f"{100 * per_class} images ({per_class} per colour x shape class, all 100 classes incl. the 20 held-out; "
             "filled + outline styles). Nearest neighbour: leave-one-out, cosine, within the same (clean or "
             f"corrupted) set. Corrupted columns average {', '.join(REPORT_CORRUPTIONS)}.", "",
             "| measure | clean | " + " | ".join(f"severity {s}" for s in sev) + " |",
             "|---|---|" + "---|" * len(sev),
             f"| NN same class (%) | {res['nn_same_class']:.1f} | "
             + " | ".join(f"{res[f'nn_same_class_s{s}']:.1f}" for s in sev) + " |",
             f"| 100-way zero-shot (%) | {res['zs100']:.1f} | "
             + " | ".join(f"{res[f'zs100_s{s}']:.1f}" for s in sev) + " |", "",
             f"Clean: NN same colour {res['nn_same_colour']:.1f} %, NN same shape {res['nn_same_shape']:.1f} %; mean "
             f"cosine same class {res['cos_same_class']:.3f} vs same colour, other shape "
             f"{res['cos_same_colour_other_shape']:.3f} (same class, other style "
             f"{res['cos_same_class_other_style']:.3f} vs same colour and style, other shape "
             f"{res['cos_same_colour_style_other_shape']:.3f})."]
    if "crop_holds_object" in res:
        lines += ["", f"TPT's random resized crops (scale 0.08-1, ratio 3/4-4/3): {res['crop_holds_object']:.1f} % hold "
                  f"at least half of the object's pixels; on average a crop holds {res['crop_object_share']:.1f} % of "
                  "them."]
    per = []
    for name in REPORT_CORRUPTIONS:
        if sev and f"nn_same_class_{name}_s{sev[0]}" in res:
            per.append(name + " " + " / ".join(f"{res['nn_same_class_%s_s%d' % (name, s)]:.1f}" for s in sev))
    if per:
        lines += ["", f"NN same class per corruption (severity {' / '.join(map(str, sev))}): " + "; ".join(per) + "."]
    return "\n".join(lines) + "\n"
