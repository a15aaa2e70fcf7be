"""Datasets and batches.

The engine's image convention: float tensors in [0, 1], shape ``[B, 3, H, W]``, not yet normalised (the model
normalises with its own mean and std). Any map-style dataset returning ``(image, label)`` works; datasets that
also implement ``get_batch(indices)`` (in-memory tensors) are batched without a per-item Python loop. Batches are
produced by `ctta.loading` (worker processes, prefetch, device decoding); `iter_batches` and `load_batch` are
re-exported here.
"""
from __future__ import annotations

import math

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ctta.loading import Loading, collate, configure_loading, iter_batches, load_batch  # noqa: F401 (re-exported)


@runtime_checkable
class Dataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[Tensor, int]: ...


RANGE_TOLERANCE = 1e-3  # float pixels may leave [0, 1] by this much (resampling overshoot) before we refuse them


def _range_hint(lo: float, hi: float) -> str:
    """How to bring pixels spanning ``[lo, hi]`` into [0, 1]."""
    if lo < -RANGE_TOLERANCE:
        return ("looks normalised (mean/std already applied): pass images in [0, 1] and drop any Normalize "
                "transform — the model normalises with its own mean and std")
    if hi <= 255 + RANGE_TOLERANCE:
        return "looks like 0-255: divide by 255"
    if hi <= 65535 + RANGE_TOLERANCE:
        return "looks like 16-bit: divide by 65535"
    return "rescale the images into [0, 1]"


def _dtype_hint(dtype: torch.dtype) -> str:
    if dtype == torch.uint8:
        return " (8-bit: use images.float() / 255)"
    if dtype == torch.bool:
        return " (use images.float())"
    if dtype in (torch.int16, torch.uint16, torch.int32, torch.int64):
        return " (convert with images.float() / the bit depth's maximum, e.g. 255 for 8-bit or 65535 for 16-bit data)"
    return ""


def check_images(images: Tensor, *, what: str = "images") -> Tensor:
    """Validate an image batch: a float tensor ``[B, 3, H, W]``, ``B, H, W > 0``, finite values in [0, 1] (within
    `RANGE_TOLERANCE`). Returns it unchanged; raises with how to fix the input otherwise."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{what} must have shape [B, 3, H, W]; got rank {images.dim()} shape {tuple(images.shape)}"
                         + (" (add a batch dimension with images[None])" if images.dim() == 3 else ""))
    if images.shape[1] != 3:
        raise ValueError(f"{what} must have 3 channels (RGB) in dim 1; got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{what} have zero size {tuple(images.shape[2:])}: there is nothing to classify")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be a float tensor in [0, 1]; got dtype {images.dtype}{_dtype_hint(images.dtype)}")
    # one reduction (and one device sync): min and max carry a NaN or an inf through, so finite bounds mean finite
    # values everywhere; only then are the bad images counted
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        raise ValueError(f"{what} contain non-finite values (NaN or inf) in {bad} of {images.shape[0]} images")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{what} must be in [0, 1]; values span [{lo:.4g}, {hi:.4g}]: {_range_hint(lo, hi)}")
    return images


def check_labels(labels: Tensor, n_images: int, n_classes: int, *, what: str = "labels") -> Tensor:
    """Validate a training batch's labels: an integer tensor ``[B]`` (``B = n_images``) of class indices in
    ``[0, n_classes)``. Cross-entropy would otherwise skip ``-100`` (its ignore index) without a word and fail on
    other values deep in a kernel. Returns it unchanged."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dim() != 1 or len(labels) != n_images:
        raise ValueError(f"{what} must have shape [{n_images}] (one class index per image), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor of class indices, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"{what} must index the {n_classes} classes of the training label space, got values in "
                         f"[{lo}, {hi}]")
    return labels


def is_pil_image(x: object) -> bool:
    """Is ``x`` a PIL image (checked without importing PIL when it is not loaded)?"""
    import sys
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(x, pil.Image)


