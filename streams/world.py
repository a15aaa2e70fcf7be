"""Streams on the built-in world (`streams.synthetic`): class-incremental, domain-incremental, retention controls
and test-time shift streams. Everything is rendered in memory from seeds: no files, same data on any machine.

Class names and prompts follow the micro-CLIP's pre-training captions: class ``"red star"`` with template
``"a {}."``; control tasks "a {shape}.", "a {size} shape.", "a shape on a {kind} background.".
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

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


def _cil_increment(n_classes: int, n_tasks: int, initial: int) -> int:
    """The increment of a B{initial} split of ``n_classes`` into ``n_tasks`` tasks in all (the base task counted),
    or a `ValueError` naming what to change — before anything is rendered."""
    if initial == 0:
        return split_into_tasks(n_classes, n_tasks)
    if isinstance(initial, bool) or not isinstance(initial, int) or not 0 < initial < n_classes:
        raise ValueError(f"initial (the base task's classes) must be an int between 0 (B0) and {n_classes - 1}, "
                         f"got {initial!r}")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 2:
        raise ValueError(f"with a base task of {initial} classes n_tasks (the base task included) must be at least "
                         f"2, got {n_tasks!r}")
    rest = n_classes - initial
    if rest % (n_tasks - 1):
        raise ValueError(f"the {rest} classes after a base task of {initial} do not split into {n_tasks - 1} equal "
                         f"tasks; choose n_tasks - 1 among {[k for k in range(1, rest + 1) if rest % k == 0]}")
    return rest // (n_tasks - 1)


def corrupt_all(data: ImageTensorDataset, name: str, severity: int, seed: int,
                chunk: int | None = None) -> ImageTensorDataset:
    """``data`` (uint8 images) under one corruption: a fixed domain for training and test alike. Chunk ``j`` draws its
    noise from its own generator seeded by ``(seed, j)``, so the pixels do not depend on anything but the seed."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; available: {list(CORRUPTIONS)}")
    chunk = chunk or SHIFT_CHUNK
    out = torch.empty_like(data.images)
    for j, a in enumerate(range(0, len(out), chunk)):
        g = torch.Generator().manual_seed(_chunk_seed(seed, 4095, j))  # domain slot 4095: unused by shift streams
        out[a:a + chunk] = W.to_uint8(corrupt(data.images[a:a + chunk].float().div(255), name, severity, generator=g))
    return ImageTensorDataset(out, data.targets)


def cil_stream(n_tasks: int = 10, *, initial: int = 0, train_per_class: int = 50, test_per_class: int = 20,
               order_seed: int = 1993, seed: int = 0, styles: Sequence[str] = PRETRAIN_STYLES,
               corruption: str | None = None, severity: int = 3) -> TaskStream:
    """Class-incremental over the 100 colour×shape classes, seeded class order (``order_seed``), evaluation over
    all seen classes (continuum's protocol).

    ``initial=0``: B0-Inc(100/n) — ``n_tasks`` equal tasks. ``initial=x``: Bx-Inc((100-x)/(n-1)) — a base task of x
    classes, then ``n_tasks - 1`` equal increments (RAPF's / PROOF's B50 settings).
    ``styles``: the rendering styles of train and test images (default: the micro-CLIP's pre-training domain);
    ``corruption`` / ``severity``: one of `streams.corruptions.CORRUPTIONS` applied to every train and test image
    (a fixed domain, not a test-time shift). ``configs/stream/world_cil_shifted*.yaml`` combine the "textured"
    style, never seen in pre-training, with a global hue shift (``colour_shift``): a domain far from pre-training
    where zero-shot is weak and learning pays, as CIFAR-100 is for real CLIP."""
    combos = combo_classes()
    increment = _cil_increment(len(combos), n_tasks, initial)  # checked before rendering anything
    if isinstance(styles, str):
        raise TypeError(f"styles must be a list of style names from {W.STYLES}, not the string {styles!r}")
    styles = tuple(styles)
    if corruption is not None:
        _check_shift_args([corruption], severity, "reset", "combo", 1, None)  # name and severity, before rendering
    train = render_per_class(combos, train_per_class, seed * 1000 + _SPLIT_SEED["train"], styles=styles)
    test = render_per_class(combos, test_per_class, seed * 1000 + _SPLIT_SEED["test"], styles=styles)
    if corruption is not None:
        train = corrupt_all(train, corruption, severity, seed * 1000 + _SPLIT_SEED["train"])
        test = corrupt_all(test, corruption, severity, seed * 1000 + _SPLIT_SEED["test"])
    # the default stream keeps its old name (run fingerprints and results files carry it)
    name = f"world-cil{n_tasks}" + (f"-b{initial}" if initial else "") + (
        "" if styles == PRETRAIN_STYLES else "-" + "+".join(styles)) + (
        f"-{corruption}{severity}" if corruption is not None else "")
    return class_incremental(combo_space(), train, test, increment=increment, initial=initial, seed=order_seed,
                             name=name)


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


