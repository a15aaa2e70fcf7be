"""What a deployment sets (`ServeOptions`) and the one error type every refused request becomes (`ServeError`).

Nothing here imports the web stack: the options are checked (and their mistakes reported) before a server exists.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

FORMATS = ("JPEG", "PNG", "WEBP")  # what /predict decodes; anything else is 415


class ServeError(Exception):
    """A request the server refuses: HTTP ``status``, a stable machine-readable ``kind`` (also the label of the
    ``ctta_errors_total`` metric) and a message that names the problem. The JSON body is
    ``{"error": {"kind": ..., "message": ...}}``."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def body(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": self.message}}


class StateError(RuntimeError):
    """The state file at start-up is corrupt, truncated or belongs to another adapter (strategy, configuration,
    label space or model differ): refused before the server listens, so a deployment never serves a wrong state."""


@dataclass
class ServeOptions:
    """How the server batches, limits and persists. Defaults suit the bundled micro-CLIP on a CPU."""

    max_batch: int = 32                 # images per model call (micro-batch), at most
    max_wait_ms: float = 5.0            # how long a batch waits for more requests after its first one
    max_queue: int = 256                # images queued for the model; beyond that /predict answers 503
    max_body_bytes: int = 8 << 20       # request body limit (413 beyond)
    max_pixels: int = 4096 * 4096       # width x height of one image, checked from its header before decoding, and
    #                                     of it resized for the model (a 1 x 300000 strip would grow 32 x) (413)
    max_request_pixels: int = 2 * 4096 * 4096  # all images of one request together (413 beyond)
    max_decoding: int = 2               # requests decoded at once: with max_request_pixels, bounds decoding memory
    read_timeout_s: float = 30.0        # a request body must arrive within this (408 beyond): a stalled upload
    max_images: int | None = None       # images in one multipart request (413 beyond); None: max_batch (at most that)
    top_k: int = 5                      # classes returned per image unless the request asks for another top_k
    state_path: str | None = None       # adapted state: loaded at start if present, written on SIGTERM and /snapshot
    snapshot_every_s: float | None = None  # periodic snapshot (only when the state moved); None: off
    window: int = 256                   # samples in the drift window (mean entropy / confidence gauges)
    drain_timeout_s: float | None = 25.0  # on SIGTERM, wait at most this long for open requests (None: no bound),
    #                                       then serve what is queued and write the state (under k8s' default 30 s)

    def __post_init__(self) -> None:
        if self.max_images is None:
            self.max_images = self.max_batch
        ints = {"max_batch": 1, "max_queue": 1, "max_body_bytes": 1, "max_pixels": 1, "max_request_pixels": 1,
                "max_decoding": 1, "max_images": 1, "top_k": 1, "window": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"serve.{name} must be an integer >= {low}, got {v!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not 0 <= self.max_wait_ms <= 1000:
            raise ValueError(f"serve.max_wait_ms must be a number of milliseconds in [0, 1000], "
                             f"got {self.max_wait_ms!r}")
        for name in ("snapshot_every_s", "drain_timeout_s", "read_timeout_s"):
            v = getattr(self, name)
            if v is None and name != "read_timeout_s":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:  # NaN fails too
                raise ValueError(f"serve.{name} must be a positive, finite number of seconds"
                                 f"{'' if name == 'read_timeout_s' else ' or null'}, got {v!r}")
        if self.state_path is not None and not str(self.state_path).strip():
            raise ValueError("serve.state_path is empty: give the state file's path, or null for no state file")
        if self.max_images > self.max_batch:
            raise ValueError(f"serve.max_images ({self.max_images}) exceeds serve.max_batch ({self.max_batch}): one "
                             f"request would be a model call larger than max_batch; lower max_images or raise "
                             f"max_batch")
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(f"serve.max_request_pixels ({self.max_request_pixels}) is below serve.max_pixels "
                             f"({self.max_pixels}): a single image at the limit could never be sent")
        if self.snapshot_every_s is not None and self.state_path is None:
            raise ValueError("serve.snapshot_every_s needs serve.state_path (where the snapshots go)")
        if self.max_images > self.max_queue:
            raise ValueError(f"serve.max_images ({self.max_images}) exceeds serve.max_queue ({self.max_queue}): "
                             f"such a request could never be queued")
        if self.state_path is not None:
            parent = Path(self.state_path).expanduser().resolve().parent
            if parent.exists() and not parent.is_dir():
                raise ValueError(f"serve.state_path={self.state_path}: {parent} is not a folder")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ServeOptions":
        """Options from a plain mapping (a config section); an unknown key is refused with the accepted ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serve option(s) {unknown}; accepted: {sorted(known)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
