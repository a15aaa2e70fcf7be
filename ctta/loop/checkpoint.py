"""The one save/resume of both loops: a run's fingerprint, its states, the RNG, the hooks and the results.

A checkpoint is one content-hashed file written atomically (`ctta.io.atomic_torch_save`: a reader never sees a
partial file, a flipped byte is refused on load) and read with ``weights_only=True``. Re-running with the same output
folder resumes from it; a checkpoint of another run (other stream, strategy, seed, batch size...) is refused with the
fields that differ, before anything is written into the folder. Under torchrun rank 0 reads it and sends it on.

A checkpoint is read once per attempt: scripts/run.py reads it early, to refuse a foreign one before it writes into
the folder or loads weights, with ``hold=True``; the loop's own `Checkpoint.read` of the same, unchanged file then
takes that state instead of hashing and unpickling the file a second time (a ViT-B-size checkpoint is gigabytes).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ctta.distributed import to_device
from ctta.files import CorruptFileError, probe_writable
from ctta.io import atomic_torch_save, safe_torch_load
from ctta.loop.parallel import Parallel
from ctta.state import differences, strategy_config

FORMAT = 4  # 3: the fingerprint names each task's classes and labels, and the model; 4: training crops, the retention
#            controls, and the sample loop's reset_on_shift too

# States read early with ``hold=True``, for the loop's read of the same file: path -> (file identity, state on CPU).
# Taken once; `drop_held` forgets them (run.py, when the attempt ends without the loop taking its state).
_held: dict[Path, tuple[tuple[int, int, int], dict]] = {}


class RunMismatch(ValueError):
    """The output folder holds a checkpoint of a different run."""


def ensure_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable now, before any work (not after the first task has trained)."""
    try:
        probe_writable(out_dir)
    except OSError as e:
        raise PermissionError(f"cannot write results to {out_dir}: {e.strerror or e}; choose another out_dir") from e


def dataset_identity(ds: Any) -> list[Any] | None:
    """A dataset's size and a hash of its labels (images themselves are not read), and its ``augmentation`` when it
    has one (`streams.images.TrainCrops`)."""
    if ds is None:
        return None
    targets = getattr(ds, "targets", None)
    labels = None
    if targets is not None:
        t = torch.as_tensor(targets).to("cpu", torch.int64).contiguous()
        labels = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
    augmentation = getattr(ds, "augmentation", None)
    return [len(ds), labels] + ([augmentation] if augmentation is not None else [])


def tasks_identity(tasks: Sequence[Any]) -> list[list[Any]]:
    """Per task: its name, its classes (`LabelSpace.fingerprint`: names, order, templates), and `dataset_identity`
    of its training and test sets, so that a resume with another class order, another number of images or another
    draw of them, or other training crops, is refused."""
    return [[t.name, t.space.fingerprint, dataset_identity(t.train), dataset_identity(t.test)] for t in tasks]


def stream_identity(stream: Any) -> list[list[Any]]:
    """`tasks_identity` of the stream's tasks."""
    return tasks_identity(stream.tasks)


def _task_changes(saved: Any, current: Any) -> list[str]:
    """What differs between two `stream_identity` lists, in words."""
    if saved == current:
        return []
    if not isinstance(saved, list) or not isinstance(current, list) or len(saved) != len(current):
        n = [len(x) if isinstance(x, list) else "?" for x in (saved, current)]
        return [f"the stream has {n[1]} tasks, the saved run {n[0]}"]
    out = []
    for old, new in zip(saved, current):
        if old == new:
            continue
        what = []
        if old[0] != new[0]:
            what.append(f"name {old[0]!r} -> {new[0]!r}")
        if old[1] != new[1]:
            what.append("other classes (names, order or templates)")
        for i, part in ((2, "training"), (3, "test")):
            if old[i] != new[i]:
                sizes = [x[0] if x else 0 for x in (old[i], new[i])]
                if sizes[0] != sizes[1]:
                    what.append(f"{part} set of {sizes[0]} -> {sizes[1]} images")
                elif old[i] and new[i] and old[i][:2] == new[i][:2]:
                    augment = [x[2] if len(x) > 2 else "none" for x in (old[i], new[i])]
                    what.append(f"{part} augmentation {augment[0]} -> {augment[1]}")
                else:
                    what.append(f"other {part} labels (another draw or order of images)")
        out.append(f"task {new[0]}: " + ", ".join(what))
    return out[:3] + ([f"and {len(out) - 3} more tasks"] if len(out) > 3 else [])


