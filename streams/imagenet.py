"""ImageNet and its test-time shift variants (TPT protocol), and ImageNet-100 class-incremental (DyTox split).

Label spaces follow TPT (`data/imagnet_prompts.py`, `data/imagenet_variants.py`):

- ImageNet / ImageNet-Sketch: all 1000 classes in sorted-wnid order.
- ImageNet-A / ImageNet-R: 200 classes; folders are wnids, sorted, so label i is the i-th class of the 200-index
  mask (increasing indices into the 1000 list); names = CLIP names at those indices.
- ImageNet-V2 (matched-frequency): folders "0".."999" sorted **lexicographically** ("0", "1", "10", "100", ...), so
  label i is class ``int(sorted_folders[i])`` (TPT's ``imagenet_v_mask``); names follow that permutation.

Class names are CLIP's curated 1000 (``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``) and the ensemble
templates are OpenAI's 80 (``OPENAI_IMAGENET_TEMPLATES``); TPT itself uses the single "a photo of a {}.".
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ctta.stream import LabelSpace, Task, TaskStream, class_incremental
from streams.cifar import resolve_order
from streams.images import ImageFiles, check_draft, image_folder
from streams.manifest import DatasetError, Level, load_meta, manifests, read_lines, verify

VARIANTS = ("imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch")
# where each variant lives under data_root (the folders its archive extracts to)
FOLDERS = {"imagenet": "imagenet/val", "imagenet_a": "imagenet-a", "imagenet_r": "imagenet-r",
           "imagenet_v2": "imagenetv2-matched-frequency-format-val", "imagenet_sketch": "sketch"}


def imagenet_wnids() -> list[str]:
    return read_lines("imagenet_wnids.txt")


def imagenet_classnames() -> list[str]:
    """CLIP's curated ImageNet class names, in sorted-wnid order.

    CLIP's list names two pairs of classes identically ("missile" 657/744, "sunglasses" 836/837). `LabelSpace`
    needs distinct names, so a repeated name gets trailing spaces. CLIP's tokenizer drops whitespace, so the prompts
    tokenize exactly as in the reference code (TPT), where the two classes share one text feature and ties go to the
    lower index.
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    out, seen = [], set()
    for n in IMAGENET_CLASSNAMES:
        while n in seen:
            n += " "
        seen.add(n)
        out.append(n)
    return out


def imagenet_templates(which: str | Sequence[str] = "tpt") -> list[str]:
    """``"tpt"``: ["a photo of a {}."]; ``"openai"``: OpenAI's 80; ``"simple"``: open_clip's 7; or a list."""
    if not isinstance(which, str):
        return list(which)
    if which == "tpt":
        return ["a photo of a {}."]
    from open_clip import zero_shot_metadata as z
    table = {"openai": z.OPENAI_IMAGENET_TEMPLATES, "simple": z.SIMPLE_IMAGENET_TEMPLATES}
    if which not in table:
        raise ValueError(f"unknown template set {which!r}; choose 'tpt', 'openai', 'simple' or pass a list")
    return [t("{}") for t in table[which]]  # open_clip stores them as lambdas


def v2_order() -> list[int]:
    """ImageNet-V2 label i ↔ ImageNet class ``v2_order()[i]`` (lexicographic folder order)."""
    return sorted(range(1000), key=str)


def variant_classes(variant: str) -> tuple[list[int], list[str]]:
    """``(indices into the 1000 classes, expected folder names)`` of a variant, in label order."""
    wnids = imagenet_wnids()
    meta = load_meta("imagenet_variants")
    if variant in ("imagenet", "imagenet_sketch"):
        return list(range(1000)), wnids
    if variant in ("imagenet_a", "imagenet_r"):
        idx = meta["a_indices" if variant == "imagenet_a" else "r_indices"]
        return list(idx), [wnids[i] for i in idx]
    if variant == "imagenet_v2":
        order = v2_order()
        return order, [str(i) for i in order]
    raise ValueError(f"unknown ImageNet variant {variant!r}; choose from {VARIANTS}")


def variant_space(variant: str, templates: str | Sequence[str] = "tpt") -> LabelSpace:
    idx, _ = variant_classes(variant)
    names = imagenet_classnames()
    return LabelSpace([names[i] for i in idx], imagenet_templates(templates), name=variant)