# ------------------------------------------------------------------------------------------ test-time shift
SHIFT_SETTINGS = ("reset", "episodic", "continual", "gradual", "mixed", "label_correlated")
SHIFT_LABELS = ("combo", "shape", "colour")
SHIFT_CHUNK = 512  # images corrupted per call: bounds the float copies (peak memory) for long domains


def shift_space(labels: str = "combo") -> LabelSpace:
    """The label space of a shift stream: ``"combo"`` (100 colour×shape classes, "a {}." — the default),
    ``"shape"`` (10 shapes, "a {}.") or ``"colour"`` (10 colours, "a {} shape."), the micro-CLIP's caption forms."""
    if labels == "combo":
        return combo_space()
    if labels == "shape":
        return LabelSpace(list(W.SHAPES), ["a {}."], name="world-shapes")
    if labels == "colour":
        return LabelSpace(list(W.COLOURS), ["a {} shape."], name="world-colours")
    raise ValueError(f"unknown shift label space {labels!r}; choose from {SHIFT_LABELS}")


def render_labels(labels: str, per_class: int, seed: int, *, styles: Iterable[str] | None = PRETRAIN_STYLES,
                  chunk: int = 4096) -> ImageTensorDataset:
    """``per_class`` clean images of each class of `shift_space` ``labels``, class-sorted, stored as uint8.

    ``"combo"`` is `render_per_class` over the 100 combos (the same pixels as before the 10-class options existed);
    ``"shape"`` / ``"colour"`` fix that factor and draw the other one uniformly, like every nuisance."""
    if labels == "combo":
        return render_per_class(combo_classes(), per_class, seed, styles=styles, chunk=chunk)
    vocab = {"shape": W.SHAPES, "colour": W.COLOURS}.get(labels)
    if vocab is None:
        raise ValueError(f"unknown shift label space {labels!r}; choose from {SHIFT_LABELS}")
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(vocab)).repeat_interleave(per_class)
    f = W.sample_factors(len(y), g, styles=styles)
    setattr(f, labels, y)
    images = torch.cat([W.to_uint8(W.render(f[i:i + chunk])) for i in range(0, len(y), chunk)])
    return ImageTensorDataset(images, y)


def _chunk_seed(seed: int, domain: int, chunk: int) -> int:
    # far above the domain seeds (seed * 1000 + 7 k + 1), one per (seed, domain, chunk)
    return 2**40 + (seed * 4099 + domain) * 65537 + chunk


def _corrupt_domain(images: Tensor, name: str, severity: int, g: torch.Generator, seed: int, domain: int,
                    chunk: int) -> Tensor:
    """uint8 images -> corrupted uint8, ``chunk`` images at a time. The first chunk draws from the domain's
    generator ``g`` (so a domain of at most ``chunk`` images has the pixels of the unchunked code), each later
    chunk from its own seeded generator: the result does not depend on how the stream is batched later."""
    out = torch.empty_like(images)
    for j, a in enumerate(range(0, len(images), chunk)):
        gen = g if j == 0 else torch.Generator().manual_seed(_chunk_seed(seed, domain, j))
        out[a:a + chunk] = W.to_uint8(corrupt(images[a:a + chunk].float().div(255), name, severity, generator=gen))
    return out


def check_domains(names: Sequence[str], allowed: Sequence[str], what: str) -> None:
    """``names`` (one stream domain each) must be a non-empty list of distinct names from ``allowed``."""
    if isinstance(names, str) or not list(names):
        raise ValueError(f"{what} must be a non-empty list of names from {list(allowed)}, got {names!r}")
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; available: {list(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} are listed twice: {list(names)} (each domain must be unique)")


def _check_shift_args(corruptions: Sequence[str], severity: int | Sequence[int], setting: str, labels: str,
                      per_class: int | None, per_domain: int | None) -> tuple[list[int], int]:
    """Everything checked before any image is rendered; returns (severities, images per class)."""
    if setting not in SHIFT_SETTINGS:
        raise ValueError(f"unknown shift setting {setting!r}; choose from {SHIFT_SETTINGS}")
    if labels not in SHIFT_LABELS:
        raise ValueError(f"unknown shift label space {labels!r}; choose from {SHIFT_LABELS}")
    check_domains(corruptions, CORRUPTIONS, "corruptions")
    sev = list(severity) if isinstance(severity, Sequence) and not isinstance(severity, str) else [severity]
    if not sev or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in sev):
        raise ValueError(f"severity must be an int in 1..5 or a non-empty list of them, got {severity!r}")
    if len(set(sev)) != len(sev):
        raise ValueError(f"severities are listed twice: {sev} (each domain must be unique)")
    n_classes = len(shift_space(labels))
    if per_domain is not None:
        if per_class is not None:
            raise ValueError(f"set per_class or per_domain, not both (got per_class={per_class}, "
                             f"per_domain={per_domain}); per_domain = per_class x {n_classes} classes")
        if isinstance(per_domain, bool) or not isinstance(per_domain, int) or per_domain <= 0 \
                or per_domain % n_classes:
            raise ValueError(f"per_domain must be a positive multiple of the {n_classes} classes of labels="
                             f"{labels!r} (balanced classes), got {per_domain!r}")
        per_class = per_domain // n_classes
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class <= 0:
        raise ValueError(f"per_class must be a positive int, got {per_class!r}")
    return sev, per_class


