"""Image datasets for real benchmarks, in the engine's convention: float ``[3, S, S]`` in [0, 1], ``targets`` exposed.

Every dataset resizes the shorter side to the model's ``image_size`` (bicubic, antialiased) and centre-crops, the
same eval transform as `ctta.Clip.preprocess` (CLIP's Resize + CenterCrop). In-memory datasets (CIFAR pickles,
``.npy`` corruption arrays) resize whole batches at once in ``get_batch``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ctta.data import check_images, is_pil_image, pil_to_rgb
from streams.manifest import IMAGE_EXTENSIONS, DatasetError


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Float images ``[..., 3, H, W]`` in [0, 1] → ``[..., 3, size, size]``: shorter side to ``size`` (bicubic,
    antialiased) then centre crop. A no-op when the images already have that size."""
    if images.shape[-2:] == (size, size):
        return images
    x = TF.resize(images, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(x, [size, size]).clamp_(0, 1)  # bicubic overshoots slightly


def load_image(path: str | Path) -> Tensor:
    """Decode an image file to float ``[3, H, W]`` in [0, 1] (every PIL mode converted by `ctta.data.pil_to_rgb`:
    16-bit and float images scaled, alpha composited on white, 0-size images refused)."""
    from PIL import Image
    with Image.open(path) as im:
        try:
            return pil_to_rgb(im)
        except ValueError as e:
            raise DatasetError(f"{path}: {e}") from None


class ImageFiles:
    """Images listed as ``(path, label)`` pairs, decoded lazily."""

    def __init__(self, samples: Sequence[tuple[str | Path, int]], image_size: int):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.paths = [str(p) for p, _ in samples]
        self.targets = torch.tensor([int(y) for _, y in samples], dtype=torch.long)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return resize_center_crop(load_image(self.paths[i]), self.image_size), int(self.targets[i])


class TensorImages:
    """Images held in memory as ``uint8 [N, 3, h, w]`` (or float in [0, 1]); resized per batch on access."""

    def __init__(self, images: Tensor, targets: Tensor | Sequence[int], image_size: int | None = None):
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W]; got {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but {tuple(targets.shape)} labels")
        self.images, self.targets = images, targets
        self.image_size = int(image_size) if image_size else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def _prep(self, x: Tensor) -> Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return resize_center_crop(x, self.image_size) if self.image_size else x

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self._prep(self.images[i]), int(self.targets[i])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self._prep(self.images[indices]), self.targets[indices]


class WrappedImages:
    """Any map-style dataset whose items start with an image (PIL, uint8 or float tensor) and a label — e.g. a
    torchvision dataset or an Avalanche experience — converted to the engine's convention."""

    def __init__(self, base: Any, targets: Tensor | Sequence[int], image_size: int | None = None):
        self.base = base
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        if len(self.targets) != len(base):
            raise ValueError(f"dataset has {len(base)} items but {len(self.targets)} targets")
        self.image_size = int(image_size) if image_size else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        item = self.base[i]
        return to_float_image(item[0], self.image_size, where=f"item {i}"), int(self.targets[i])


def to_float_image(x: Any, image_size: int | None = None, *, where: str = "image") -> Tensor:
    """PIL image / uint8 tensor / float tensor in [0, 1] → float ``[3, H, W]`` (resized if ``image_size``)."""
    if is_pil_image(x):
        x = pil_to_rgb(x)
    elif isinstance(x, Tensor):
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        if x.dim() == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
    else:
        raise TypeError(f"{where}: expected a PIL image or a tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"{where}: expected an image [3, H, W], got shape {tuple(x.shape)}")
    check_images(x[None], what=where)  # finite, in [0, 1]: a normalised or 0-255 dataset is told how to fix it
    return resize_center_crop(x, image_size) if image_size else x


def list_image_folder(root: str | Path, classes: Sequence[str] | None = None
                      ) -> tuple[list[tuple[str, int]], list[str]]:
    """torchvision ``ImageFolder`` semantics: one folder per class, classes sorted **lexicographically** (so folders
    "0".."999" come out as 0, 1, 10, 100, ...), files sorted within a class. ``classes`` fixes the folder list and its
    order instead (every listed folder must exist). Returns ``(samples, class_folder_names)``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    if classes is None:
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not classes:
            raise DatasetError(f"{root} has no class folders")
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        raise DatasetError(f"{root}: missing class folders {missing[:5]}{'...' if len(missing) > 5 else ''}")
    samples: list[tuple[str, int]] = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    return samples, list(classes)


def image_folder(root: str | Path, image_size: int, classes: Sequence[str] | None = None
                 ) -> tuple[ImageFiles, list[str]]:
    """An `ImageFiles` over an ImageFolder tree (see `list_image_folder`) and its class-folder names."""
    samples, names = list_image_folder(root, classes)
    if not samples:
        raise DatasetError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(samples, image_size), names


class IndexSubset:
    """Positions ``indices`` of a dataset, keeping labels (``targets`` exposed; batched when the base is)."""

    def __init__(self, base: Any, indices: Sequence[int]):
        self.base = base
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.targets = torch.as_tensor(base.targets, dtype=torch.long)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.base[int(self.indices[i])]

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        if hasattr(self.base, "get_batch"):
            return self.base.get_batch(self.indices[indices])
        items = [self[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)
