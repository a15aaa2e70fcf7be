"""The built-in synthetic world: captioned 32x32 RGB images rendered procedurally.

Every image is one coloured shape on a background. Factors: ``shape`` (10 kinds), ``colour`` (10),
and the nuisances ``size`` (3), position, rotation, ``background`` (4 kinds) and rendering ``style``
(filled / outline / textured). Rendering is a batched signed-distance-field evaluation in torch: one
pass per shape kind over all images of that kind, never a Python loop per image, on any device.

Determinism: all randomness is drawn in :func:`sample_factors` (and :func:`caption`) from an
explicitly seeded ``torch.Generator``; :func:`render` is a pure function of the factors. The same seed
gives the same images on any machine (CPU generator; small float differences across devices aside).

``HELD_OUT`` is the fixed part of the colour x shape grid (20 combos, 2 per colour and 2 per shape)
that the micro-CLIP never saw in pre-training, so zero-shot accuracy on it measures composition.
The micro-CLIP was also pre-trained without the "textured" style (a new domain for the
domain-incremental stream) and without any corruption (see ``streams/corruptions.py``).

Example::

    g = torch.Generator().manual_seed(0)
    f = sample_factors(256, g, exclude_combos=HELD_OUT)
    images = render(f)                  # [256, 3, 32, 32] float in [0, 1]
    texts = caption(f, g)               # ["a small red star on a striped background", ...]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

WORLD_VERSION = "2"  # bump whenever rendering or sampling changes the pixels for a given seed
RESOLUTION = 32  # the model's input size; scenes are defined on this grid (stripe, texture and outline widths)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart",
                           "cross", "diamond", "hexagon", "ring", "crescent")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange",
                            "purple", "pink", "cyan", "brown", "white")
SIZES: tuple[str, ...] = ("small", "medium", "large")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "noise")
STYLES: tuple[str, ...] = ("filled", "outline", "textured")

# sRGB values in [0, 1]; chosen to stay distinct under the colour jitter below.
_RGB = torch.tensor([
    (0.90, 0.10, 0.10), (0.10, 0.75, 0.15), (0.15, 0.30, 0.95), (0.95, 0.90, 0.10),
    (1.00, 0.55, 0.00), (0.55, 0.15, 0.80), (1.00, 0.50, 0.75), (0.10, 0.90, 0.90),
    (0.55, 0.33, 0.12), (0.95, 0.95, 0.95)])
_RADIUS = (0.45, 0.60, 0.78)  # object radius per size, in units of half the image width

# (colour, shape) pairs never rendered in pre-training: a cyclic Latin pattern, 2 per colour and shape.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (COLOURS[c], SHAPES[(3 * c + k) % 10]) for c in range(10) for k in (0, 5))

_NOISE_RES = 8  # the noise background is an 8x8 field upsampled bilinearly


@dataclass
class Factors:
    """Factors of N images (all tensors have leading dimension N and live on one device)."""

    shape: Tensor       # [N] long, index into SHAPES
    colour: Tensor      # [N] long, index into COLOURS
    size: Tensor        # [N] long, index into SIZES
    background: Tensor  # [N] long, index into BACKGROUNDS
    style: Tensor       # [N] long, index into STYLES
    center: Tensor      # [N, 2] float, object centre in [-1, 1] (x, y)
    rotation: Tensor    # [N] float, radians
    scale: Tensor       # [N] float, multiplicative size jitter around the size's radius
    tint: Tensor        # [N, 3] float, multiplicative colour jitter
    bg_colours: Tensor  # [N, 2, 3] float, the background's two tones
    bg_angle: Tensor    # [N] float, direction of gradient / stripes
    bg_period: Tensor   # [N] float, stripe period in pixels
    bg_noise: Tensor    # [N, 8, 8] float in [0, 1], the noise background's field
    texture: Tensor     # [N, 2] float, (angle, period in pixels) of the textured style's pattern

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    def __getitem__(self, index: Tensor | slice) -> "Factors":
        return Factors(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> "Factors":
        return Factors(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def cat(parts: Sequence["Factors"]) -> "Factors":
        return Factors(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Factors)})

    def combo_index(self) -> Tensor:
        """Class index ``colour * len(SHAPES) + shape`` of the 100-way colour x shape task."""
        return self.colour * len(SHAPES) + self.shape


def _indices(names: Iterable[str] | None, vocab: tuple[str, ...], what: str) -> list[int]:
    if names is None:
        return list(range(len(vocab)))
    if isinstance(names, str):
        raise TypeError(f"{what} must be a collection of names, not the string {names!r}")
    out = []
    for n in names:
        if n not in vocab:
            raise ValueError(f"unknown {what[:-1] if what.endswith('s') else what} {n!r}; known: {vocab}")
        out.append(vocab.index(n))
    if not out:
        raise ValueError(f"{what}: empty selection")
    return sorted(set(out))


def _combos(combos: Iterable[tuple[str, str]] | None, name: str) -> set[tuple[int, int]]:
    out = set()
    if isinstance(combos, str):
        raise TypeError(f"{name} must be a collection of (colour, shape) pairs, not a string")
    for pair in combos or ():
        if isinstance(pair, str) or len(pair) != 2:
            raise TypeError(f"{name} must hold (colour, shape) pairs, got {pair!r}")
        c, s = pair
        out.add((_indices([c], COLOURS, "colours")[0], _indices([s], SHAPES, "shapes")[0]))
    return out


def _pick(n: int, choices: list[int], g: torch.Generator) -> Tensor:
    return torch.tensor(choices)[torch.randint(len(choices), (n,), generator=g)]


def sample_factors(n: int, generator: torch.Generator, *,
                   shapes: Iterable[str] | None = None, colours: Iterable[str] | None = None,
                   combos: Iterable[tuple[str, str]] | None = None,
                   exclude_combos: Iterable[tuple[str, str]] | None = None,
                   sizes: Iterable[str] | None = None, backgrounds: Iterable[str] | None = None,
                   styles: Iterable[str] | None = None) -> Factors:
    """Sample the factors of ``n`` images uniformly from the allowed values.

    ``shapes``/``colours``/``sizes``/``backgrounds``/``styles`` restrict a factor to the given names;
    ``combos`` lists the allowed (colour, shape) pairs (sampled uniformly over pairs, after the shape and
    colour restrictions) and ``exclude_combos`` removes pairs (e.g. ``HELD_OUT`` for pre-training).
    Tensors are on the generator's device.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    dev = generator.device
    s_ok, c_ok = _indices(shapes, SHAPES, "shapes"), _indices(colours, COLOURS, "colours")
    allowed = {(c, s) for c in c_ok for s in s_ok}
    if combos is not None:
        allowed &= _combos(combos, "combos")
    allowed -= _combos(exclude_combos, "exclude_combos")
    if not allowed:
        raise ValueError("no (colour, shape) combination is left after the restrictions")
    pairs = torch.tensor(sorted(allowed))[torch.randint(len(allowed), (n,), generator=generator)]
    size = _pick(n, _indices(sizes, SIZES, "sizes"), generator)
    background = _pick(n, _indices(backgrounds, BACKGROUNDS, "backgrounds"), generator)
    style = _pick(n, _indices(styles, STYLES, "styles"), generator)

    def u(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    scale = u(n, lo=0.9, hi=1.1)
    radius = torch.tensor(_RADIUS)[size] * scale
    center = (u(n, 2, lo=-1.0, hi=1.0) * (0.95 - radius).clamp(min=0.0)[:, None])  # keep it in frame
    # Background: two dark, weakly tinted tones, so every object colour (white included) stands out.
    # One tone is darker than 0.18 and the other lighter than 0.30 (in random order): the gap keeps
    # gradient / stripes / noise visible (world version 1 let both tones coincide, which made those
    # backgrounds look plain and the background control task unlearnable).
    tones = torch.stack([u(n, lo=0.03, hi=0.18), u(n, lo=0.30, hi=0.45)], 1)
    swap = torch.rand(n, generator=generator) < 0.5
    grey = torch.where(swap[:, None], tones.flip(1), tones)[:, :, None]
    bg_colours = (grey + u(n, 2, 3, lo=-0.05, hi=0.05)).clamp(0, 1)
    texture = torch.stack([u(n, hi=math.pi), u(n, lo=3.0, hi=5.0)], 1)
    f = Factors(shape=pairs[:, 1], colour=pairs[:, 0], size=size, background=background, style=style,
                center=center, rotation=u(n, lo=-math.pi, hi=math.pi), scale=scale,
                tint=u(n, 3, lo=0.9, hi=1.1), bg_colours=bg_colours, bg_angle=u(n, hi=2 * math.pi),
                bg_period=u(n, lo=4.0, hi=8.0), bg_noise=u(n, _NOISE_RES, _NOISE_RES), texture=texture)
    return f.to(dev)


# ----------------------------------------------------------------------------------------------
# Signed distance functions (negative inside). p: [..., 2] in object units (radius ~1).
# Formulas after Inigo Quilez, https://iquilezles.org/articles/distfunctions2d/


def _sd_star(p: Tensor, r: float, n: int, m: float) -> Tensor:
    """Regular star with n tips (m = 2 gives the regular n-gon), circumradius r."""
    an, en = math.pi / n, math.pi / m
    acs, ecs = (math.cos(an), math.sin(an)), (math.cos(en), math.sin(en))
    bn = torch.remainder(torch.atan2(p[..., 0], p[..., 1]), 2 * an) - an
    length = p.norm(dim=-1)
    qx, qy = length * torch.cos(bn) - r * acs[0], length * torch.sin(bn).abs() - r * acs[1]
    t = (-(qx * ecs[0] + qy * ecs[1])).clamp(0.0, r * acs[1] / ecs[1])
    qx, qy = qx + ecs[0] * t, qy + ecs[1] * t
    return torch.sqrt(qx * qx + qy * qy) * torch.sign(qx)


def _sd_box(p: Tensor, bx: float, by: float) -> Tensor:
    dx, dy = p[..., 0].abs() - bx, p[..., 1].abs() - by
    return torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2) + torch.maximum(dx, dy).clamp(max=0)


