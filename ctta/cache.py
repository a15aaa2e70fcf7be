"""A feature cache for frozen image encoders: each distinct image is encoded once per run.

Strategies whose image tower is frozen (zero-shot, RAPF, TDA-like caches) see the same images many times: every
epoch, every evaluation of the T×T accuracy matrix, every retention check. `FeatureCache` memoises the *raw* pooled
image features (``model.net.encode_image`` of the normalised input: un-normalised, pre-adapter, float32), so a
strategy can normalise or adapt them afterwards.

Design:

- **Content-addressed keys.** Each image is keyed by a BLAKE2b digest of its float32 bytes. No dataset indices have
  to be threaded through the runner, it works for any dataset, and it is exact: an image that differs in one bit
  (another augmentation, another preprocessing) is another key. Hashing costs ~30 µs per 32×32 image on one core.
- **Weights fingerprint.** The cache is valid for one state of the image tower: the identity, storage pointer and
  in-place version counter of every ``visual.*`` parameter and buffer, plus the model's normalisation buffers
  (as `Clip._text_version` does for the text head). An optimizer step, ``load_state_dict``, ``copy_``, a LoRA merge
  or ``p.data = ...`` changes it and the next call starts afresh (``invalidations`` counts it).
- **Deterministic features.** Misses are encoded in eval mode under ``no_grad`` (dropout off), whatever mode the
  model is in; a cache is only meaningful for deterministic inputs (eval transform), as RAPF's reference trains on.
- **Bounded memory.** ``max_items`` caps the entries (least recently used evicted); ``None`` = unbounded
  (D·4 bytes per distinct image: 512 B for the micro-CLIP, 2 KiB for ViT-B/16).
- **Under torchrun**, evaluation is sharded by whole batches (`ctta.loop.parallel.evaluation_share`): each rank's
  cache fills with its own share of every evaluation set, the same share at every evaluation, so each image is
  still encoded once per run, by one rank, and no features cross processes.
- **Persistence.** `save` / `load` write the entries with a SHA-256 of the image tower's weights, normalisation and
  input size; a file made for other weights is refused. Dataset identity and preprocessing need no key: they are in
  the image bytes.

Cost of a lookup: a device-to-host copy of the batch (on CUDA) and the hash, ~30 µs for a 32×32 image and ~0.5 ms
for a 224×224 one (spread over up to 8 threads), against a full image-tower forward for a miss.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ctta.data import check_images
from ctta.io import atomic_torch_save, safe_torch_load
from ctta.loading import usable_cores
from ctta.model import Clip

_DIGEST = 16  # bytes of BLAKE2b per image key (collision odds ~2^-64 at 2^32 images)
_THREADED_BYTES = 1 << 17  # images at least this big are hashed in parallel
_POOL: ThreadPoolExecutor | None = None


@torch.no_grad()
def encode_raw(model: Clip, images: Tensor) -> Tensor:
    """Raw pooled image features ``[B, D]`` (float32, not L2-normalised) in eval mode, without gradients.
    ``F.normalize`` of this equals ``model.encode_image(images)`` in eval mode."""
    with model.eval_mode():
        return model.net.encode_image(model.normalize(images)).float()


def image_keys(images: Tensor) -> list[bytes]:
    """One content key per image: BLAKE2b of its float32 bytes (shape included, so layouts cannot collide).
    Large images (ViT-B/16's 224×224: 600 KB each) are hashed on a thread pool: hashlib releases the GIL."""
    arr = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
    salt = repr(tuple(arr.shape[1:])).encode()[:16].ljust(16, b" ")

    def key(a: np.ndarray) -> bytes:
        return hashlib.blake2b(memoryview(a), digest_size=_DIGEST, salt=salt).digest()

    if arr[0].nbytes < _THREADED_BYTES or len(arr) < 4:
        return [key(a) for a in arr]
    return list(_pool().map(key, arr))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        # the cores of this rank (torchrun's ranks on one node share them), not of the machine
        _POOL = ThreadPoolExecutor(max_workers=min(8, usable_cores()), thread_name_prefix="ctta-hash")
    return _POOL


def visual_fingerprint(model: Clip) -> tuple:
    """Changes whenever a weight of the image tower (or the input normalisation) may have changed."""
    tensors = [t for n, t in model.net.named_parameters() if n.startswith("visual.")]
    tensors += [t for n, t in model.net.named_buffers() if n.startswith("visual.")]
    tensors += [model.mean, model.std]
    return (id(model), model.image_size) + tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def weights_hash(model: Clip) -> str:
    """SHA-256 of the image tower's weights, normalisation and input size (stable across processes)."""
    h = hashlib.sha256(f"{model.image_size}".encode())
    items = [(n, t) for n, t in model.net.state_dict().items() if n.startswith("visual.")]
    items += [("mean", model.mean), ("std", model.std)]
    for n, t in items:
        h.update(n.encode())
        h.update(np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()).tobytes())
    return h.hexdigest()


