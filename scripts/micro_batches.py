"""Batches and losses of the micro-CLIP pre-training (``scripts/pretrain_micro.py``).

Batch composition (``make_batch``: same-colour groups, colour-and-shape groups, groups differing only in shape),
captions and positives (``caption_batch``), CLIP-style augmentation (``augment``), the multi-positive InfoNCE
(``multi_positive_loss``) and the image-image same-class term (``class_contrast_loss``, Khosla et al. 2020,
"Supervised Contrastive Learning", eq. 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from streams import synthetic as W

TRAIN_STYLES = ("filled", "outline")  # "textured" is held out: the domain-incremental stream's new domain


def shape_group(k: int, g: torch.Generator) -> W.Factors:
    """``k`` images that differ only in shape (and the shape's pose): one colour, style, size and background, the
    same background tones and pattern. Within such a group no caption word but the shape's name separates the
    images, so the contrastive loss can only be lowered by seeing shape. Shapes cycle through a random order of
    the colour's seen shapes, so a group holds as many distinct shapes as it can."""
    c = int(torch.randint(len(W.COLOURS), (1,), generator=g))
    shapes = [s for s in W.SHAPES if (W.COLOURS[c], s) not in W.HELD_OUT]
    order = torch.randperm(len(shapes), generator=g).tolist()
    combos = [(W.COLOURS[c], shapes[order[i % len(shapes)]]) for i in range(k)]
    f = W.Factors.cat([W.sample_factors(1, g, combos=[p], styles=TRAIN_STYLES) for p in combos])
    for name in ("size", "background", "style", "bg_colours", "bg_angle", "bg_period", "bg_noise", "tint", "scale"):
        v = getattr(f, name)
        setattr(f, name, v[:1].expand_as(v).clone())
    return f


def make_batch(n: int, g: torch.Generator, hard_frac: float, group: int, combo_frac: float = 0.0,
               shape_frac: float = 0.0) -> W.Factors:
    """n factors; a ``hard_frac`` share of them in groups of ``group`` images sharing one colour, a
    ``combo_frac`` share in groups sharing colour and shape (so that size, background and style must tell them
    apart), and a ``shape_frac`` share in groups differing only in shape (``shape_group``)."""
    n_groups = int(n * hard_frac) // group
    n_combo = int(n * combo_frac) // group
    n_shape = int(n * shape_frac) // group
    parts = [shape_group(group, g) for _ in range(n_shape)]
    for c in torch.randint(len(W.COLOURS), (n_groups,), generator=g).tolist():
        parts.append(W.sample_factors(group, g, colours=[W.COLOURS[c]], exclude_combos=W.HELD_OUT,
                                      styles=TRAIN_STYLES))
    if n_combo:  # (no draw at all otherwise: the shipped recipe's random stream is unchanged)
        seen = sorted(set((c, s) for c in W.COLOURS for s in W.SHAPES) - W.HELD_OUT)
        for k in torch.randint(len(seen), (n_combo,), generator=g).tolist():
            parts.append(W.sample_factors(group, g, combos=[seen[k]], styles=TRAIN_STYLES))
    rest = n - (n_groups + n_combo + n_shape) * group
    if rest < 0:
        raise ValueError(f"hard_frac + combo_frac + shape_frac > 1 (batch {n}, group {group})")
    parts.append(W.sample_factors(rest, g, exclude_combos=W.HELD_OUT, styles=TRAIN_STYLES))
    return W.Factors.cat(parts)


def caption_batch(images: torch.Tensor, f: W.Factors, g: torch.Generator, grey_frac: float, mention_p,
                  solo_frac: float = 0.0) -> tuple:
    """Captions, positives and mentions (``W.describe``'s) for a batch: (images, texts, positives, mentions).

    A ``solo_frac`` share of the captions name exactly one factor (drawn uniformly from ``W.MENTIONED``), e.g. "a
    shape on a striped background": with independent mentions such captions are rare, and without them contrastive
    learning suppresses the factors that rarely decide a match (background stayed at chance in the v2 checkpoint,
    whose text tower mapped every background phrase to the same embedding). A ``grey_frac`` share of the images is
    rendered in greyscale; grey images are never captioned with a colour and never match a caption that names one
    (shape learned apart from colour). Either share at 0 draws nothing from ``g``.
    """
    texts, mentions = W.describe(f, g, mention_p)

    def recaption(idx: torch.Tensor, p: list[float]) -> None:
        t_new, m_new = W.describe(f[idx], g, p)
        for j, i in enumerate(idx.tolist()):
            texts[i] = t_new[j]
        mentions[idx] = m_new

    if solo_frac > 0:
        solo = torch.rand(len(f), generator=g) < solo_frac
        factor = torch.randint(len(W.MENTIONED), (len(f),), generator=g)
        for k in range(len(W.MENTIONED)):
            idx = (solo & (factor == k)).nonzero().flatten()
            if idx.numel():
                recaption(idx, [1.0 if j == k else 0.0 for j in range(len(W.MENTIONED))])
    grey = torch.rand(len(f), generator=g) < grey_frac if grey_frac > 0 else torch.zeros(len(f), dtype=torch.bool)
    if grey.any():
        idx = grey.nonzero().flatten()
        p = list(mention_p or W._MENTION_P)
        p[W.MENTIONED.index("colour")] = 0.0
        recaption(idx, p)
        lum = (images[idx] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        images = images.clone()
        images[idx] = lum.expand(-1, 3, -1, -1)
    positives = W.matches(mentions, f).T  # [images, texts]
    positives[grey[:, None] & (mentions[:, W.MENTIONED.index("colour")] >= 0)[None, :]] = False
    return images, texts, positives, mentions


def augment(images: torch.Tensor, mentions: torch.Tensor, g: torch.Generator, crop_frac: float,
            crop_scale: tuple[float, float], flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-style augmentation on the batch: with ``flip`` every image is flipped horizontally with probability 1/2 (no caption
    names left or right, and every shape's mirror image is the same shape), and a ``crop_frac`` share is replaced
    by a random resized crop (torchvision's sampling rule with ``crop_scale``, ratio (3/4, 4/3), the crops
    ``ctta.views`` draws for TPT) resized back to 32 px. A crop zooms in, so the object looks larger: only images
    whose own caption leaves the size unnamed are cropped, and the returned ``cropped`` mask lets the loss drop
    (cropped image, size-naming caption) pairs, whose truth the zoom made unknown. Returns (images, cropped)."""
    from ctta.views import random_resized_crops  # TPT's view sampler

    n = len(images)
    out = images
    if flip:
        flipped = torch.rand(n, generator=g) < 0.5
        out = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    if crop_frac <= 0:
        return out, torch.zeros(n, dtype=torch.bool)
    cropped = (torch.rand(n, generator=g) < crop_frac) & (mentions[:, W.MENTIONED.index("size")] < 0)
    idx = cropped.nonzero().flatten()
    if idx.numel():
        out = out.clone()
        out[idx] = random_resized_crops(out[idx], 1, out.shape[-1], g, scale=crop_scale, flip=False)[:, 0]
    return out, cropped


def degrade(images: torch.Tensor, g: torch.Generator, frac: float, noise_max: float,
            blur_max: float) -> torch.Tensor:
    """Photographic quality variation (a pre-training lever, off at ``frac`` 0): a ``frac`` share of the images gets
    sensor noise ``σ ~ U(0, noise_max)`` and a defocus blur ``σ ~ U(0, blur_max)`` px (3×3 Gaussian), one draw per
    image. Real CLIP's web photos carry such noise and blur; the world's renders carry none. Keep both maxima below
    the world's severity 1 (`streams.corruptions`: noise 0.06, blur 0.4), so that the test-time corruptions stay
    stronger than anything pre-training shows. Nothing is drawn at ``frac`` 0. Returns ``images`` itself when no image
    is picked, else a new tensor in [0, 1]."""
    if frac <= 0:
        return images
    from kornia.filters import gaussian_blur2d

    n = len(images)
    picked = (torch.rand(n, generator=g) < frac).nonzero().flatten()
    if not picked.numel():
        return images
    sub = images[picked]
    k = len(picked)
    blur = (torch.rand(k, generator=g) * blur_max).clamp_min(1e-3)  # σ → 0 is the identity kernel
    sub = gaussian_blur2d(sub, (3, 3), torch.stack([blur, blur], 1), border_type="reflect")
    noise = torch.rand(k, generator=g) * noise_max
    sub = sub + noise[:, None, None, None] * torch.randn(sub.shape, generator=g)
    out = images.clone()
    out[picked] = sub.clamp(0, 1)
    return out


def multi_positive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                        positives: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets uniform over all positives. positives: [images, texts] bool.
    ``valid`` ([images, texts] bool, optional) drops pairs from both softmaxes (their logits become -inf): pairs
    whose truth the augmentation made unknown. Every image and text must keep a valid positive."""
    logits = logit_scale * image_features @ text_features.T
    if valid is not None:
        if (positives & ~valid).any() or not (positives.any(1).all() and positives.any(0).all()):
            raise ValueError("every positive pair must be valid, and every image and text keep one")
        logits = logits.masked_fill(~valid, float("-inf"))
    pos = positives.float()
    # where(pos, ...) rather than pos * ...: a masked pair's -inf log-probability times 0 would be nan
    i2t = -torch.where(positives, pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1), 0.0).sum(1).mean()
    t2i = -torch.where(positives.T, pos.T / pos.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1),
                       0.0).sum(1).mean()
    return (i2t + t2i) / 2


def class_contrast_loss(image_features: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Image-image multi-positive InfoNCE over the batch (supervised contrastive, Khosla et al. 2020, eq. 2
    ``L_out``): for each image with at least one other image of its colour x shape class, minus the mean log
    softmax (over all other images, temperature ``1 / scale``) of its same-class images. Images without a
    same-class partner in the batch do not contribute. The class is what a "a {colour} {shape}" caption names, so
    this pulls one class together across style, size, background and pose, which caption matching alone leaves
    apart (v3: same-class images of different styles sat below different shapes of one colour and style)."""
    n = len(labels)
    eye = torch.eye(n, dtype=torch.bool)
    logits = (scale * image_features @ image_features.T).masked_fill(eye, float("-inf"))
    pos = (labels[:, None] == labels[None, :]) & ~eye
    has = pos.any(1)
    if not has.any():
        return image_features.sum() * 0.0
    logp = F.log_softmax(logits[has], 1)
    p = pos[has]
    return -(torch.where(p, logp, 0.0).sum(1) / p.sum(1)).mean()