def _sd_rhombus(p: Tensor, bx: float, by: float) -> Tensor:
    px, py = p[..., 0].abs(), p[..., 1].abs()
    h = (((bx - 2 * px) * bx - (by - 2 * py) * by) / (bx * bx + by * by)).clamp(-1.0, 1.0)
    dx, dy = px - 0.5 * bx * (1 - h), py - 0.5 * by * (1 + h)
    return torch.sqrt(dx * dx + dy * dy) * torch.sign(px * by + py * bx - bx * by)


def _sd_heart(p: Tensor) -> Tensor:
    x, y = p[..., 0].abs() / 1.25, (p[..., 1] + 1.0) / 1.25  # heart spans y in [0, 1.25] before scaling
    lobe = torch.sqrt((x - 0.25) ** 2 + (y - 0.75) ** 2) - math.sqrt(2.0) / 4.0
    s = (x + y).clamp(min=0) * 0.5
    body = torch.sqrt(torch.minimum(x ** 2 + (y - 1.0) ** 2, (x - s) ** 2 + (y - s) ** 2)) * torch.sign(x - y)
    return torch.where(x + y > 1.0, lobe, body) * 1.25


def _sd_shape(kind: int, p: Tensor) -> Tensor:
    name = SHAPES[kind]
    if name == "circle":
        return p.norm(dim=-1) - 0.9
    if name == "square":
        return _sd_box(p, 0.72, 0.72)
    if name == "triangle":
        return _sd_star(p + p.new_tensor([0.0, 0.2]), 1.15, 3, 2.0)
    if name == "star":
        return _sd_star(p, 1.05, 5, 3.2)
    if name == "heart":
        return _sd_heart(p * p.new_tensor([1.0, -1.0]) * 1.1 + p.new_tensor([0.0, 0.35]))
    if name == "cross":
        return torch.minimum(_sd_box(p, 0.95, 0.3), _sd_box(p, 0.3, 0.95))
    if name == "diamond":
        return _sd_rhombus(p, 0.6, 1.0)
    if name == "hexagon":
        return _sd_star(p, 0.95, 6, 2.0)
    if name == "ring":
        return (p.norm(dim=-1) - 0.68).abs() - 0.27
    if name == "crescent":
        outer = p.norm(dim=-1) - 0.95
        inner = (p - p.new_tensor([0.5, 0.0])).norm(dim=-1) - 0.8
        return torch.maximum(outer, -inner)
    raise AssertionError(name)