class FeatureCache:
    """Memo of raw image features under a frozen image tower (see the module docstring).

    >>> cache = FeatureCache()
    >>> feats = cache.encode(model, images)   # [B, D] raw features; misses are encoded in one forward
    """

    def __init__(self, max_items: int | None = None, *, storage_device: str | torch.device | None = None):
        if max_items is not None and max_items <= 0:
            raise ValueError(f"max_items must be positive or None, got {max_items}")
        self.max_items = max_items
        self.storage_device = None if storage_device is None else torch.device(storage_device)
        self.hits = self.misses = self.forwards = self.encoded = self.invalidations = self.evictions = 0
        self._rows: OrderedDict[bytes, int] = OrderedDict()  # key -> row of _store, in LRU order
        self._store: Tensor | None = None
        self._fingerprint: tuple | None = None

    # ----------------------------------------------------------------------------------------- main entry
    def encode(self, model: Clip, images: Tensor) -> Tensor:
        """Raw features ``[B, D]`` on the model's device; only images not cached yet go through the encoder."""
        check_images(images)
        self._validate(model)
        keys = image_keys(images)
        rows = [self._rows.get(k) for k in keys]
        todo = list(dict.fromkeys(k for k, r in zip(keys, rows) if r is None))  # unique misses, in order
        n_hit = sum(r is not None for r in rows)
        self.hits += n_hit
        self.misses += len(keys) - n_hit
        new: dict[bytes, Tensor] = {}
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first position of each key
            feats = encode_raw(model, images[torch.tensor([first[k] for k in todo], device=images.device)])
            self.forwards += 1
            self.encoded += len(todo)
            new = dict(zip(todo, feats))
        if n_hit:
            for k, r in zip(keys, rows):
                if r is not None:
                    self._rows.move_to_end(k)  # LRU touch
            hit_idx = torch.tensor([r for r in rows if r is not None], device=self._store.device)
            hit_feats = iter(self._store[hit_idx].to(model.device))
        out = [new[k] if r is None else next(hit_feats) for k, r in zip(keys, rows)]
        if new:
            self._insert(list(new), torch.stack(list(new.values())))
        return torch.stack(out)

    __call__ = encode

    # ----------------------------------------------------------------------------------------- bookkeeping
    def _validate(self, model: Clip) -> None:
        fp = visual_fingerprint(model)
        if fp != self._fingerprint:
            if self._rows:
                self.invalidations += 1
            self._drop()
            self._fingerprint = fp

    def _drop(self) -> None:
        self._rows.clear()
        self._store = None

    def _insert(self, keys: list[bytes], feats: Tensor) -> None:
        if self.max_items is not None and len(keys) > self.max_items:
            keys, feats = keys[-self.max_items:], feats[-self.max_items:]
        dev = self.storage_device or feats.device
        if self._store is None:
            self._store = torch.empty(0, feats.shape[1], dtype=feats.dtype, device=dev)
        rows = []
        for _ in keys:
            if self.max_items is not None and len(self._rows) + len(rows) >= self.max_items:
                _, r = self._rows.popitem(last=False)  # evict the least recently used
                self.evictions += 1
                rows.append(r)
            else:
                rows.append(len(self._rows) + len(rows))
        need = max(rows) + 1
        if need > self._store.shape[0]:  # grow geometrically: amortised O(1) per insert
            cap = max(need, 2 * self._store.shape[0], 1024)
            if self.max_items is not None:
                cap = min(cap, self.max_items)
            grown = torch.empty(cap, feats.shape[1], dtype=feats.dtype, device=dev)
            grown[: self._store.shape[0]] = self._store
            self._store = grown
        self._store[torch.tensor(rows, device=dev)] = feats.to(dev)
        self._rows.update(zip(keys, rows))

    def clear(self) -> None:
        """Forget every entry (counters are kept)."""
        self._drop()
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self._rows)

    def stats(self) -> dict[str, int | float]:
        looked = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / looked if looked else 0.0,
                "forwards": self.forwards, "encoded": self.encoded, "entries": len(self),
                "invalidations": self.invalidations, "evictions": self.evictions}

    # ----------------------------------------------------------------------------------------- persistence
    def save(self, path: str | Path, model: Clip) -> Path:
        """Write the entries, tagged with `weights_hash` of ``model`` (whose features they must be)."""
        self._validate(model)
        keys = list(self._rows)
        rows = torch.tensor([self._rows[k] for k in keys], dtype=torch.long)
        feats = self._store[rows.to(self._store.device)].cpu() if keys else torch.empty(0, 0)
        key_tensor = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(-1, _DIGEST) \
            if keys else torch.empty(0, _DIGEST, dtype=torch.uint8)
        return atomic_torch_save(path, {"weights_hash": weights_hash(model), "keys": key_tensor, "features": feats})

    def load(self, path: str | Path, model: Clip) -> int:
        """Add the entries of a file written by `save` for the same image-tower weights; returns how many.
        Raises ``ValueError`` if the file belongs to other weights (its features would be wrong)."""
        doc = safe_torch_load(path)
        if doc.get("weights_hash") != weights_hash(model):
            raise ValueError(f"feature cache {path} was made with other image-encoder weights or preprocessing; "
                             "delete it or point to another file")
        self._validate(model)
        keys = [bytes(row.tolist()) for row in doc["keys"]]
        if keys:
            self._insert(keys, doc["features"].to(self.storage_device or model.device))
        return len(keys)
