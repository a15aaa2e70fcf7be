"""Atomic result and checkpoint files, and the provenance every result carries.

The file primitives (atomic writes, content-hashed checkpoints, removal of interrupted writes) live in
`ctta.files` and are re-exported here under their public names.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ctta import distributed
from ctta.files import (CorruptFileError, atomic_torch_save, atomic_write, atomic_write_bytes,  # noqa: F401
                        remove_stale_tmp, safe_torch_load)

_PACKAGES = ("ctta", "torch", "torchvision", "open_clip_torch", "kornia", "numpy", "hydra-core", "avalanche-lib")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    data = json.dumps(obj, indent=2, default=_json_default).encode()
    return atomic_write(path, lambda f: f.write(data))


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


def _git(*args: str) -> str | None:
    """Output of ``git args`` in the package's folder, or None (no git, not a checkout)."""
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


_REVISION: dict[str, Any] = {}


def code_revision() -> dict[str, Any]:
    """``git_commit`` (HEAD) and ``git_dirty`` (tracked files differ from it: the results come from uncommitted
    code), read once per process. The first call pins them, so a commit made while a long run goes on is not
    claimed by its results: `JsonResults` and the benchmarks call it when they start. None where not a checkout."""
    if not _REVISION:
        commit = _git("rev-parse", "HEAD") or None
        status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
        _REVISION.update(git_commit=commit, git_dirty=None if status is None else bool(status))
    return dict(_REVISION)


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
        **code_revision(),
        "seed": seed,
        "config": config,
        "distributed": distributed.describe(),
    }
    if model is not None:
        info["model"] = model.provenance()
        info["device"] = device_description(model.device)
    return info
