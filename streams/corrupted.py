"""Corruption benchmarks on disk (CIFAR-100-C, ImageNet-C), or generated on the fly when no copy exists.

On disk (Hendrycks & Dietterich 2019 releases):

- CIFAR-100-C: ``<root>/CIFAR-100-C/<corruption>.npy`` — uint8 ``[50000, 32, 32, 3]``, severities 1..5 stacked
  (rows ``(s-1)*10000 : s*10000``), each block the 10000 CIFAR-100 test images in test-set order; ``labels.npy``.
- ImageNet-C: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG`` (1000 wnid folders).

Generated (``source="generate"``, or ``"auto"`` when the ``.npy`` is missing): the clean CIFAR-100 test set is
corrupted with `streams.corruptions.corrupt` (kornia, batched, seeded). That is an **approximation** of the released
data: the corruption families and severities follow ImageNet-C's spirit, not its exact parameters, and only the
corruptions `streams.corruptions.CORRUPTIONS` implements can be generated. Numbers on generated data are not
comparable with published CIFAR-100-C tables.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from ctta.stream import LabelSpace, Task, TaskStream
from streams.cifar import check_cifar_arrays, cifar100_space, cifar_root, read_cifar100
from streams.images import TensorImages, check_draft, image_folder
from streams.manifest import DatasetError, manifests
from streams.imagenet import imagenet_wnids, variant_space

HENDRYCKS_15 = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                "jpeg_compression")
GENERATED_NAME = {"jpeg_compression": "jpeg"}  # release name -> streams.corruptions name
PER_SEVERITY = 10000


def read_cifar100_c(root: str | Path, corruption: str, severity: int, *, n: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 [N, 3, 32, 32], labels [N])`` of one corruption at one severity from the release ``.npy`` files."""
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    folder = Path(root).expanduser() / "CIFAR-100-C"
    path, lab = folder / f"{corruption}.npy", folder / "labels.npy"
    m = manifests()["cifar100_c"]
    for p in (path, lab):
        if not p.is_file():
            raise DatasetError(f"CIFAR-100-C: missing {p}. Download {m.source} ({m.archive}); {m.layout}")
    arr, labels = _load_npy(path), _load_npy(lab)  # 150 MB per corruption: memory-mapped, the block read alone
    if arr.ndim != 4 or arr.shape[1:] != (32, 32, 3) or arr.shape[0] != 5 * PER_SEVERITY or len(labels) != len(arr):
        raise DatasetError(f"{path}: shape {arr.shape} (labels {labels.shape}) is not the release's "
                           f"[{5 * PER_SEVERITY}, 32, 32, 3]")
    lo = (severity - 1) * PER_SEVERITY
    hi = lo + (min(n, PER_SEVERITY) if n is not None else PER_SEVERITY)
    block, block_labels = check_cifar_arrays(path, np.array(arr[lo:hi]), np.array(labels[lo:hi]), 100, lab)
    x = torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(block_labels.astype(np.int64))


def _load_npy(path: Path) -> np.ndarray:
    """A memory-mapped ``.npy`` array; never unpickled (an object array is refused), a bad file named."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        what = ("not in .npy format, or an object array: reading it would unpickle it, which is never done"
                if "allow_pickle" in str(e) else str(e))
        raise DatasetError(f"{path}: not a CIFAR-100-C .npy array ({what})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot be read as a .npy array ({e})") from None


def generate_cifar100_c(clean_root: str | Path, corruption: str, severity: int, *, n: int | None = None,
                        seed: int = 0, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """An on-the-fly approximation of CIFAR-100-C from the clean test set (see the module docstring)."""
    from streams.corruptions import CORRUPTIONS, corrupt
    name = GENERATED_NAME.get(corruption, corruption)
    if name not in CORRUPTIONS:
        raise DatasetError(f"{corruption!r} cannot be generated (available: {list(CORRUPTIONS)}); download "
                           f"CIFAR-100-C for the full set: {manifests()['cifar100_c'].source}")
    images, labels = read_cifar100(clean_root, "test")
    images, labels = images[:n], labels[:n]
    k = HENDRYCKS_15.index(corruption) if corruption in HENDRYCKS_15 else 0
    g = torch.Generator().manual_seed(seed * 1009 + severity * 31 + k)  # one stream per (corruption, severity)
    out = [(corrupt(images[i:i + chunk].float().div(255), name, severity, generator=g) * 255).round().to(torch.uint8)
           for i in range(0, len(images), chunk)]
    return torch.cat(out), labels


def cifar100_c_stream(data_root: str | Path = "data", *, corruptions: Sequence[str] = HENDRYCKS_15,
                      severity: int = 5, source: Literal["disk", "generate", "auto"] = "auto",
                      setting: Literal["reset", "continual"] = "continual", n: int | None = None,
                      templates: str | Sequence[str] = "continual_clip", image_size: int = 224, seed: int = 0,
                      name: str | None = None) -> TaskStream:
    """One test-only task per corruption, 100-way CIFAR-100 label space. ``setting="continual"`` hides the shifts
    (continual test-time adaptation); ``"reset"`` reveals them. ``n`` keeps the first n images of each domain."""
    if source not in ("disk", "generate", "auto"):
        raise ValueError(f"source must be 'disk', 'generate' or 'auto', got {source!r}")
    root = Path(data_root).expanduser()
    space = cifar100_space(templates)
    tasks = []
    for c in corruptions:
        on_disk = (root / "CIFAR-100-C" / f"{c}.npy").is_file()
        if source == "disk" or (source == "auto" and on_disk):
            x, y = read_cifar100_c(root, c, severity, n=n)
        else:
            x, y = generate_cifar100_c(cifar_root(root), c, severity, n=n, seed=seed)
        tasks.append(Task(name=f"{c}-{severity}", space=space, test=TensorImages(x, y, image_size),
                          boundary=setting == "reset"))
    return TaskStream(tasks, scope="own", name=name or f"cifar100c-{setting}-s{severity}")


def imagenet_c_stream(root: str | Path, *, corruptions: Sequence[str] = HENDRYCKS_15, severity: int = 5,
                      setting: Literal["reset", "continual"] = "continual", image_size: int = 224,
                      templates: str | Sequence[str] = "tpt", name: str | None = None,
                      draft: float | None = None) -> TaskStream:
    """ImageNet-C from ``<root>/<corruption>/<severity>/<wnid>/``; 1000-way label space in sorted-wnid order.
    ``draft``: reduced-size JPEG decoding (`streams.images.ImageFiles`; off by default)."""
    check_draft(draft)  # before any folder is walked
    space: LabelSpace = variant_space("imagenet", templates)
    wnids = imagenet_wnids()
    tasks = []
    for c in corruptions:
        folder = Path(root).expanduser() / c / str(severity)
        if not folder.is_dir():
            raise DatasetError(f"ImageNet-C: missing {folder}. Download the corruption tars from "
                               "https://zenodo.org/records/2235448 and extract them under the root")
        data, _ = image_folder(folder, image_size, classes=wnids, draft=draft)
        tasks.append(Task(name=f"{c}-{severity}", space=space, test=data, boundary=setting == "reset"))
    return TaskStream(tasks, scope="own", name=name or f"imagenetc-{setting}-s{severity}")
