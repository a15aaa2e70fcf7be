"""`run_samples()`: the sample-stream loop (test-time adaptation benchmarks), readable top to bottom.

Each task of the stream is a test-time domain (no training data). Its test samples are fed in order, ``batch_size``
at a time, through an `OnlineAdapter` (so the loop measures exactly what a deployed adapter does): the strategy
sees images only (``adapt(images, space)``); labels stay here and reach only the hooks, which score the returned
logits. At a revealed boundary (``Task.boundary``) the adapter is reset (if ``reset_on_shift``) and
``strategy.begin_task`` is called; a hidden boundary changes nothing the strategy can see.

With ``out_dir`` and ``checkpoint_every`` the stream position, the adapter state, the RNG states, the hooks' states
and the results are checkpointed atomically every N samples; re-running with the same ``out_dir`` resumes from the
last checkpoint and ends with the same metrics as an uninterrupted run (for a deterministic strategy and device).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ctta.data import iter_batches
from ctta.io import atomic_torch_save, safe_torch_load
from ctta.model import Clip
from ctta.online import OnlineAdapter, ResetPolicy
from ctta.runner import RunContext, call, seed_everything
from ctta.strategy import Strategy
from ctta.stream import LabelSpace, TaskStream

CHECKPOINT = "samples_checkpoint.pt"


@dataclass
class SampleContext(RunContext):
    """`RunContext` plus the batch just adapted on (read by hooks in ``on_batch_end``)."""

    adapter: OnlineAdapter | None = None
    space: LabelSpace | None = None
    position: int = 0           # samples processed in the whole stream, this batch included
    task_position: int = 0      # samples processed in the current task, this batch included
    logits: Tensor | None = None  # [B, C] returned by the adapter (over ``space``)
    labels: Tensor | None = None  # [B] indices into ``space`` (CPU); never passed to the strategy
    seconds: float = 0.0        # wall time of the adapter call (CUDA synchronised)


def run_samples(model: Clip, strategy: Strategy, stream: TaskStream, hooks: Sequence[Any] = (), *,
                batch_size: int = 1, reset: ResetPolicy = "never", reset_on_shift: bool = True,
                drift: Callable[[dict], bool] | None = None, out_dir: str | Path | None = None,
                checkpoint_every: int | None = 1000, seed: int = 0, config: Any = None,
                progress: bool | None = None) -> dict:
    """Run a sample stream through a test-time strategy; returns the results dict the hooks filled."""
    if batch_size <= 0 or (checkpoint_every is not None and checkpoint_every <= 0):
        raise ValueError(f"batch_size and checkpoint_every must be positive, got {batch_size}, {checkpoint_every}")
    ctx = SampleContext(model, strategy, stream, Path(out_dir) if out_dir else None, seed, config)
    seed_everything(seed)
    ctx.adapter = adapter = OnlineAdapter(model, strategy, stream.train_space(0)[0], reset=reset, drift=drift)
    start_task, start_offset = _resume(ctx, hooks, batch_size) if ctx.out_dir else (0, 0)
    call(hooks, "on_run_start", ctx)
    last_save = ctx.position
    bar = tqdm(total=sum(len(t.test) for t in stream.tasks), initial=ctx.position, desc=f"adapt {stream.name}",
               disable=not progress if progress is not None else None, leave=False)
    for t in range(start_task, len(stream)):
        task = stream.tasks[t]
        space, offset = stream.train_space(t)
        ctx.task_index, ctx.task, ctx.space = t, task, space
        adapter.space = space
        first = start_offset if t == start_task else 0
        if first == 0:  # a resumed run does not replay the start of a task it is in the middle of
            call(hooks, "on_task_start", ctx)
            if task.boundary:
                if reset_on_shift:
                    adapter.reset()
                strategy.begin_task(task, space)
        ctx.task_position = first
        for images, labels, _ in iter_batches(task.test, batch_size, indices=torch.arange(first, len(task.test))):
            t0 = time.perf_counter()
            ctx.logits = adapter(images).logits  # images only: labels never reach the strategy
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            ctx.seconds = time.perf_counter() - t0
            ctx.labels = labels + offset
            ctx.position += len(labels)
            ctx.task_position += len(labels)
            call(hooks, "on_batch_end", ctx)
            bar.update(len(labels))
            if ctx.out_dir and checkpoint_every and ctx.position - last_save >= checkpoint_every:
                _save(ctx, hooks, batch_size, t, ctx.task_position)
                last_save = ctx.position
        if task.boundary:  # the end of a revealed task is revealed too
            strategy.end_task(task, space)
        call(hooks, "on_task_end", ctx)
    bar.close()
    if ctx.out_dir:
        _save(ctx, hooks, batch_size, len(stream), 0)
    call(hooks, "on_run_end", ctx)
    return ctx.results


# --------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, g = state["python"]
    random.setstate((v, tuple(internal), g))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _fingerprint(ctx: SampleContext, batch_size: int) -> dict:
    return {"stream": ctx.stream.name, "tasks": [[t.name, len(t.test)] for t in ctx.stream.tasks],
            "strategy": type(ctx.strategy).__qualname__, "seed": ctx.seed, "batch_size": batch_size,
            "reset": str(ctx.adapter.reset_policy)}


def _save(ctx: SampleContext, hooks, batch_size: int, task: int, offset: int) -> None:
    atomic_torch_save(ctx.out_dir / CHECKPOINT, {
        "task": task, "offset": offset, "position": ctx.position,
        "fingerprint": _fingerprint(ctx, batch_size),
        "adapter": ctx.adapter.state_dict(),
        "rng": rng_state(),
        "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks],
        "results": ctx.results,
    })


def _resume(ctx: SampleContext, hooks, batch_size: int) -> tuple[int, int]:
    path = ctx.out_dir / CHECKPOINT
    if not path.exists():
        return 0, 0
    ck = safe_torch_load(path, map_location=ctx.model.device)
    ctx.adapter.space = ctx.stream.train_space(min(int(ck["task"]), len(ctx.stream) - 1))[0]
    if ck["fingerprint"] != _fingerprint(ctx, batch_size):
        raise ValueError(f"{path} belongs to a different run ({ck['fingerprint']}); "
                         f"this run is {_fingerprint(ctx, batch_size)}. Use another output directory.")
    if len(ck["hooks"]) != len(hooks):
        raise ValueError(f"{path} was written with {len(ck['hooks'])} hooks, this run has {len(hooks)}")
    ctx.adapter.load_state_dict(ck["adapter"])
    for h, state in zip(hooks, ck["hooks"]):
        if state is not None:
            h.load_state_dict(state)
    ctx.results.update(ck["results"])
    set_rng_state(ck["rng"])
    ctx.position, ctx.resumed = int(ck["position"]), True
    return int(ck["task"]), int(ck["offset"])
