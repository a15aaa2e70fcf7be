"""Datasets and batches.

The engine's image convention: float tensors in [0, 1], shape ``[B, 3, H, W]``, not yet normalised (the model
normalises with its own mean and std). Any map-style dataset returning ``(image, label)`` works; datasets that
also implement ``get_batch(indices)`` (in-memory tensors) are batched without a per-item Python loop.
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Dataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[Tensor, int]: ...


def check_images(images: Tensor, *, what: str = "images") -> Tensor:
    """Validate an image batch: a float tensor ``[B, 3, H, W]`` with finite values. Returns it unchanged."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{what} must have shape [B, 3, H, W]; got rank {images.dim()} shape {tuple(images.shape)}"
                         + (" (add a batch dimension with images[None])" if images.dim() == 3 else ""))
    if images.shape[1] != 3:
        raise ValueError(f"{what} must have 3 channels (RGB) in dim 1; got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be a float tensor in [0, 1]; got dtype {images.dtype}"
                        + (" (divide uint8 images by 255)" if images.dtype == torch.uint8 else ""))
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise ValueError(f"{what} contain non-finite values (NaN or inf) in {bad} of {images.shape[0]} images")
    return images


class ImageTensorDataset:
    """Images held in memory as one tensor (uint8 or float in [0, 1]) with integer labels."""

    def __init__(self, images: Tensor, labels: Tensor | Sequence[int]):
        labels = torch.as_tensor(labels, dtype=torch.long)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W]; got {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images, self.targets = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def _float(self, x: Tensor) -> Tensor:
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self._float(self.images[i]), int(self.targets[i])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self._float(self.images[indices]), self.targets[indices]


class RemappedSubset:
    """A subset of a dataset whose labels are mapped to new ids (e.g. a task's local labels)."""

    def __init__(self, base: Dataset, indices: Sequence[int], labels: Sequence[int]):
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.targets = torch.as_tensor(labels, dtype=torch.long)

    @classmethod
    def by_classes(cls, base: Dataset, targets: Tensor, remap: dict[int, int]) -> "RemappedSubset":
        keep = [i for i, y in enumerate(targets.tolist()) if y in remap]
        return cls(base, keep, [remap[int(targets[i])] for i in keep])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, _ = self.base[int(self.indices[i])]
        return image, int(self.targets[i])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        if hasattr(self.base, "get_batch"):
            images, _ = self.base.get_batch(self.indices[indices])
            return images, self.targets[indices]
        return _collate([self[int(i)] for i in indices])


def dataset_targets(dataset: Dataset) -> Tensor:
    """All labels of a dataset: its ``targets`` attribute when present (torchvision's convention), else read."""
    t = getattr(dataset, "targets", None)
    if t is not None:
        return torch.as_tensor(t, dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def _collate(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.long)


def iter_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    indices: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(images, labels, indices)`` batches; ``indices`` are positions in ``dataset`` (for caches)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(dataset)
    order = indices if indices is not None else (
        torch.randperm(n, generator=generator) if shuffle else torch.arange(n))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        x, y = load_batch(dataset, idx)
        yield x, y, idx


def load_batch(dataset: Dataset, indices: Tensor) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` at ``indices`` (the dataset's batched ``get_batch`` when it has one)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    return _collate([dataset[int(i)] for i in indices])