def _grid(device: torch.device, resolution: int = RESOLUTION) -> Tensor:
    """Pixel centres in [-1, 1], y down: [H, W, 2] (x, y)."""
    c = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x, y], -1)


def _background(f: Factors, xy: Tensor) -> Tensor:
    c0, c1 = f.bg_colours[:, 0, :, None, None], f.bg_colours[:, 1, :, None, None]  # [N, 3, 1, 1]
    direction = torch.stack([torch.cos(f.bg_angle), torch.sin(f.bg_angle)], -1)   # [N, 2]
    proj = torch.einsum("hwk,nk->nhw", xy, direction)[:, None]                    # [N, 1, H, W] in ~[-1.4, 1.4]
    gradient = ((proj / 1.42 + 1) / 2).clamp(0, 1)
    stripes = (torch.sin(proj * (RESOLUTION / 2) * 2 * math.pi / f.bg_period[:, None, None, None]) * 3).sigmoid()
    noise = F.interpolate(f.bg_noise[:, None], size=xy.shape[:2], mode="bilinear",
                          align_corners=False)
    kind = f.background[:, None, None, None]
    mix = torch.where(kind == 1, gradient, torch.where(kind == 2, stripes, torch.where(
        kind == 3, noise, torch.zeros_like(noise))))
    return c0 + (c1 - c0) * mix


