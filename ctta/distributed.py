"""Data-parallel runs under ``torchrun``: process group, sharding, and the few collectives the runtime needs.

Launch any entry point unchanged with ``torchrun --nproc_per_node=N scripts/run.py ...``; `launched()` reads
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), picks one device per rank (``cuda:LOCAL_RANK``
with NCCL, else the CPU with gloo) and tears the group down at the end. Without torchrun every function here is a
no-op for a single process, so the core never branches on "am I distributed" beyond calling them.

How the loops use them is decided in one place, `ctta.loop.parallel`.

A rank that dies or stalls makes the others fail with a clear `DistributedError` after ``timeout_s`` (or as soon as
the backend notices the broken connection) instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, stalled past the timeout, or disagrees about the run."""


def is_distributed() -> bool:
    """Is this process one rank of several?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _grouped() else 0


def world_size() -> int:
    return dist.get_world_size() if _grouped() else 1


def is_main() -> bool:
    return rank() == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from e


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device | None:
    """Join torchrun's process group if ``WORLD_SIZE > 1``; returns this rank's device (None if not launched).

    ``backend``: None picks NCCL when CUDA is available, else gloo. ``timeout_s`` bounds every collective."""
    if env_world_size() <= 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE > 1 but {missing} are not set: launch with torchrun")
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices here")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def launched(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[torch.device | None]:
    """``with launched() as device:`` — the process group for the body (a no-op without torchrun)."""
    device = init_from_env(backend, timeout_s)
    try:
        yield device
    finally:
        shutdown()


def describe() -> dict[str, Any]:
    """For provenance: world size and backend (``{"world_size": 1}`` for a single process)."""
    if not _grouped():
        return {"world_size": 1}
    return {"world_size": world_size(), "backend": dist.get_backend()}


# ------------------------------------------------------------------------------------------------- sharding
def batch_shard(n: int, r: int | None = None, size: int | None = None) -> tuple[Tensor, float]:
    """This rank's rows of a global batch of ``n`` and the weight of its gradient (its share of the batch).

    Contiguous, as equal as possible. A rank left without rows (``n`` < world size) gets one duplicate row with
    weight 0, so that every rank runs the same code (and the same collectives) on a non-empty batch."""
    r = rank() if r is None else r
    size = world_size() if size is None else size
    if n <= 0:
        raise ValueError(f"cannot shard an empty batch (n={n})")
    rows = torch.tensor_split(torch.arange(n), size)[r]
    if len(rows) == 0:
        return torch.tensor([r % n]), 0.0
    return rows, len(rows) / n


# ------------------------------------------------------------------------------------------------- collectives
def _collective(what: str):
    """Re-raise a backend failure (dead peer, timeout) as a `DistributedError` that says what happened."""
    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except DistributedError:
            raise
        except Exception as e:  # gloo/NCCL raise RuntimeError or DistBackendError with backend-specific text
            raise DistributedError(
                f"rank {rank()}/{world_size()}: collective '{what}' failed; another rank has probably died or "
                f"stalled past the timeout. Backend said: {e}") from e
    return guard()


def all_reduce_sum_(tensor: Tensor, what: str = "all_reduce") -> Tensor:
    """Sum ``tensor`` over ranks in place (identity for one process)."""
    if is_distributed():
        with _collective(what):
            dist.all_reduce(tensor)
    return tensor


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], weight: float, finite: bool) -> bool:
    """Replace every parameter's ``.grad`` by the weighted sum over ranks of the ranks' gradients.

    ``weight``: this rank's share of the global batch (`batch_shard`); ``finite``: whether this rank's loss was
    finite (if any rank's was not, every rank skips the step: returns False). A gradient that is None on every rank
    stays None (so that the optimizer skips the parameter exactly as in one process); one that is None on some
    ranks counts as zero there. One flat buffer per dtype: a single collective for all parameters."""
    if not is_distributed():
        return finite
    params = list(params)
    device = params[0].device if params else torch.device("cpu")
    has = torch.tensor([float(p.grad is not None) for p in params] + [0.0 if finite else 1.0],
                       dtype=torch.float64, device=device)
    all_reduce_sum_(has, "gradient flags")
    if has[-1] > 0:
        for p in params:
            p.grad = None
        return False
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if has[i] > 0:
            by_dtype.setdefault(p.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = torch.cat([(params[i].grad if params[i].grad is not None else torch.zeros_like(params[i])).reshape(-1)
                          for i in idx]) * weight
        all_reduce_sum_(flat, "gradients")
        offset = 0
        for i in idx:
            p = params[i]
            p.grad = flat[offset:offset + p.numel()].view_as(p)  # views of one buffer: no second copy
            offset += p.numel()
    for i, p in enumerate(params):
        if has[i] == 0:
            p.grad = None
    return True


def gather_objects(obj: Any, what: str = "gather") -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere); ``[obj]`` for one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    with _collective(what):
        dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, what: str = "broadcast") -> Any:
    """Rank 0's ``obj`` on every rank. Send CPU tensors (a pickled CUDA tensor lands on rank 0's GPU in every
    process) and move them with `to_device` on arrival."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    with _collective(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def to_device(obj: Any, device: torch.device | str) -> Any:
    """The tensors of nested dicts / lists / tuples moved to ``device`` (other leaves as they are)."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def check_same(value: Any, what: str) -> None:
    """Raise on every rank unless all ranks hold an equal ``value`` (class orders, stream fingerprints...)."""
    if not is_distributed():
        return
    values: list[Any] = [None] * world_size()
    with _collective(f"check {what}"):
        dist.all_gather_object(values, value)
    bad = [r for r, v in enumerate(values) if v != values[0]]
    if bad:
        raise DistributedError(f"ranks {bad} disagree with rank 0 about the {what}: {values[bad[0]]!r} vs "
                               f"{values[0]!r}; every rank must build the same run (same config and seed)")