def _hook_changes(saved: Any, current: Any) -> list[str]:
    """What differs between two `hooks_identity` dicts, in words (a hook's control tasks as `_task_changes`)."""
    if saved == current:
        return []
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return ["other hooks"]
    out = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if old != new:
            detail = (", ".join(_task_changes(old, new)) if isinstance(old, list) and isinstance(new, list)
                      else "present in one run only")
            out.append(f"hook {name}: {detail}")
    return out


def model_identity(model: Any) -> dict[str, Any]:
    """The architecture and the weights (a local file by its content hash, a published tag by name)."""
    src = model.provenance() if hasattr(model, "provenance") else {}
    return {"arch": src.get("arch"), "quick_gelu": src.get("quick_gelu"),
            "weights": src.get("checkpoint_sha256") or src.get("pretrained")}


def hooks_identity(hooks: Sequence[Any]) -> dict[str, Any]:
    """The hooks whose settings change what they measure, by their ``identity()`` (the retention controls of
    `ctta.ZeroShotRetention`); hooks without one are left out."""
    return {type(h).__name__: h.identity() for h in hooks if hasattr(h, "identity")}


def run_identity(stream: Any, strategy: Any, seed: int, model: Any = None, hooks: Sequence[Any] = (),
                 **extra: Any) -> dict[str, Any]:
    """A run's identity in its checkpoint, for both loops (``extra``: the sample loop's batch size and reset
    settings). ``model`` is left out by scripts/run.py's check of the folder, made before any model is built; the
    loop's own read then compares the whole identity. ``hooks``: `hooks_identity`, when a hook has one."""
    fp = {"stream": stream.name, "tasks": stream_identity(stream), "strategy": type(strategy).__qualname__,
          "config": strategy_config(strategy), "seed": seed, **extra}
    measured = hooks_identity(hooks)
    if measured:
        fp["hooks"] = measured
    return fp if model is None else {**fp, "model": model_identity(model)}