def render(factors: Factors, resolution: int = RESOLUTION) -> Tensor:
    """Render images from factors: float tensor [N, 3, R, R] in [0, 1] on the factors' device, R = ``resolution``.

    The scene does not depend on ``resolution``: stripe periods, texture periods and outline widths are defined on
    the 32-pixel grid, and only the sampling (pixel centres, 1-pixel anti-aliasing) follows R. A render above 32
    pixels is the same picture with more source pixels, as a photograph holds more than the model's input: views
    cropped from it (TPT-style random resized crops) are upsampled less. At R = 32 the pixels are unchanged."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
    f = factors
    dev = f.shape.device
    n = len(f)
    xy = _grid(dev, resolution)
    if n == 0:
        return torch.zeros(0, 3, resolution, resolution, device=dev)
    radius = torch.tensor(_RADIUS, device=dev)[f.size] * f.scale                          # [N]
    cos, sin = torch.cos(f.rotation), torch.sin(f.rotation)
    d = xy[None] - f.center[:, None, None, :]                                              # [N, H, W, 2]
    local = torch.stack([cos[:, None, None] * d[..., 0] + sin[:, None, None] * d[..., 1],
                         -sin[:, None, None] * d[..., 0] + cos[:, None, None] * d[..., 1]], -1)
    local = local / radius[:, None, None, None]
    sdf = torch.empty(n, resolution, resolution, device=dev)
    for k in range(len(SHAPES)):  # one batched pass per shape kind
        idx = (f.shape == k).nonzero().squeeze(1)
        if idx.numel():
            sdf[idx] = _sd_shape(k, local[idx])
    sdf = sdf * radius[:, None, None]                                                      # back to image units
    pixel, unit = 2.0 / resolution, 2.0 / RESOLUTION  # the render's pixel; the scene's (32-grid) pixel
    outline = f.style[:, None, None] == 1
    sdf = torch.where(outline, sdf.abs() - 0.6 * unit * (1 + f.size[:, None, None] * 0.35), sdf)
    alpha = (0.5 - sdf / pixel).clamp(0, 1)[:, None]                                      # 1-px anti-aliasing
    colour = (_RGB.to(dev)[f.colour] * f.tint).clamp(0, 1)[:, :, None, None]              # [N, 3, 1, 1]
    ta, tp = f.texture[:, 0], f.texture[:, 1]
    u = torch.einsum("hwk,nk->nhw", xy, torch.stack([torch.cos(ta), torch.sin(ta)], -1))
    v = torch.einsum("hwk,nk->nhw", xy, torch.stack([-torch.sin(ta), torch.cos(ta)], -1))
    phase = (RESOLUTION / 2) * 2 * math.pi / tp[:, None, None]
    checker = ((torch.sin(u * phase) * torch.sin(v * phase)) * 4).sigmoid()[:, None]       # soft checkerboard
    textured = f.style[:, None, None, None] == 2
    fill = torch.where(textured, colour * (0.35 + 0.65 * checker), colour)
    return (_background(f, xy) * (1 - alpha) + fill * alpha).clamp(0, 1)


def to_uint8(images: Tensor) -> Tensor:
    """Quantise [0, 1] float images to uint8 (for compact storage)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Captions

