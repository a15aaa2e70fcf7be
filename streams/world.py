"""Streams on the built-in world (`streams.synthetic`): class-incremental, domain-incremental, retention controls
and test-time shift streams. Everything is rendered in memory from seeds: no files, same data on any machine.

Class names and prompts follow the micro-CLIP's pre-training captions: class ``"red star"`` with template
``"a {}."``; control tasks "a {shape}.", "a {size} shape.", "a shape on a {kind} background.".
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ctta.data import ImageTensorDataset
from ctta.stream import LabelSpace, Task, TaskStream, class_incremental, domain_incremental, split_into_tasks
from streams import synthetic as W
from streams.corruptions import CORRUPTIONS, corrupt

PRETRAIN_STYLES = ("filled", "outline")  # the micro-CLIP never saw "textured" in pre-training
COMBO_TEMPLATES = ("a {}.",)
_SPLIT_SEED = {"train": 11, "test": 23, "control": 37, "shift": 41}


def combo_classes() -> list[tuple[str, str]]:
    """The 100 (colour, shape) classes, colour-major."""
    return [(c, s) for c in W.COLOURS for s in W.SHAPES]


def combo_space(templates: Sequence[str] = COMBO_TEMPLATES) -> LabelSpace:
    return LabelSpace([f"{c} {s}" for c, s in combo_classes()], templates, name="world-combos")


def render_per_class(combos: Sequence[tuple[str, str]], per_class: int, seed: int, *,
                     styles: Iterable[str] | None = PRETRAIN_STYLES, chunk: int = 4096) -> ImageTensorDataset:
    """``per_class`` images of each (colour, shape) combo, labels = position in ``combos``; stored as uint8."""
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(combos)).repeat_interleave(per_class)
    shape_idx = torch.tensor([W.SHAPES.index(s) for _, s in combos])[labels]
    colour_idx = torch.tensor([W.COLOURS.index(c) for c, _ in combos])[labels]
    f = W.sample_factors(len(labels), g, styles=styles)
    f.shape, f.colour = shape_idx, colour_idx  # nuisances random, class factors fixed
    images = torch.cat([W.to_uint8(W.render(f[i:i + chunk])) for i in range(0, len(labels), chunk)])
    return ImageTensorDataset(images, labels)


def cil_stream(n_tasks: int = 10, *, train_per_class: int = 50, test_per_class: int = 20, order_seed: int = 1993,
               seed: int = 0, styles: Sequence[str] = PRETRAIN_STYLES) -> TaskStream:
    """Class-incremental over the 100 colour×shape classes in ``n_tasks`` equal tasks (B0-Inc(100/n)), seeded
    class order, evaluation over all seen classes."""
    combos = combo_classes()
    increment = split_into_tasks(len(combos), n_tasks)  # checked before rendering anything
    train = render_per_class(combos, train_per_class, seed * 1000 + _SPLIT_SEED["train"], styles=styles)
    test = render_per_class(combos, test_per_class, seed * 1000 + _SPLIT_SEED["test"], styles=styles)
    return class_incremental(combo_space(), train, test, increment=increment, seed=order_seed,
                             name=f"world-cil{n_tasks}")


def dil_stream(domains: Sequence[str] = W.STYLES, *, train_per_class: int = 20, test_per_class: int = 10,
               seed: int = 0) -> TaskStream:
    """Domain-incremental: one task per rendering style, all 100 combo classes in each."""
    combos = combo_classes()
    tasks = []
    for k, style in enumerate(domains):
        s = seed * 1000 + 100 * (k + 1)
        tasks.append((style, render_per_class(combos, train_per_class, s + _SPLIT_SEED["train"], styles=[style]),
                      render_per_class(combos, test_per_class, s + _SPLIT_SEED["test"], styles=[style])))
    return domain_incremental(combo_space(), tasks, name="world-dil")


# control task name -> (class names, template, factor attribute)
_CONTROLS = {
    "shape": (W.SHAPES, "a {}.", "shape"),
    "size": (W.SIZES, "a {} shape.", "size"),
    "background": (("plain", "gradient", "striped", "noisy"), "a shape on a {} background.", "background"),
    "colour": (W.COLOURS, "a {} shape.", "colour"),
}


def control_tasks(names: Sequence[str] = ("shape", "size", "colour"), *, n: int = 1000, seed: int = 0,
                  styles: Sequence[str] = PRETRAIN_STYLES) -> list[Task]:
    """Zero-shot retention controls: tasks a colour×shape CIL stream never trains on directly."""
    unknown = sorted(set(names) - set(_CONTROLS))
    if unknown:
        raise ValueError(f"unknown control tasks {unknown}; choose from {sorted(_CONTROLS)}")
    out = []
    for k, name in enumerate(names):
        classnames, template, attr = _CONTROLS[name]
        g = torch.Generator().manual_seed(seed * 1000 + _SPLIT_SEED["control"] + k)
        f = W.sample_factors(n, g, styles=styles)
        data = ImageTensorDataset(W.to_uint8(W.render(f)), getattr(f, attr))
        out.append(Task(name=f"control/{name}", space=LabelSpace(classnames, [template], name=name), test=data))
    return out


def shift_tasks(corruptions: Sequence[str] = CORRUPTIONS, severity: int | Sequence[int] = 5, *,
                per_class: int = 2, seed: int = 0, setting: str = "reset",
                styles: Sequence[str] = PRETRAIN_STYLES) -> TaskStream:
    """Test-time shift streams over the 100-way combo task, one task per (corruption, severity) domain.

    ``setting``: ``"reset"`` (each shift announced: the boundary is revealed, strategies may reset),
    ``"continual"`` (the same sequence, boundaries hidden), ``"gradual"`` (severities 1→s→1 per corruption,
    hidden boundaries), ``"mixed"`` (all domains shuffled into one task), ``"label_correlated"`` (continual, but
    each domain's samples sorted by class: the non-i.i.d. order of RoTTA/NOTE-style benchmarks).
    """
    if setting not in ("reset", "continual", "gradual", "mixed", "label_correlated"):
        raise ValueError(f"unknown shift setting {setting!r}")
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; available: {list(CORRUPTIONS)}")
    combos = combo_classes()
    clean = render_per_class(combos, per_class, seed * 1000 + _SPLIT_SEED["shift"], styles=styles)
    sev = [severity] if isinstance(severity, int) else list(severity)
    domains = [(c, s) for c in corruptions for s in (
        list(range(1, max(sev) + 1)) + list(range(max(sev) - 1, 0, -1)) if setting == "gradual" else sev)]
    space = combo_space()
    tasks = []
    for k, (name, s) in enumerate(domains):
        g = torch.Generator().manual_seed(seed * 1000 + 7 * k + 1)
        order = torch.randperm(len(clean), generator=g)
        if setting == "label_correlated":
            order = order[torch.argsort(clean.targets[order], stable=True)]
        images = clean.images[order].float().div(255)
        x = W.to_uint8(corrupt(images, name, s, generator=g))
        tasks.append(Task(name=f"{name}-{s}", space=space, test=ImageTensorDataset(x, clean.targets[order]),
                          boundary=setting == "reset"))
    if setting == "mixed":
        g = torch.Generator().manual_seed(seed * 1000 + 99)
        images = torch.cat([t.test.images for t in tasks])
        labels = torch.cat([t.test.targets for t in tasks])
        perm = torch.randperm(len(labels), generator=g)
        tasks = [Task(name="mixed", space=space, test=ImageTensorDataset(images[perm], labels[perm]))]
    return TaskStream(tasks, scope="own", name=f"world-shift-{setting}")