def shift_tasks(corruptions: Sequence[str] = CORRUPTIONS, severity: int | Sequence[int] = 5, *,
                per_class: int | None = 2, per_domain: int | None = None, seed: int = 0, setting: str = "reset",
                labels: str = "combo", styles: Sequence[str] = PRETRAIN_STYLES,
                chunk: int = SHIFT_CHUNK) -> TaskStream:
    """Test-time shift streams: the world's test images under each corruption, one task per (corruption,
    severity) domain, in the order given (each domain the same clean images, each in its own seeded order).

    Length: ``per_class`` images of each class per domain, or ``per_domain`` in all (a multiple of the class
    count); a domain holds ``per_class x C`` images, the stream that times the number of domains. Stream methods
    (caches, memories) need long domains: ``configs/stream/world_shift_long.yaml`` uses 2,000 per domain.
    ``labels``: ``"combo"`` (100 colour×shape classes), ``"shape"`` or ``"colour"`` (10 classes; `shift_space`).
    ``severity``: 1–5, or a list (each corruption at each severity, corruption-major).

    ``setting`` (the ordering):

    - ``"reset"`` — domain blocks, each boundary revealed (the runner resets the adapter there when
      ``samples.reset_on_shift``): every domain is its own episode. ``"episodic"`` is the same stream (the name
      the TTA literature uses for it; the stream is named ``...-reset``). Episodes of one sample (TPT's protocol)
      are a reset policy of the runner (``samples.reset=episodic``), not an ordering;
    - ``"continual"`` — the same domain blocks, boundaries hidden (CoTTA's continual setting);
    - ``"gradual"`` — per corruption, severities 1→s→1 as blocks (``s`` = the highest severity given; the way
      back is named ``<corruption>-<severity>-down``), boundaries hidden;
    - ``"mixed"`` — every domain's images shuffled together into one task named ``"mixed"`` (so per-corruption
      accuracy is not separated);
    - ``"label_correlated"`` — continual, but each domain's samples sorted by class (the non-i.i.d. order of
      RoTTA/NOTE-style benchmarks).

    Reproducible: the clean images, each domain's order and its corruption noise are functions of ``seed`` only
    (not of batching). Memory: images are kept as uint8, 3 KB each (2,000 x 10 domains = 61 MB; ``gradual`` at
    severity 5 has 9 severities per corruption, 9x that); corruption runs ``chunk`` images at a time.
    """
    sev, per_class = _check_shift_args(corruptions, severity, setting, labels, per_class, per_domain)
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    setting = "reset" if setting == "episodic" else setting
    clean = render_labels(labels, per_class, seed * 1000 + _SPLIT_SEED["shift"], styles=styles)
    # gradual: up 1..s then back down; the way back is named "<corruption>-<severity>-down" (task names are unique)
    steps = ([(s, "") for s in range(1, max(sev) + 1)] + [(s, "-down") for s in range(max(sev) - 1, 0, -1)]
             if setting == "gradual" else [(s, "") for s in sev])
    domains = [(c, s, tag) for c in corruptions for s, tag in steps]
    space = shift_space(labels)
    tasks = []
    for k, (name, s, tag) in enumerate(domains):
        g = torch.Generator().manual_seed(seed * 1000 + 7 * k + 1)
        order = torch.randperm(len(clean), generator=g)
        if setting == "label_correlated":
            order = order[torch.argsort(clean.targets[order], stable=True)]
        x = _corrupt_domain(clean.images[order], name, s, g, seed, k, chunk)
        tasks.append(Task(name=f"{name}-{s}{tag}", space=space, test=ImageTensorDataset(x, clean.targets[order]),
                          boundary=setting == "reset"))
    if setting == "mixed":
        g = torch.Generator().manual_seed(seed * 1000 + 99)
        images = torch.cat([t.test.images for t in tasks])
        targets = torch.cat([t.test.targets for t in tasks])
        perm = torch.randperm(len(targets), generator=g)
        tasks = [Task(name="mixed", space=space, test=ImageTensorDataset(images[perm], targets[perm]))]
    suffix = "" if labels == "combo" else f"-{labels}"
    return TaskStream(tasks, scope="own", name=f"world-shift-{setting}{suffix}")