_BG_PHRASE = ("on a plain background", "on a gradient background", "on a striped background",
              "on a noisy background")
_WRAPPERS = ("{}", "a photo of {}", "a picture of {}", "an image of {}", "a drawing of {}", "there is {}")
# Probability that a caption names each factor: shape, colour, size, background, style.
_MENTION_P = (0.85, 0.85, 0.4, 0.35, 0.3)
MENTIONED = ("shape", "colour", "size", "background", "style")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(shape: int | None = None, colour: int | None = None, size: int | None = None,
           background: int | None = None, style: int | None = None) -> str:
    """The noun phrase naming the given factor indices (None = unnamed), e.g. 'a small red star'."""
    noun = SHAPES[shape] if shape is not None else "shape"
    adjectives = [SIZES[size]] if size is not None else []
    if colour is not None:
        adjectives.append(COLOURS[colour])
    if style == 0:
        adjectives.insert(0, "filled")
    if style == 2:
        adjectives.insert(0, "textured")
    body = " ".join(adjectives + [noun])
    text = f"an outline of {_article(body)} {body}" if style == 1 else f"{_article(body)} {body}"
    if background is not None:
        text += " " + _BG_PHRASE[background]
    return text


def describe(factors: Factors, generator: torch.Generator,
             mention_p: Sequence[float] | None = None) -> tuple[list[str], Tensor]:
    """Random template captions and what they name (``mention_p``: the probability of naming each factor of
    ``MENTIONED``; default ``_MENTION_P``).

    Returns ``(texts, mentions)`` where ``mentions`` is a [N, 5] long tensor (CPU) holding, for the
    factors in ``MENTIONED`` order, the index a caption names or -1 where it leaves the factor unnamed.
    A caption is true of every image whose factors equal all of its non-negative entries.
    """
    g = generator
    n = len(factors)
    values = torch.stack([factors.shape, factors.colour, factors.size, factors.background,
                          factors.style], 1).cpu()
    p = torch.tensor(_MENTION_P if mention_p is None else tuple(mention_p), dtype=torch.float32)
    if p.shape != (5,) or not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"mention_p must hold 5 probabilities (for {MENTIONED}), got {mention_p!r}")
    named = torch.rand(n, 5, generator=g).cpu() < p
    none = ~named.any(1)
    named[none, 0] = True  # always say something
    mentions = torch.where(named, values, torch.full_like(values, -1))
    wrap = torch.randint(len(_WRAPPERS), (n,), generator=g).cpu().tolist()
    texts = []
    for row, w in zip(mentions.tolist(), wrap):
        args = [v if v >= 0 else None for v in row]
        texts.append(_WRAPPERS[w].format(phrase(*args)))
    return texts, mentions


def caption(factors: Factors, generator: torch.Generator) -> list[str]:
    """Varied template captions naming some or all factors ("a small red star on a striped background")."""
    return describe(factors, generator)[0]


def matches(mentions: Tensor, factors: Factors) -> Tensor:
    """[T, N] bool: caption t (given its ``mentions`` row) is a true description of image n."""
    values = torch.stack([factors.shape, factors.colour, factors.size, factors.background,
                          factors.style], 1).to(mentions.device)
    ok = (mentions[:, None, :] < 0) | (mentions[:, None, :] == values[None])
    return ok.all(-1)