def variant_dataset(variant: str, root: str | Path, image_size: int = 224, *,
                    verify_level: Level = "structure", sh_filter: bool = False,
                    draft: float | None = None, source_side: int | None = None) -> ImageFiles:
    """The variant's images with labels in `variant_space` order. ``root`` = the variant's own folder.

    ``sh_filter``: drop every image whose **file name** contains ``"sh"`` (case-sensitive), as the data loaders of
    TDA, DPE and BoostAdapter do by accident: their ``datasets/utils.py`` defines ``listdir_nohidden`` twice and
    the second definition, which wins, also skips names containing ``"sh"`` (TDA issue #10). On ImageNet-A this keeps
    6,862 of the 7,500 images ("fish", "shovel", "mushroom", ... appear in its file names), and their ImageNet-A
    figures are on that subset. Off by default: the full set is the benchmark every other method reports on.
    Class folders are wnids (``n`` + digits), which never contain "sh", so labels are unchanged. The release is
    verified (``verify_level``) before the filter. ``draft``: reduced-size JPEG decoding (`streams.images`; None, the
    default, decodes at full size). ``source_side``: whole images instead of eval crops (`streams.images.ImageFiles`),
    for the test-time methods' views."""
    check_draft(draft)  # a bad value fails before the release is walked
    idx, folders = variant_classes(variant)
    if verify_level != "none":
        verify(manifests()[variant], root, verify_level)
    # The expected folder order equals sorted order for every variant (V2 included: it *is* the lexicographic
    # order), so this is exactly torchvision's ImageFolder labelling.
    assert folders == sorted(folders)
    data, _ = image_folder(root, image_size, classes=folders, draft=draft, source_side=source_side)
    if sh_filter:
        data = _subset(data, [i for i, p in enumerate(data.paths) if "sh" not in os.path.basename(p)])
    return data


def _subset(data: ImageFiles, keep: Sequence[int]) -> ImageFiles:
    return ImageFiles([(data.paths[i], int(data.targets[i])) for i in keep], data.image_size, draft=data.draft,
                      source_side=data.source_side)


def tta_stream(variants: Sequence[str] = ("imagenet_a",), *, data_root: str | Path = "data", image_size: int = 224,
               templates: str | Sequence[str] = "tpt", roots: dict[str, str] | None = None,
               verify_level: Level = "structure", setting: str = "reset", shuffle: bool = False,
               shuffle_seed: int = 1, sh_filter: bool = False, draft: float | None = None,
               source_side: int | None = None, name: str | None = None) -> TaskStream:
    """One test-only task per variant (each in its own label space). ``setting="reset"`` reveals the boundaries
    (strategies may reset between variants); ``"continual"`` hides them. ``roots`` overrides a variant's folder.

    ``shuffle``: present each variant's images in a seeded random order (``torch.randperm`` with a generator seeded
    by ``shuffle_seed``, the same seed for every variant), as the online methods' official runs do (TDA, DPE,
    BoostAdapter: ``DataLoader(shuffle=True)`` after seed 1; DMN and TPT: seed 0). Without it the order is the
    folder order, **sorted by class**: a label-correlated stream, which changes what any cache or memory method
    holds. The official permutation itself depends on each script's whole random-number history and cannot be
    reproduced here; the protocol (a fixed-seed shuffle) is. ``sh_filter``: see `variant_dataset` (ImageNet-A's
    6,862-image subset of TDA / DPE / BoostAdapter); applied to every variant of the stream. ``draft``: reduced-size
    JPEG decoding for every variant (`streams.images`; off by default: not exact, ~0.5 % of predictions change).
    ``source_side``: give each image whole (shrunk to that shorter side when larger) instead of its 224 eval crop,
    so that the test-time methods crop their random views from the photograph, as the reference augmenter does
    (`streams.images.ImageFiles`); one image a batch then."""
    if setting not in ("reset", "continual"):
        raise ValueError(f"setting must be 'reset' or 'continual', got {setting!r}")
    if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int):
        raise ValueError(f"shuffle_seed must be an int, got {shuffle_seed!r}")
    check_draft(draft)
    tasks = []
    for v in variants:
        root = Path((roots or {}).get(v) or Path(data_root) / FOLDERS[v])
        data = variant_dataset(v, root, image_size, verify_level=verify_level, sh_filter=sh_filter, draft=draft,
                               source_side=source_side)
        if shuffle:
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(shuffle_seed))
            data = _subset(data, order.tolist())
        tasks.append(Task(name=v, space=variant_space(v, templates), boundary=setting == "reset", test=data))
    return TaskStream(tasks, scope="own", name=name or "tta-" + "+".join(variants))


