"""Image datasets for real benchmarks, in the engine's convention: float ``[3, S, S]`` in [0, 1], ``targets`` exposed.

Every dataset resizes the shorter side to the model's ``image_size`` (bicubic, antialiased) and centre-crops, the
same eval transform as `ctta.Clip.preprocess` (CLIP's Resize + CenterCrop). In-memory datasets (CIFAR pickles,
``.npy`` corruption arrays) resize whole batches at once in ``get_batch``.

With ``draft`` (off by default), JPEG files are decoded at reduced size: libjpeg's scaled IDCT returns the image at
1/2, 1/4 or 1/8 of its size for a fraction of the decoding time, and only a reduction that leaves the shorter side at
least ``draft`` times the target is used, so the antialiased bicubic resize still does the last factor of 2 or more
(Pillow's own ``Image.thumbnail`` rule; its default ``reducing_gap=2.0`` is "very close to fair resampling"). It is
a lever, not a default, because it is not exact: the pixels differ slightly from a full-size decode, and on the
micro-CLIP at 32x32, 25 of 5,000 zero-shot predictions on 400x300 JPEGs changed (same accuracy; loading 1.6-3.5x
faster in process, in two runs on a loaded machine: benchmarks/results/data_throughput*.json). Images the model
sees at about their own size (ViT-B/16 at 224 on 500x375 ImageNet photos) are never reduced anyway. `ImageFiles` can
also hand its raw bytes to `ctta.loading`, which then decodes JPEGs on the GPU (``torchvision.io.decode_jpeg``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ctta.data import RemappedSubset, check_images, is_pil_image, pil_to_rgb
from ctta.loading import stack_images
from ctta.views import check_source_side, crop_params, shrink_to
from ctta.stream import repeated
from streams.manifest import IMAGE_EXTENSIONS, DatasetError, image_files

DRAFT_GAP = 2.0  # the usual ``draft``: reduced-size JPEG decoding keeps the shorter side >= 2x the target
_JPEG_MAGIC = b"\xff\xd8\xff"


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Float images ``[..., 3, H, W]`` in [0, 1] → ``[..., 3, size, size]``: shorter side to ``size`` (bicubic,
    antialiased) then centre crop. A no-op when the images already have that size."""
    if images.shape[-2:] == (size, size):
        return images
    x = TF.resize(images, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(x, [size, size]).clamp_(0, 1)  # bicubic overshoots slightly


def load_image(path: str | Path, draft_to: int | None = None) -> Tensor:
    """Decode an image file to float ``[3, H, W]`` in [0, 1] (every PIL mode converted by `ctta.data.pil_to_rgb`:
    16-bit and float images scaled, alpha composited on white, 0-size images refused). ``draft_to``: a JPEG may be
    decoded at 1/2, 1/4 or 1/8 of its size as long as its shorter side stays at least ``draft_to`` pixels."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if draft_to and im.format == "JPEG":
                w, h = im.size
                short = min(w, h)
                if short >= 2 * draft_to:  # else no reduction is possible: skip the call
                    # Pillow keeps the largest scale 1/s with w // s >= req_w and h // s >= req_h
                    im.draft(None, (max(1, w * draft_to // short), max(1, h * draft_to // short)))
            return pil_to_rgb(im)
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DatasetError(f"{path}: {_unreadable(e)}") from None


def _unreadable(e: Exception) -> str:
    """Why an image file could not be read, in words (PIL's own messages name a BytesIO or nothing at all)."""
    from PIL import UnidentifiedImageError
    if isinstance(e, UnidentifiedImageError):
        return "not an image file in a format PIL reads (empty, text, or another kind of file)"
    return str(e) if isinstance(e, ValueError) else f"the image data cannot be decoded, the file is damaged ({e})"


def check_draft(draft: float | None) -> float | None:
    if draft is not None and (isinstance(draft, bool) or not isinstance(draft, (int, float)) or draft < 1):
        raise ValueError(f"draft must be None (full-size decoding) or a number >= 1 (the reduction gap), got {draft!r}")
    return None if draft is None else float(draft)


class ImageFiles:
    """Images listed as ``(path, label)`` pairs, decoded lazily (in `ctta.loading`'s worker processes when there
    are some). ``draft``: None (full-size decoding, exact) or the reduction gap for JPEGs, e.g. `DRAFT_GAP` (see the
    module docstring).

    ``source_side``: None (default) gives every image resized and centre-cropped to ``image_size``, the model's
    input. An int gives the **whole** image instead, aspect kept, shrunk only when its shorter side is longer than
    ``source_side``: the source the test-time methods' random views are cropped from, as the reference augmenter
    crops them from the photograph (`ctta.views`; view 0, the eval view, is still resize + centre crop). Images then
    differ in size, so a batch holds one (the sample loop's default ``samples.batch_size=1``).

    ``whole``: each image as decoded, for `TrainCrops` to crop (with ``draft``, a JPEG is still decoded at reduced
    size as long as its shorter side stays ``draft`` times ``image_size``, the size the crop is resized to)."""

    in_memory = False
    decodes_on_device = True  # `ctta.loading` may read bytes (`load_encoded`) and decode them on a GPU (`decode`)

    def __init__(self, samples: Sequence[tuple[str | Path, int]], image_size: int, *,
                 draft: float | None = None, source_side: int | None = None, whole: bool = False):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if whole and source_side is not None:
            raise ValueError("whole images are not shrunk: give whole=True or a source_side, not both")
        if source_side is not None:
            check_source_side(source_side, image_size)
        self.paths = [str(p) for p, _ in samples]
        self.targets = torch.tensor([int(y) for _, y in samples], dtype=torch.long)
        self.image_size = int(image_size)
        self.draft = check_draft(draft)
        self.source_side = source_side
        self.whole = bool(whole)

    def __len__(self) -> int:
        return len(self.paths)

    def _draft_to(self) -> int | None:
        side = self.source_side or self.image_size
        return math.ceil(side * self.draft) if self.draft else None

    def _fit(self, x: Tensor) -> Tensor:
        """A decoded image as this dataset gives it: the model's input, the shrunk whole image (``source_side``), or
        the image as decoded (``whole``)."""
        if self.whole:
            return x
        return shrink_to(x, self.source_side) if self.source_side else resize_center_crop(x, self.image_size)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self._fit(load_image(self.paths[i], self._draft_to())), int(self.targets[i])

    def load_encoded(self, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The files at ``indices`` as bytes: one flat ``uint8`` tensor and each file's length (one shared-memory
        block between processes, not one per file), and the labels."""
        blobs = []
        for i in indices.tolist():
            with open(self.paths[i], "rb") as f:
                blobs.append(f.read())
        data = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if any(blobs) else \
            torch.empty(0, dtype=torch.uint8)
        return data, torch.tensor([len(b) for b in blobs], dtype=torch.long), self.targets[indices]

    def decode(self, data: Tensor, lengths: Tensor, device: torch.device | str, indices: Tensor | None = None
               ) -> Tensor:
        """Bytes from `load_encoded` → ``[B, 3, S, S]`` on ``device``: JPEGs by ``torchvision.io.decode_jpeg`` on
        that device (nvJPEG on CUDA, one batched call), other formats — and any JPEG it refuses (CMYK, say) — by PIL
        on the CPU. Full-size decoding: nvJPEG has no reduced-size mode. ``indices`` (those `load_encoded` read)
        let a file that cannot be decoded be named."""
        import io
        import warnings

        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg
        blobs = list(torch.split(data, lengths.tolist()))
        out: list[Tensor | None] = [None] * len(blobs)
        jpeg = [i for i, b in enumerate(blobs) if bytes(b[:3].tolist()) == _JPEG_MAGIC]
        if jpeg:
            try:
                # torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here): the
                # README says so once, rather than a warning per batch
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = decode_jpeg([blobs[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                decoded = [None] * len(jpeg)  # decoded one by one by PIL below
            for i, x in zip(jpeg, decoded):
                if x is not None:
                    out[i] = self._fit(x.float().div_(255))
        for i, x in enumerate(out):
            if x is None:
                try:
                    with Image.open(io.BytesIO(blobs[i].numpy().tobytes())) as im:
                        out[i] = self._fit(pil_to_rgb(im)).to(device)
                except (OSError, ValueError) as e:
                    name = self.paths[int(indices[i])] if indices is not None else f"image {i} of the batch"
                    raise DatasetError(f"{name}: {_unreadable(e)}") from None
        return stack_images(out)


class TensorImages:
    """Images held in memory as ``uint8 [N, 3, h, w]`` (or float in [0, 1]); resized per batch on access."""

    in_memory = True

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
    "0".."999" come out as 0, 1, 10, 100, ...), files sorted within a class, links followed (each real directory
    read once, so a link loop adds nothing: `streams.manifest.image_files`). ``classes`` fixes the folder list and
    its order instead (every listed folder must exist, once). A class folder may be empty (a partial copy; the
    manifest's structure check counts the images). Returns ``(samples, class_folder_names)``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    if classes is None:
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not classes:
            raise DatasetError(f"{root} has no class folders")
    classes = list(classes)
    twice = repeated(classes)
    if twice:
        raise DatasetError(f"{root}: class folders listed more than once: {twice[:5]}")
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        raise DatasetError(f"{root}: missing class folders {missing[:5]}{'...' if len(missing) > 5 else ''}")
    samples = [(f, label) for label, c in enumerate(classes) for f in image_files(root / c)]
    return samples, classes


def image_folder(root: str | Path, image_size: int, classes: Sequence[str] | None = None, *,
                 draft: float | None = None, source_side: int | None = None) -> tuple[ImageFiles, list[str]]:
    """An `ImageFiles` over an ImageFolder tree (see `list_image_folder`) and its class-folder names."""
    samples, names = list_image_folder(root, classes)
    if not samples:
        raise DatasetError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(samples, image_size, draft=draft, source_side=source_side), names


class IndexSubset(RemappedSubset):
    """Positions ``indices`` of a dataset, keeping its labels (``targets`` exposed; batched when the base is): a
    `RemappedSubset` whose new labels are the old ones, so the batching and `ctta.loading` forwarding are its."""

    def __init__(self, base: Any, indices: Sequence[int]):
        keep = torch.as_tensor(list(indices), dtype=torch.long)
        super().__init__(base, keep, torch.as_tensor(base.targets, dtype=torch.long)[keep])


class TrainCrops:
    """Training images as CLIP's train transform makes them (ZSCL ``clip/clip.py::_transform(is_train=True)``,
    open_clip ``image_transform(is_train=True)``, which CoDyRA trains with): ``RandomResizedCrop(size, scale=(0.9,
    1.0), ratio=(3/4, 4/3))`` of the **whole** image, bicubic — so most of the image, squeezed to a square, where the
    eval view is a centre crop of it.

    ``base`` must give whole images (`ImageFiles` with ``whole=True``, `TensorImages` or `WrappedImages` with
    ``image_size=None``; an `IndexSubset` of one). The crop box follows torchvision's sampling rule
    (`ctta.views.crop_params`); the resize is antialiased bicubic on the tensor (PIL's bicubic in the references:
    values differ slightly).

    The crops are a function of the item and the pass, never of a global RNG: item ``i`` in a pass begun with
    `begin_pass` ``(seed)`` is drawn from a generator seeded by both, so the crops do not depend on the number of
    loader workers, and a resumed run draws the ones it would have drawn. The task loop calls ``begin_pass`` before
    each pass over a task's training set with a number derived from the run seed, the task and the pass; without a
    call, pass 0 is used."""

    in_memory = False  # cropped per item (worker processes, when the loader starts some)
    decodes_on_device = False

    def __init__(self, base: Any, size: int, scale: Sequence[float] = (0.9, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        scale, ratio = check_range(scale, "scale", upper=1.0), check_range(ratio, "ratio")
        self.base, self.size, self.scale, self.ratio = base, size, scale, ratio
        self.targets = torch.as_tensor(base.targets, dtype=torch.long)
        self.pass_seed = 0

    def __len__(self) -> int:
        return len(self.base)

    @property
    def augmentation(self) -> str:
        """In words, for a checkpoint's identity (a resume must not switch the crops)."""
        return (f"random resized crops to {self.size} px, scale {self.scale[0]:g}-{self.scale[1]:g}, ratio "
                f"{self.ratio[0]:.4g}-{self.ratio[1]:.4g}")

    def begin_pass(self, seed: int) -> None:
        """Draw this pass's crops from ``seed`` (the task loop's call; see the class docstring)."""
        self.pass_seed = int(seed)

    def crop(self, image: Tensor, i: int) -> Tensor:
        """Item ``i``'s crop of ``image`` (``[3, H, W]`` in [0, 1]) in the current pass: ``[3, size, size]``."""
        g = torch.Generator().manual_seed((self.pass_seed * 1_000_003 + int(i)) % 2 ** 63)
        top, left, h, w = (int(v) for v in crop_params(1, *image.shape[-2:], g, self.scale, self.ratio)[0])
        x = TF.resized_crop(image, top, left, h, w, [self.size, self.size],
                            interpolation=InterpolationMode.BICUBIC, antialias=True)
        return x.clamp_(0, 1)  # bicubic overshoots slightly

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.base[i]
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"item {i}: expected a whole image [3, H, W] to crop, got shape {tuple(image.shape)}")
        return self.crop(image, i), int(label)


def check_range(value: Sequence[float], what: str, upper: float | None = None) -> tuple[float, float]:
    """``(low, high)`` as floats, refused in words unless ``0 < low <= high`` (``<= upper`` when given)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two numbers (low, high), got {value!r}") from None
    if not (0 < lo <= hi) or (upper is not None and hi > upper) or not math.isfinite(hi):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{what} must satisfy 0 < low <= high{bound}, got {value!r}")
    return lo, hi