class Checkpoint:
    """``out_dir/name`` for the run whose identity is ``fingerprint`` (plain values). ``partial``: compare only the
    fields ``fingerprint`` has (scripts/run.py checks the stream and strategy before the model is built; the loop's
    own read then checks the whole identity, the model included)."""

    def __init__(self, out_dir: Path | None, name: str, fingerprint: dict, par: Parallel, partial: bool = False):
        self.path = out_dir / name if out_dir is not None else None
        self.fingerprint, self.par, self.partial = fingerprint, par, partial

    def read(self, map_location: torch.device | str, hold: bool = False) -> dict | None:
        """The saved state, or None for a fresh run. Raises `RunMismatch` for another run's checkpoint.

        ``hold``: keep the state read (on the CPU) for the next read of this file in this process, which takes it
        if the file has not changed since (same inode, size and modification time) instead of reading it again."""
        if self.path is None:
            return None
        state: Any = None
        if self.par.main and self.path.exists():
            state = self._load(map_location, hold)
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                state = RunMismatch(f"{self.path} is not a checkpoint of this version of ctta "
                                    f"(format {state.get('format') if isinstance(state, dict) else '?'}); "
                                    f"use another out_dir")
            elif self._saved_fields(state["fingerprint"]) != self.fingerprint:
                saved_fp = self._saved_fields(state["fingerprint"])
                if saved_fp.get("strategy") != self.fingerprint.get("strategy"):  # the arguments differ anyway
                    saved_fp = {k: v for k, v in saved_fp.items() if k != "config"}
                    current = {k: v for k, v in self.fingerprint.items() if k != "config"}
                else:
                    saved_fp, current = dict(saved_fp), dict(self.fingerprint)
                diff = "; ".join(_task_changes(saved_fp.pop("tasks", None), current.pop("tasks", None))
                                 + _hook_changes(saved_fp.pop("hooks", {}), current.pop("hooks", {}))
                                 + differences(saved_fp, current))
                state = RunMismatch(f"{self.path} belongs to a different run ({diff}). Use another out_dir, or "
                                    f"the saved run's settings to resume it.")
            if isinstance(state, Exception):
                _held.pop(self.path, None)  # a refused state is not handed on
        state = self.par.from_main(state, "checkpoint")
        if isinstance(state, Exception):
            raise state
        return state

    def _saved_fields(self, saved: Any) -> Any:
        if not self.partial or not isinstance(saved, dict):
            return saved
        return {k: v for k, v in saved.items() if k in self.fingerprint}

    def _load(self, map_location: torch.device | str, hold: bool) -> Any:
        """The file's state: the one held for it if the file is unchanged, else read (and hashed) from disk."""
        device = "cpu" if self.par.active else map_location  # torchrun: rank 0 sends CPU tensors
        identity = _identity(self.path)  # before reading: a file replaced meanwhile is not taken for this one
        held = _held.pop(self.path, None)
        if held is not None and held[0] == identity:
            state = held[1]  # on the CPU
        elif hold:
            state = safe_torch_load(self.path, map_location="cpu")
        else:
            return safe_torch_load(self.path, map_location=device)
        if hold:
            _held[self.path] = (identity, state)
            return state
        return state if torch.device(device).type == "cpu" else to_device(state, device)

    def write(self, state: dict) -> None:
        """Save ``state`` (plus the fingerprint) atomically; rank 0 alone writes."""
        if self.path is not None and self.par.main:
            atomic_torch_save(self.path, {"format": FORMAT, "fingerprint": self.fingerprint, **state})


def check_saved(state: dict | None, path: Path | None, fields: dict[str, type | tuple[type, ...]],
                counts: dict[str, tuple[int, int | None]]) -> None:
    """A checkpoint's content, before any of it is used: the entries a loop reads, of their types, and its counters
    within this run (``counts``: name -> (lowest, highest or None)). A file that passed its hash but came from a
    faulty writer is refused in words, never taken for a finished run or met as a traceback."""
    if state is None:
        return
    for key, kind in fields.items():
        if key not in state:
            raise CorruptFileError(f"{path} has no {key!r} entry: it is damaged; use another out_dir")
        if not isinstance(state[key], kind):
            raise CorruptFileError(f"{path}: its {key!r} entry is a {type(state[key]).__name__}, not a "
                                   f"{getattr(kind, '__name__', kind)}: it is damaged; use another out_dir")
    for key, (lo, hi) in counts.items():
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise CorruptFileError(f"{path}: {key}={v!r} is outside this run ({span}): it is damaged; use another "
                                   f"out_dir")


def drop_held() -> None:
    """Forget the states read with ``hold=True`` that no loop took (a set-up that failed after the early read)."""
    _held.clear()


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def hook_states(hooks: Sequence[Any]) -> list[Any]:
    return [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks]


def load_hook_states(hooks: Sequence[Any], states: list[Any], where: Path | None) -> None:
    if len(states) != len(hooks):
        raise RunMismatch(f"{where} was written with {len(states)} hooks, this run has {len(hooks)}; "
                          f"use the same hooks to resume, or another out_dir")
    for h, s in zip(hooks, states):
        if s is not None:
            h.load_state_dict(s)


# --------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state`'s generators. Its tensors may arrive on a GPU (a checkpoint read with the model's device
    as ``map_location``): generator states must be CPU byte tensors, and ``.numpy()`` needs a CPU tensor."""
    v, internal, g = state["python"]
    random.setstate((v, tuple(internal), g))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
