"""The world's natural-shift test-time stream: the classes rendered in a style the micro-CLIP never saw.

The corruption streams (`streams.world.shift_tasks`) pose ImageNet-C-style shift. The cache and prototype methods
(TDA, DMN, DPE, BoostAdapter) report their gains on natural shift instead (ImageNet-R / Sketch / V2 / A: the same
classes drawn or photographed differently), so this stream poses that: every test image of the 100 colour x shape
classes (or the 10 shapes / colours) is drawn in an unseen style — by default "textured", which pre-training never
showed (`streams.world.PRETRAIN_STYLES`) — optionally under one corruption on top. One task per style, each from a
fresh state with its boundary revealed (``setting="reset"``, as the official runs treat each benchmark), or the styles
in sequence with hidden boundaries (``"continual"``). The images, their order and any corruption noise are functions
of ``seed`` only.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ctta.data import ImageTensorDataset
from ctta.stream import Task, TaskStream
from streams import synthetic as W
from streams.corruptions import CORRUPTIONS
from streams.world import SHIFT_CHUNK, _corrupt_domain, check_domains, render_labels, shift_space

STYLE_SETTINGS = ("reset", "episodic", "continual")
_STYLE_SEED = 53  # beside streams.world's split seeds (11, 23, 37, 41): images no other world stream draws


def style_shift_tasks(styles: Sequence[str] = ("textured",), *, corruption: str | None = None, severity: int = 3,
                      per_class: int = 20, seed: int = 0, setting: str = "reset", labels: str = "combo",
                      chunk: int = SHIFT_CHUNK) -> TaskStream:
    """``per_class`` images of each class of `streams.world.shift_space` ``labels`` per style, shuffled per style.

    ``corruption`` (a name of `streams.corruptions.CORRUPTIONS`, or None) at ``severity`` is applied on top of every
    style; without one, ``severity`` is unused (it stays a parameter so that the ``world_tta`` experiments, which
    name their run folders by it, apply unchanged). A style seen in pre-training is allowed (a control: no shift).
    """
    check_domains(styles, W.STYLES, "styles")
    if setting not in STYLE_SETTINGS:
        raise ValueError(f"unknown style-shift setting {setting!r}; choose from {STYLE_SETTINGS}")
    if corruption is not None and corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; available: {list(CORRUPTIONS)} (or null for none)")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class <= 0:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    space = shift_space(labels)  # checks labels
    tasks = []
    for k, style in enumerate(styles):
        base = seed * 1000 + _STYLE_SEED + 100 * W.STYLES.index(style)  # a style's images do not depend on the list
        clean = render_labels(labels, per_class, base, styles=[style])
        g = torch.Generator().manual_seed(base + 1)
        order = torch.randperm(len(clean), generator=g)
        x = clean.images[order]
        if corruption is not None:
            x = _corrupt_domain(x, corruption, severity, g, seed, 500 + W.STYLES.index(style), chunk)
        name = style if corruption is None else f"{style}+{corruption}-{severity}"
        tasks.append(Task(name=name, space=space, test=ImageTensorDataset(x, clean.targets[order]),
                          boundary=setting != "continual"))
    suffix = "" if labels == "combo" else f"-{labels}"
    return TaskStream(tasks, scope="own", name=f"world-style-{'continual' if setting == 'continual' else 'reset'}"
                                                   f"{suffix}")