def _scale_by_range(a: np.ndarray, mode: str) -> np.ndarray:
    """Integer ("I") or float ("F") pixels to [0, 1]: by the bit depth their range reveals (≤ 1 for floats: already
    [0, 1]; ≤ 255: 8-bit; ≤ 65535: 16-bit), else stretched by their own min and max."""
    if not np.isfinite(a).all():
        raise ValueError(f"PIL image (mode {mode!r}) holds non-finite pixel values")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and mode == "F" and hi <= 1:
        return a
    for top in (255.0, 65535.0):
        if lo >= 0 and hi <= top:
            return a / top
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def pil_to_rgb(image) -> Tensor:
    """A PIL image of any mode → float RGB ``[3, H, W]`` in [0, 1], the engine's convention.

    - 8-bit modes (``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``): PIL's conversion,
      divided by 255.
    - 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): divided by 65535 (its bit depth) — PIL's own RGB
      conversion clips at 255, turning most 16-bit images white.
    - ``I`` (32-bit int) and ``F`` (float): scaled by the range the values reveal (see `_scale_by_range`), never
      clipped.
    - Alpha (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, ``P`` with a transparent colour): composited **on white**,
      as a viewer shows it (dropping alpha would expose whatever colour transparent pixels happen to store, often
      black).
    A 0-size image is refused.
    """
    w, h = image.size
    if w == 0 or h == 0:
        raise ValueError(f"image has size {w}x{h} (mode {image.mode!r}): there is nothing to classify")
    try:
        image.load()  # decode now, so that a damaged file is not reported as a failed conversion
    except OSError as e:
        raise ValueError(f"the image data cannot be decoded, the file is damaged or truncated ({e})") from None
    mode = image.mode
    if mode.startswith("I;16"):
        a = np.asarray(image).astype(np.float32) / 65535.0
        return torch.from_numpy(a)[None].expand(3, -1, -1).contiguous()
    if mode in ("I", "F"):
        a = _scale_by_range(np.asarray(image).astype(np.float64), mode).astype(np.float32)
        return torch.from_numpy(a)[None].expand(3, -1, -1).contiguous()
    alpha = mode in ("LA", "La", "PA", "RGBA", "RGBa") or (mode == "P" and "transparency" in image.info)
    if mode == "La":  # premultiplied grey + alpha: PIL converts it only to LA
        image = image.convert("LA")
    try:
        a = np.asarray(image.convert("RGBA" if alpha else "RGB"), dtype=np.float32) / 255.0
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {e}") from None
    x = torch.from_numpy(a).permute(2, 0, 1)
    if alpha:
        rgb, a = x[:3], x[3:]
        x = rgb * a + (1 - a)  # over a white background
    return x.contiguous()


class ImageTensorDataset:
    """Images held in memory as one tensor (uint8 or float in [0, 1]) with integer labels."""

    in_memory = True  # `ctta.loading`: loaded in process (workers would only copy tensors between processes)

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
        return collate([self[int(i)] for i in indices])

    # `ctta.loading` reads these through the subset: how the base is stored and whether it decodes on a device
    @property
    def in_memory(self) -> bool:
        from_base = getattr(self.base, "in_memory", None)
        return bool(from_base) if from_base is not None else hasattr(self.base, "get_batch")

    @property
    def decodes_on_device(self) -> bool:
        return bool(getattr(self.base, "decodes_on_device", False))

    def load_encoded(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        data, lengths, _ = self.base.load_encoded(self.indices[indices])
        return data, lengths, self.targets[indices]

    def decode(self, data: Tensor, lengths: Tensor, device: Any, indices: Tensor | None = None) -> Tensor:
        base = self.indices[indices] if indices is not None else None  # the base's positions, to name a bad file
        return self.base.decode(data, lengths, device=device, indices=base)


def dataset_targets(dataset: Dataset) -> Tensor:
    """All labels of a dataset: its ``targets`` attribute when present (torchvision's convention), else read."""
    t = getattr(dataset, "targets", None)
    if t is not None:
        return torch.as_tensor(t, dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)
