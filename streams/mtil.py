"""MTIL (ZSCL, ICCV 2023) and X-TAIL (RAIL, NeurIPS 2024) over the standard torchvision on-disk layouts.

Datasets are read with torchvision's own classes (``download=False``) from ``data_root``, exactly as ZSCL's
``src/datasets/collections.py`` does: Aircraft train/test, DTD partition 1, Flowers102 train/test, Food101, Pets
trainval/test, Cars, MNIST, CIFAR-100 (our pickle reader), and **Caltech101, EuroSAT, SUN397 split 80/20 with
``random_split(..., generator=torch.Generator().manual_seed(42))``** (`fixed_split`). Class names: ZSCL's custom lists
for Caltech101, EuroSAT and Flowers, torchvision's names with "_" → " " for the others (so MTIL's CIFAR-100 says
"aquarium fish", unlike Continual-CLIP). Each label space carries the dataset's whole template list (ZSCL trains with
``templates[0]`` and evaluates with the ensemble; strategies pick).

MTIL is task-incremental at test time (scope ``"own"``); X-TAIL classifies over the union of all domains' classes
(scope ``"all"``) and reads CoOp's split files (`streams.coop`). Few-shot variants sample ``shots`` images per class
with a seeded generator — the protocol's sample count, not the reference code's exact RNG draw (documented
deviation).

Training images are random resized crops of the whole image, scale (0.9, 1.0), as CLIP's train transform in ZSCL
and in open_clip (CoDyRA) makes them (`streams.images.TrainCrops`; ``train_crop=None``: the eval view instead),
drawn anew each pass (MoE-Adapters' few-shot MTIL draws each image's crop once and keeps it: a documented deviation).

``draft`` (off by default; `streams.images`) decodes JPEG files at reduced size. The torchvision readers decode
inside torchvision, where no reduced-size decode can be asked for, so with ``draft`` a dataset whose class keeps its
file list (`file_list`: every MTIL dataset but MNIST and CIFAR-100, which are arrays in memory) is read by
`streams.images.ImageFiles` over those same files and labels instead. That decoder composites an alpha channel on
white where torchvision's ``convert("RGB")`` drops it; JPEGs have none, so only a stray RGBA PNG could differ.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ctta.stream import LabelSpace, Task, TaskStream
from streams.cifar import cifar100_classnames, read_cifar100
from streams.images import (ImageFiles, IndexSubset, TensorImages, TrainCrops, WrappedImages, check_draft,
                            check_range)
from streams.manifest import DatasetError, load_meta

SPLIT_SEED = 42  # ZSCL ClassificationDataset.split_dataset
TRAIN_CROP = (0.9, 1.0)  # CLIP's train transform in ZSCL and open_clip (CoDyRA): RandomResizedCrop scale


def fixed_split(n: int, ratio: float = 0.8, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """The train / test positions of ``torch.utils.data.random_split(ds, [int(ratio*n), n - int(ratio*n)],
    generator=torch.Generator().manual_seed(seed))`` — same permutation, same cut."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(ratio * n)
    return perm[:k], perm[k:]


