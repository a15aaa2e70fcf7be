"""The world's counterpart of MTIL (Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning
of Vision-Language Models", ICCV 2023 — ZSCL; reference code Thunderbeee/ZSCL ``mtil/``): several world "datasets",
each with its own label space, its own prompt templates and its own images, trained in sequence and evaluated
task-incrementally (each dataset only among its own classes, scope ``"own"``), scored with ZSCL's Transfer /
Average / Last (`ctta.metrics.summarize` on the accuracy matrix: `mtil_transfer`, `mtil_average`, `mtil_last`).

Each dataset asks about a different factor of the world, or the same factor in a different domain, so that learning
one can cost the zero-shot ability on the others — the effect MTIL's Transfer measures (ZSCL: continual fine-tuning
drops Transfer from zero-shot CLIP's 69.4 to 44.6). Some are far from the micro-CLIP's pre-training (a style it
never saw, a hue shift, noise), some close to it, so that zero-shot accuracy spans near chance to near perfect, as
MTIL's does (24 % on Aircraft to 89 % on Pets); the README records the shipped checkpoint's figures.

As in ZSCL, a dataset's ``templates`` list is its ensemble for evaluation (`ctta.model.Clip.text_head` averages the
normalised template embeddings) and training uses its first template (`ctta.finetuning`). Orders: ``"I"`` is
alphabetical (ZSCL's Order I is alphabetical); ``"II"`` applies ZSCL's Order II permutation of Order I
(``results.ipynb``: [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]) restricted to the indices that exist (`order_ii`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ctta.data import ImageTensorDataset
from ctta.stream import LabelSpace, Task, TaskStream
from streams import synthetic as W
from streams.corruptions import CORRUPTIONS, corrupt
from streams.world import PRETRAIN_STYLES, render_per_class

ZSCL_ORDER_II = (9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2)  # ZSCL results.ipynb, as indices into its alphabetical Order I
_CHUNK = 2048  # images rendered / corrupted per call (bounds the float copies)


@dataclass(frozen=True)
class WorldDataset:
    """One world "dataset": the factor it labels, its class names (``classnames[i]`` names factor value
    ``values[i]``), its templates, the styles its images are drawn from and an optional corruption of them.
    ``factor="combo"`` labels (colour, shape) pairs given by ``combos``."""

    name: str
    factor: str                       # "shape" | "colour" | "size" | "background" | "style" | "combo"
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    styles: tuple[str, ...] = PRETRAIN_STYLES
    corruption: str | None = None
    severity: int = 3
    combos: tuple[tuple[str, str], ...] = ()

    def space(self) -> LabelSpace:
        return LabelSpace(self.classnames, self.templates, name=self.name)


_VOCAB = {"shape": W.SHAPES, "colour": W.COLOURS, "size": W.SIZES, "background": W.BACKGROUNDS,
          "style": W.STYLES}

# The default world MTIL, alphabetical (= Order I). Not included: background type (4-way), which full fine-tuning
# did not learn in the shared schedule (27.5 % after 30 iterations at chance 25 %, seed 100; the micro-CLIPs' text
# towers map the background phrases to nearly one embedding): a dataset nothing learns tells the methods nothing.
WORLD_DATASETS: tuple[WorldDataset, ...] = (
    # 10 colours under a global hue rotation + desaturation (colour_shift, severity 5) of every image
    WorldDataset("colours_shifted", "colour", W.COLOURS, ("a {} shape.", "a picture of a {} shape."),
                 corruption="colour_shift", severity=5),
    # the 20 colour x shape combos held out of pre-training, in the textured style it never saw
    WorldDataset("combos_textured", "combo", tuple(f"{c} {s}" for c, s in sorted(W.HELD_OUT)),
                 ("a {}.", "there is a {}."), styles=("textured",), combos=tuple(sorted(W.HELD_OUT))),
    # 10 shapes in the pre-training styles
    WorldDataset("shapes", "shape", W.SHAPES, ("a {}.", "a photo of a {}.", "a drawing of a {}.")),
    # 10 shapes under gaussian noise (severity 3)
    WorldDataset("shapes_noisy", "shape", W.SHAPES, ("a photo of a {}.", "an image of a {}."),
                 corruption="gaussian_noise", severity=3),
    # 3 sizes in the textured style
    WorldDataset("sizes_textured", "size", W.SIZES, ("a {} shape.", "an image of a {} shape."), styles=("textured",)),
    # 3 rendering styles
    WorldDataset("styles", "style", W.STYLES, ("a {} shape.", "a picture of a {} shape."), styles=W.STYLES),
)
BY_NAME = {d.name: d for d in WORLD_DATASETS}


def order_ii(n: int) -> list[int]:
    """ZSCL's Order II as a permutation of ``n`` alphabetical datasets: its index sequence with the indices ``>= n``
    dropped (for n = 11 it is ZSCL's own; for the 6 world datasets [5, 0, 1, 3, 4, 2]). Beyond 11 datasets there
    is no counterpart."""
    if not 2 <= n <= len(ZSCL_ORDER_II):
        raise ValueError(f"Order II is defined for 2 to {len(ZSCL_ORDER_II)} datasets, got {n}")
    return [i for i in ZSCL_ORDER_II if i < n]


def world_order(order: str | Sequence[str]) -> list[str]:
    """Dataset names in training order: ``"I"`` (alphabetical), ``"II"`` (`order_ii`) or an explicit list."""
    names = sorted(BY_NAME)
    if isinstance(order, str):
        if order == "I":
            return names
        if order == "II":
            return [names[i] for i in order_ii(len(names))]
        raise ValueError(f"unknown order {order!r}; use 'I', 'II' or a list of dataset names from {names}")
    out = list(order)
    bad = [d for d in out if d not in BY_NAME]
    if bad or not out:
        raise ValueError(f"unknown world datasets {bad} (or an empty list); known: {names}")
    if len(set(out)) != len(out):
        raise ValueError(f"datasets are listed twice: {out}")
    return out


def render_dataset(d: WorldDataset, per_class: int, seed: int) -> ImageTensorDataset:
    """``per_class`` images of each class of ``d`` (class-sorted, uint8): the labelled factor fixed, every other
    factor drawn uniformly from the allowed values, then ``d``'s corruption (its noise from the same generator)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class <= 0:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    g = torch.Generator().manual_seed(seed)
    if d.factor == "combo":
        clean = render_per_class(d.combos, per_class, seed, styles=d.styles, chunk=_CHUNK)
        images, y = clean.images, clean.targets
    else:
        vocab = _VOCAB[d.factor]
        values = torch.tensor([vocab.index(v) for v in _values(d)])
        y = torch.arange(len(d.classnames)).repeat_interleave(per_class)
        f = W.sample_factors(len(y), g, styles=d.styles)
        setattr(f, d.factor, values[y])
        images = torch.cat([W.to_uint8(W.render(f[i:i + _CHUNK])) for i in range(0, len(y), _CHUNK)])
    if d.corruption is not None:
        images = torch.cat([W.to_uint8(corrupt(images[i:i + _CHUNK].float().div(255), d.corruption, d.severity,
                                               generator=g)) for i in range(0, len(images), _CHUNK)])
    return ImageTensorDataset(images, y)


def _values(d: WorldDataset) -> tuple[str, ...]:
    """The factor value each class name stands for (the background and style words differ from the vocabulary's:
    captions say "striped" / "noisy", the factor is "stripes" / "noise")."""
    return _VOCAB[d.factor] if d.factor in ("background", "style") else d.classnames


def mtil_stream(order: str | Sequence[str] = "I", *, train_per_class: int = 60, test_per_class: int = 30,
                seed: int = 0) -> TaskStream:
    """World MTIL: the datasets of ``order`` trained in sequence, each evaluated in its own label space (scope
    ``"own"``, ZSCL's ``eval_single_dataset``). Images per dataset: ``train_per_class`` / ``test_per_class`` x its
    classes (defaults: 60 / 30, so the 3-class sets have 180 / 90 images and the 20-class one 1,200 / 600).
    Each dataset's images depend on ``seed`` and the dataset alone, not on the order: Order I and II hold the same
    pixels."""
    names = world_order(order)
    for k, v in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    tasks = []
    for name in names:
        d = BY_NAME[name]
        base = seed * 1000 + 500 + 10 * sorted(BY_NAME).index(name)  # one seed block per dataset, order-free
        tasks.append(Task(name=name, space=d.space(), train=render_dataset(d, train_per_class, base + 1),
                          test=render_dataset(d, test_per_class, base + 2)))
    tag = order if isinstance(order, str) else "custom"
    return TaskStream(tasks, scope="own", name=f"world-mtil-{tag}")


def _check_table() -> None:
    """Import-time guard on `WORLD_DATASETS` (a typo there would otherwise surface as a wrong label)."""
    for d in WORLD_DATASETS:
        assert d.factor in _VOCAB or d.factor == "combo", d
        assert d.corruption is None or d.corruption in CORRUPTIONS, d
        assert len(_values(d)) == len(d.classnames), d
        assert d.factor != "combo" or len(d.combos) == len(d.classnames), d


_check_table()