# ------------------------------------------------------------------------------------------ ImageNet-100 CIL
def read_split_file(path: str | Path, image_root: str | Path) -> tuple[list[tuple[str, int]], dict[int, str]]:
    """A DyTox / continuum ImageNet-100 split file (``train_100.txt`` / ``val_100.txt``): lines
    ``<split>/<wnid>/<file> <label>``; the first path component is dropped and the rest joined to ``image_root``
    (continuum's rule). Returns the samples and ``label -> wnid`` (from the paths; one wnid per label enforced)."""
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise DatasetError(f"ImageNet-100 split file {path} not found: get train_100.txt / val_100.txt from the "
                           "continuum v0.1 release (used by DyTox, Continual-CLIP, RAPF) and pass their paths")
    samples, wnid_of = [], {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetError(f"{path}:{n}: expected '<path> <label>', got {line!r}")
        rel, label = parts[0].split("/")[1:], int(parts[1])
        if len(rel) < 2:
            raise DatasetError(f"{path}:{n}: path {parts[0]!r} has no '<split>/<wnid>/<file>' structure")
        if wnid_of.setdefault(label, rel[0]) != rel[0]:
            raise DatasetError(f"{path}:{n}: label {label} is used for both {wnid_of[label]} and {rel[0]}")
        samples.append((str(image_root.joinpath(*rel)), label))
    return samples, wnid_of


def imagenet100_cil(train_split: str | Path, val_split: str | Path, *, data_root: str | Path = "data",
                    increment: int = 10, initial: int = 0, order: str | int | Sequence[int] | None = 1993,
                    templates: str | Sequence[str] = ("a good photo of a {}.",), image_size: int = 224,
                    check_files: bool = True, draft: float | None = None, name: str | None = None) -> TaskStream:
    """ImageNet-100 class-incremental from the DyTox split files; images under ``<data_root>/imagenet/{train,val}``.

    Class names = CLIP names of the wnids found in the split (label k ↔ its wnid). The default order is numpy's
    seed-1993 permutation (68, 56, 78, 8, ...), identical to RAPF's and MoE-Adapters' ``imagenet100.yaml``.
    ``draft``: reduced-size JPEG decoding of train and test images (`streams.images`; None: full size).
    """
    check_draft(draft)
    root = Path(data_root) / "imagenet"
    train, wnid_tr = read_split_file(train_split, root / "train")
    test, wnid_te = read_split_file(val_split, root / "val")
    labels = sorted(wnid_tr)
    if labels != list(range(len(labels))) or wnid_te != {k: wnid_tr[k] for k in wnid_te}:
        raise DatasetError("ImageNet-100 split files disagree: labels must be 0..C-1 with the same wnid in both files")
    if check_files:
        missing = [p for p, _ in train[:1] + test[:1] + train[-1:] + test[-1:] if not Path(p).is_file()]
        if missing:
            raise DatasetError(f"ImageNet images not found (e.g. {missing[0]}): put ILSVRC-2012 train/val in wnid "
                               f"folders under {root}/train and {root}/val")
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    names = imagenet_classnames()
    unknown = [wnid_tr[k] for k in labels if wnid_tr[k] not in index]
    if unknown:
        raise DatasetError(f"split file uses unknown wnids {unknown[:5]}")
    space = LabelSpace([names[index[wnid_tr[k]]] for k in labels], imagenet_templates(templates), name="imagenet100")
    return class_incremental(space, ImageFiles(train, image_size, draft=draft),
                             ImageFiles(test, image_size, draft=draft), increment=increment, initial=initial,
                             order=resolve_order(order, {}, len(labels)),
                             name=name or f"imagenet100-b{initial}inc{increment}")