def few_shot(targets: torch.Tensor, shots: int, seed: int = 0) -> list[int]:
    """``shots`` positions per class (all of a class if it has fewer), seeded; sorted."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == c).flatten()
        keep += idx[torch.randperm(len(idx), generator=g)[:shots]].tolist()
    return sorted(keep)


def targets_of(ds: Any) -> torch.Tensor:
    """Labels of a torchvision dataset without decoding images (each class keeps them under a different name)."""
    for attr in ("targets", "_labels", "y"):
        t = getattr(ds, attr, None)
        if t is not None:
            return torch.as_tensor(list(t), dtype=torch.long)
    samples = getattr(ds, "_samples", None) or getattr(ds, "samples", None)
    if samples is not None:
        return torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
    raise TypeError(f"cannot read the labels of {type(ds).__name__} without loading images")


def file_list(ds: Any) -> list[str] | None:
    """The image files of a torchvision dataset in its item order, read from where its class keeps them (torchvision
    0.2x); None when it keeps none (MNIST's in-memory arrays)."""
    if isinstance(getattr(ds, "samples", None), list):  # ImageFolder (EuroSAT)
        return [str(p) for p, _ in ds.samples]
    if isinstance(getattr(ds, "_samples", None), list):  # StanfordCars
        return [str(p) for p, _ in ds._samples]
    for attr in ("_image_files", "_images"):  # DTD, Flowers102, Food101, SUN397, FGVCAircraft; OxfordIIITPet
        if isinstance(getattr(ds, attr, None), list):
            return [str(p) for p in getattr(ds, attr)]
    if type(ds).__name__ == "Caltech101":  # builds each path in __getitem__, with this rule
        return [os.path.join(ds.root, "101_ObjectCategories", ds.categories[y], f"image_{i:04d}.jpg")
                for y, i in zip(ds.y, ds.index)]
    return None


def _wrap(ds: Any, image_size: int, draft: float | None, whole: bool = False) -> Any:
    """A torchvision dataset in the engine's convention; with ``draft``, its files through `ImageFiles`.
    ``whole``: images as decoded, not resized (for `TrainCrops`)."""
    targets = targets_of(ds)
    files = file_list(ds) if draft is not None else None
    if files is None:
        return WrappedImages(ds, targets, None if whole else image_size)
    if len(files) != len(targets):
        raise DatasetError(f"{type(ds).__name__}: {len(files)} files but {len(targets)} labels")
    return ImageFiles(list(zip(files, targets.tolist())), image_size, draft=draft, whole=whole)


def _tv(cls_name: str, root: Path, **kw) -> Any:
    import torchvision.datasets as tvd
    if cls_name == "Caltech101":  # its __getitem__ imports scipy.io: fail here, before any training, not mid-run
        try:
            import scipy.io  # noqa: F401
        except ImportError:
            raise DatasetError("torchvision's Caltech101 reads its items with scipy, which is not installed: "
                               "pip install scipy (or the extra: pip install 'ctta[mtil]')") from None
    try:
        return getattr(tvd, cls_name)(str(root), download=False, **kw)
    except (RuntimeError, FileNotFoundError) as e:  # torchvision: "Dataset not found or corrupted..."
        raise DatasetError(f"{cls_name} not found under {root} in torchvision's layout ({e}); download it (e.g. "
                           f"torchvision.datasets.{cls_name}(root, download=True)) or place the release files there"
                           ) from None


def _load(name: str, root: Path, image_size: int, draft: float | None = None, whole_train: bool = False
          ) -> tuple[list[str], Any, Any]:
    """``(torchvision-derived class names, train, test)`` of one MTIL dataset; ``whole_train``: training images
    whole, as decoded (to be cropped by `TrainCrops`)."""
    if name == "cifar100":
        names = cifar100_classnames(root)
        return names, TensorImages(*read_cifar100(root, "train"), None if whole_train else image_size), TensorImages(
            *read_cifar100(root, "test"), image_size)
    spec = load_meta("mtil")["datasets"][name]
    cls = spec["torchvision"]
    if "random 80/20" in spec["split"]:
        full = _tv(cls, root)
        wrapped = _wrap(full, image_size, draft)
        tr, te = fixed_split(len(wrapped))
        names = getattr(full, "classes", None) or getattr(full, "categories", None)
        train = IndexSubset(_wrap(full, image_size, draft, whole=True) if whole_train else wrapped, tr)
        return list(names), train, IndexSubset(wrapped, te)
    if cls == "MNIST":
        kw = ({"train": True}, {"train": False})
    elif cls == "OxfordIIITPet":
        kw = ({"split": "trainval"}, {"split": "test"})
    else:
        kw = ({"split": "train"}, {"split": "test"})
    tr, te = _tv(cls, root, **kw[0]), _tv(cls, root, **kw[1])
    return list(tr.classes), _wrap(tr, image_size, draft, whole_train), _wrap(te, image_size, draft)


def mtil_space(name: str, torchvision_names: Sequence[str]) -> LabelSpace:
    spec = load_meta("mtil")["datasets"][name]
    custom = spec.get("classnames")
    if custom is not None and len(custom) != len(torchvision_names):
        raise DatasetError(f"{name}: found {len(torchvision_names)} classes on disk, ZSCL's list has {len(custom)}")
    names = custom if custom is not None else [n.replace("_", " ") for n in torchvision_names]
    if len(names) != spec["classes"]:
        raise DatasetError(f"{name}: found {len(names)} classes on disk, the release has {spec['classes']}")
    return LabelSpace(names, spec["templates"], name=name)


def distinct_names(tasks: list[Task]) -> list[Task]:
    """Make class names unique across tasks, for streams evaluated over the union (X-TAIL): a name already used by
    an earlier class gets trailing spaces. CLIP's tokenizer drops whitespace, so prompts tokenize exactly as the
    reference code's (which simply concatenates the lists, e.g. Caltech101's and Flowers' "sunflower")."""
    seen: set[str] = set()
    out = []
    for t in tasks:
        names = []
        for n in t.space.classnames:
            while n in seen:
                n += " "
            seen.add(n)
            names.append(n)
        if list(t.space.classnames) != names:
            space = LabelSpace.concat([LabelSpace([m], temps, name=t.space.name)
                                       for m, temps in zip(names, t.space.class_templates)], name=t.space.name)
            t = Task(name=t.name, space=space, test=t.test, train=t.train, boundary=t.boundary)
        out.append(t)
    return out


def _order(order: str | Sequence[str], table: dict[str, list[str]]) -> list[str]:
    if isinstance(order, str):
        if order not in table:
            raise ValueError(f"unknown order {order!r}; known: {sorted(table)} or a list of dataset names")
        return list(table[order])
    known = load_meta("mtil")["datasets"]
    bad = [d for d in order if d not in known]
    if bad:
        raise ValueError(f"unknown MTIL datasets {bad}; known: {sorted(known)}")
    return list(order)


def _tasks(datasets: Sequence[str], data_root: str | Path, image_size: int, shots: int | None, seed: int,
           first_template: bool, draft: float | None = None, train_crop: Sequence[float] | None = None
           ) -> list[Task]:
    tasks = []
    for k, name in enumerate(datasets):
        tv_names, train, test = _load(name, Path(data_root), image_size, draft, whole_train=train_crop is not None)
        space = mtil_space(name, tv_names)
        if first_template:
            space = space.with_templates(space.class_templates[0][:1])
        if shots is not None:
            train = IndexSubset(train, few_shot(torch.as_tensor(train.targets), shots, seed + k))
        tasks.append(Task(name=name, space=space, train=_cropped(train, image_size, train_crop), test=test))
    return tasks


def _cropped(train: Any, image_size: int, train_crop: Sequence[float] | None) -> Any:
    """The training set as the references train on it: random resized crops of the whole image (`TrainCrops`),
    or the eval view when ``train_crop`` is None."""
    return train if train_crop is None else TrainCrops(train, image_size, scale=train_crop)


def check_train_crop(train_crop: Sequence[float] | None) -> tuple[float, float] | None:
    """None or the crop scale range, checked before any dataset is opened."""
    return None if train_crop is None else check_range(train_crop, "train_crop", upper=1.0)


def mtil_stream(data_root: str | Path = "data", *, order: str | Sequence[str] = "I", shots: int | None = None,
                image_size: int = 224, seed: int = 0, draft: float | None = None, name: str | None = None,
                train_crop: Sequence[float] | None = TRAIN_CROP) -> TaskStream:
    """MTIL: 11 datasets (Order ``"I"``, ``"II"`` or a list), each evaluated in its own label space. ``shots=5``
    gives the few-shot MTIL of MoE-Adapters / DIKI / CoDyRA. ``draft``: see the module docstring. ``train_crop``:
    the scale range of the training images' random resized crops (ZSCL's (0.9, 1.0); `TrainCrops`), None for the
    eval view."""
    check_draft(draft)  # before any dataset is opened
    train_crop = check_train_crop(train_crop)
    ds = _order(order, load_meta("mtil")["orders"])
    tasks = _tasks(ds, data_root, image_size, shots, seed, first_template=False, draft=draft, train_crop=train_crop)
    return TaskStream(tasks, scope="own", name=name or f"mtil-{order if isinstance(order, str) else 'custom'}"
                      + (f"-{shots}shot" if shots else ""))


def xtail_stream(data_root: str | Path = "data", *, shots: int | None = 16, image_size: int = 224, seed: int = 0,
                 first_template: bool = True, splits: str = "coop", order: str | Sequence[str] = "xtail",
                 draft: float | None = None, name: str = "xtail", train_crop: Sequence[float] | None = TRAIN_CROP,
                 prompts: str | None = None) -> TaskStream:
    """X-TAIL: the 10 domains (MTIL minus CIFAR-100), ``shots``-shot training, every test image classified over the
    union of all domains' classes (scope ``"all"``), with each dataset's first template (CoDyRA).

    ``splits="coop"`` (the reference): CoOp split files and their class names ("_" → " ", as CoOp's prompt learner),
    MNIST from torchvision (CoOp has none); ``"torchvision"``: the MTIL readers and ZSCL's names. ``draft``:
    reduced-size JPEG decoding (see the module docstring). ``train_crop``: as in `mtil_stream` (CoDyRA trains with
    open_clip's train transform, the same crop).

    ``prompts`` (None: ``"codyra"`` with the CoOp splits, ``"zscl"`` with torchvision's): ``"codyra"`` is CoDyRA's
    prompt per class, ``template[0].format(name)`` from its dataset files (`codyra_space`): the CoOp split's names
    as written, underscores kept; EuroSAT's with " satellite location"; MNIST's as ``number: "0 - zero"`` inside
    ``a photo of the number: "{}".`` (so the number is named twice, as in CoDyRA's code); DTD ``{} texture.``, Food
    ``a photo of {}, a type of food.``, Cars ``a photo of a {}.`` (one template a dataset, so ``first_template``
    changes nothing). ``"zscl"``: ZSCL's templates (the first, or all without ``first_template``) and names with
    "_" → " ".
    """
    check_draft(draft)
    train_crop = check_train_crop(train_crop)
    if prompts is None:
        prompts = "codyra" if splits == "coop" else "zscl"
    if prompts not in ("codyra", "zscl"):
        raise ValueError(f"prompts must be 'codyra' or 'zscl', got {prompts!r}")
    if prompts == "codyra" and splits != "coop":
        raise ValueError("prompts='codyra' names classes as CoDyRA's CoOp split files do: use splits='coop'")
    ds = _order(order, {"xtail": load_meta("mtil")["xtail_order"]})
    if splits == "torchvision":
        return TaskStream(distinct_names(_tasks(ds, data_root, image_size, shots, seed, first_template, draft,
                                                train_crop)), scope="all", name=name)
    if splits != "coop":
        raise ValueError(f"splits must be 'coop' or 'torchvision', got {splits!r}")
    from streams.coop import COOP, coop_dataset
    tasks = []
    for k, d in enumerate(ds):
        if d not in COOP:  # MNIST
            (task,) = _tasks([d], data_root, image_size, shots, seed + k, first_template, draft, train_crop)
            if prompts == "codyra":
                task = Task(name=task.name, space=codyra_space(d, task.space.classnames), train=task.train,
                            test=task.test, boundary=task.boundary)
            tasks.append(task)
            continue
        names, parts = coop_dataset(d, data_root, image_size, draft=draft, whole_train=train_crop is not None)
        templates = load_meta("mtil")["datasets"][d]["templates"]
        space = codyra_space(d, names) if prompts == "codyra" else LabelSpace(
            [n.replace("_", " ") for n in names], templates[:1] if first_template else templates, name=d)
        train = parts["train"] if shots is None else IndexSubset(parts["train"], few_shot(
            parts["train"].targets, shots, seed + k))
        tasks.append(Task(name=d, space=space, train=_cropped(train, image_size, train_crop), test=parts["test"]))
    return TaskStream(distinct_names(tasks), scope="all", name=name)


def codyra_space(dataset: str, names: Sequence[str]) -> LabelSpace:
    """One X-TAIL domain's classes prompted as CoDyRA prompts them: its dataset file's one template over its class
    names (``streams/meta/mtil.json`` ``xtail_codyra``, with the sources of each entry)."""
    table = load_meta("mtil")["xtail_codyra"]
    wrap = table["names"].get(dataset, "{}")
    return LabelSpace([wrap.replace("{}", n) for n in names], [table["templates"][dataset]], name=dataset)
