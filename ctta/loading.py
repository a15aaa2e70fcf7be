"""How batches reach the model: the one loader behind `iter_batches` and `load_batch`, for every dataset kind.

- **In process** (``workers=0``): `load_batch` per batch, exactly as before this module existed.
- **Worker processes** (a torch ``DataLoader``): each batch is split into up to ``workers`` chunks of consecutive
  positions; a worker loads a chunk with `load_batch` (so an in-memory dataset still answers one ``get_batch`` call
  per chunk, never a Python loop per item), the chunks come back in order and are concatenated. Every image is
  produced by the same code as in process, so the batches are the same tensors whatever the number of workers.
  While the model runs, ``prefetch`` batches are loaded ahead.
- **Determinism.** The loader draws nothing from the global RNG: a ``DataLoader`` seeds its workers from its
  ``generator`` (else from torch's global generator, which would make a training run depend on the worker count), so
  it is given a private one. Datasets must be deterministic functions of the index (every dataset here is).
- **CUDA.** Host batches are pinned and copied with ``non_blocking=True``. A dataset that can hand over its encoded
  files (`streams.images.ImageFiles`: ``decodes_on_device``) is decoded on the device with
  ``torchvision.io.decode_jpeg`` (nvJPEG) when ``device_decode`` allows: the workers only read bytes.

Defaults: `Loading` (``workers=None``: `auto_workers`, from the cores this process may use). `configure_loading`
sets the process's defaults (what ``scripts/run.py``'s ``loading`` block is for); a call may pass its own.
References: torch.utils.data.DataLoader (``prefetch_factor``, ``pin_memory``, worker seeding); torchvision.io.decode_jpeg.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

MIN_CHUNK = 16      # a batch is split across workers only into chunks of at least this many items
MIN_PARALLEL = 64   # auto: calls loading fewer items stay in process (starting workers costs more than it saves)
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class Loading:
    """How `iter_batches` loads. None means auto."""

    workers: int | None = None         # worker processes; None: `auto_workers` (0 for in-memory datasets)
    prefetch: int = 2                  # batches loaded ahead of the one the model is working on (workers > 0)
    device_decode: bool | None = None  # decode JPEG files on the target device; None: when the target is CUDA

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ValueError(f"loading.workers must be a non-negative int or 'auto', got {self.workers!r}")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ValueError(f"loading.prefetch must be a positive int, got {self.prefetch!r}")
        if self.device_decode is not None and not isinstance(self.device_decode, bool):
            raise ValueError(f"loading.device_decode must be true, false or 'auto', got {self.device_decode!r}")


_DEFAULT = Loading()


def _auto(value: Any) -> Any:
    return None if isinstance(value, str) and value.lower() == "auto" else value


def configure_loading(workers: int | str | None = "auto", prefetch: int = 2,
                      device_decode: bool | str | None = "auto") -> Loading:
    """Set this process's loading defaults (``"auto"`` or None: decided per call); returns them.
    They change speed and memory, never the batches (device decoding aside: nvJPEG's pixels may differ from
    libjpeg's by a few levels)."""
    global _DEFAULT
    _DEFAULT = Loading(_auto(workers), prefetch, _auto(device_decode))
    return _DEFAULT


def loading_defaults() -> Loading:
    return _DEFAULT


def usable_cores() -> int:
    """Cores this process may use, divided among torchrun's ranks on this node (``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, cores // ranks)


def in_memory(dataset: Any) -> bool:
    """Does ``dataset`` hold its images in memory (an ``in_memory`` attribute; else: it has a batched
    ``get_batch``)? Workers would only add copies between processes for it."""
    flag = getattr(dataset, "in_memory", None)
    return bool(flag) if flag is not None else hasattr(dataset, "get_batch")


def auto_workers(dataset: Any, n_items: int) -> int:
    """Workers for loading ``n_items`` of ``dataset``: none for in-memory data or small calls, else one per usable
    core (at most 8; none on a single core, where a worker only time-slices with the model)."""
    if in_memory(dataset) or n_items < MIN_PARALLEL:
        return 0
    cores = usable_cores()
    return 0 if cores < 2 else min(cores, MAX_AUTO_WORKERS)


def decodes_on_device(dataset: Any) -> bool:
    return bool(getattr(dataset, "decodes_on_device", False))


# ------------------------------------------------------------------------------------------------- batches
def stack_images(images: Sequence[Tensor]) -> Tensor:
    """One batch of equally sized images; images of several sizes (whole photographs kept for test-time views,
    ``source_side``) are refused with the fix."""
    sizes = {tuple(x.shape) for x in images}
    if len(sizes) > 1:
        raise ValueError(f"a batch holds images of {len(sizes)} sizes (e.g. {sorted(sizes)[:2]}): a stream that keeps "
                         "whole images (source_side) needs one image a batch (samples.batch_size=1)")
    return torch.stack(list(images))


def collate(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return stack_images([x for x, _ in items]), torch.tensor([int(y) for _, y in items], dtype=torch.long)


def load_batch(dataset: Any, indices: Tensor) -> tuple[Tensor, Tensor]:
    """``(images, labels)`` at ``indices`` (the dataset's batched ``get_batch`` when it has one)."""
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    return collate([dataset[int(i)] for i in indices])


def _fetch(dataset: Any, indices: Tensor, encoded: bool) -> tuple[Any, Tensor]:
    """One chunk, as a worker (or the main process) loads it: decoded images, or the files' bytes."""
    if encoded:
        data, lengths, labels = dataset.load_encoded(indices)
        return (data, lengths, indices), labels  # the indices let a failed decode name its file
    return load_batch(dataset, indices)


class _Chunks:
    """The map-style dataset a DataLoader walks: item ``k`` is chunk ``k`` of the call."""

    def __init__(self, dataset: Any, chunks: list[Tensor], encoded: bool):
        self.dataset, self.chunks, self.encoded = dataset, chunks, encoded

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[Any, Tensor]:
        return _fetch(self.dataset, self.chunks[k], self.encoded)


def _to_device(dataset: Any, x: Any, device: torch.device | None, encoded: bool) -> Tensor:
    if encoded:
        data, lengths, indices = x
        return dataset.decode(data, lengths, device=device or torch.device("cpu"), indices=indices)
    if device is None or x.device == device:
        return x
    if device.type == "cuda":
        return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    return x.to(device)


def iter_batches(
    dataset: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    indices: Tensor | None = None,
    batches: Sequence[Tensor] | None = None,
    device: torch.device | str | None = None,
    loading: Loading | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(images, labels, indices)`` batches; ``indices`` are positions in ``dataset`` (for caches).

    The order: ``batches`` (explicit index tensors) if given, else ``indices`` (or a ``generator``-seeded shuffle,
    or ``0..n-1``) cut into ``batch_size`` pieces. ``device``: where images go (labels stay on the CPU); ``loading``:
    this call's options (default: `loading_defaults`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batches is None:
        n = len(dataset)
        order = indices if indices is not None else (
            torch.randperm(n, generator=generator) if shuffle else torch.arange(n))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    else:
        batches = [torch.as_tensor(b, dtype=torch.long) for b in batches]
    opts = loading or _DEFAULT
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    encoded = decodes_on_device(dataset) and (opts.device_decode if opts.device_decode is not None else cuda)
    workers = opts.workers if opts.workers is not None else auto_workers(dataset, sum(len(b) for b in batches))
    if workers == 0 or not batches:
        for idx in batches:
            x, y = _fetch(dataset, idx, encoded)
            yield _to_device(dataset, x, device, encoded), y, idx
        return
    yield from _parallel(dataset, batches, workers, opts.prefetch, device, cuda, encoded)


def _parallel(dataset: Any, batches: list[Tensor], workers: int, prefetch: int, device: torch.device | None,
              cuda: bool, encoded: bool) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    from torch.utils.data import DataLoader
    parts = [max(1, min(workers, len(b) // MIN_CHUNK)) for b in batches]
    chunks = [c for b, k in zip(batches, parts) for c in torch.tensor_split(b, k)]
    # Chunks of each worker are in flight ``prefetch`` at a time: with a batch split across all workers, that is
    # ``prefetch`` batches ahead. batch_size=None: a chunk is already a batch (no collation, no copy).
    loader = DataLoader(_Chunks(dataset, chunks, encoded), batch_size=None, shuffle=False,
                        num_workers=min(workers, len(chunks)), prefetch_factor=prefetch,
                        pin_memory=cuda and not encoded, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    try:
        for idx, k in zip(batches, parts):
            got = [next(it) for _ in range(k)]
            xs = [_to_device(dataset, x, device, encoded) for x, _ in got]
            x = xs[0] if k == 1 else torch.cat(xs)
            y = got[0][1] if k == 1 else torch.cat([y for _, y in got])
            yield x, y, idx
    finally:
        del it  # an abandoned iteration (a training loop's last epoch) shuts its workers down now
