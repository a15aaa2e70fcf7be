"""Atomic result and checkpoint files, and the provenance every result carries."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ctta import distributed

_PACKAGES = ("ctta", "torch", "torchvision", "open_clip_torch", "kornia", "numpy", "hydra-core", "avalanche-lib")


def _atomic(path: str | Path, write) -> Path:
    """Write through a temporary file in the same directory, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    data = json.dumps(obj, indent=2, default=_json_default).encode()
    return _atomic(path, lambda f: f.write(data))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    return _atomic(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def provenance(model=None, *, seed: int | None = None, config: Any = None) -> dict[str, Any]:
    """Package versions, model arch and weights (tag or checkpoint hash), config, seed, device, code revision."""
    info: dict[str, Any] = {
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "seed": seed,
        "config": config,
        "distributed": distributed.describe(),
    }
    if model is not None:
        info["model"] = model.provenance()
        info["device"] = device_description(model.device)
    return info
