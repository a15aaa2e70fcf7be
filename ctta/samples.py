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

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ctta import distributed
from ctta.data import load_batch
from ctta.io import atomic_torch_save, safe_torch_load
from ctta.model import Clip
from ctta.online import OnlineAdapter, ResetPolicy
from ctta.runner import RunContext, call, no_bar, seed_everything
from ctta.strategy import Strategy
from ctta.stream import LabelSpace, TaskStream

CHECKPOINT = "samples_checkpoint.pt"
log = logging.getLogger(__name__)


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
                progress: bool | None = None, round_batches: int = 32) -> dict:
    """Run a sample stream through a test-time strategy; returns the results dict the hooks filled.

    Episodic streams (``reset="episodic"`` or a strategy that resets itself every sample, like TPT) re-seed every
    episode (`Strategy.reseed`) from its position, and under torchrun deal episodes round-robin to the ranks in
    rounds of ``round_batches`` per rank, gathering their logits to rank 0, which scores them in stream order: the
    per-sample predictions and metrics equal the single-process run's. An online stream depends on its order, so
    it runs on rank 0 alone (the other ranks return ``{}`` at once and say so)."""
    if batch_size <= 0 or round_batches <= 0 or (checkpoint_every is not None and checkpoint_every <= 0):
        raise ValueError(f"batch_size, round_batches and checkpoint_every must be positive, got {batch_size}, "
                         f"{round_batches}, {checkpoint_every}")
    episodic = reset == "episodic" or strategy.episodic
    if distributed.is_distributed() and not episodic:
        if not distributed.is_main():
            log.warning("rank %d: the sample stream is online (its state carries over between samples), so it "
                        "runs on rank 0 alone; this rank has nothing to do", distributed.rank())
            return {}
        with distributed.local():
            return _run(model, strategy, stream, hooks, batch_size, reset, reset_on_shift, drift, out_dir,
                        checkpoint_every, seed, config, progress, round_batches, episodic, single=True)
    return _run(model, strategy, stream, hooks, batch_size, reset, reset_on_shift, drift, out_dir,
                checkpoint_every, seed, config, progress, round_batches, episodic, single=False)


def episode_seed(seed: int, task: int, batch: int) -> int:
    """The seed of episode ``batch`` of task ``task``: a function of the position only (any rank, any order)."""
    return ((seed * 1_000_003 + task) * 1_000_003 + batch) % 2**63


def _run(model, strategy, stream, hooks, batch_size, reset, reset_on_shift, drift, out_dir, checkpoint_every, seed,
         config, progress, round_batches, episodic, single) -> dict:
    ctx = SampleContext(model, strategy, stream, Path(out_dir) if out_dir else None, seed, config)
    if not single:
        distributed.check_same(_fingerprint_of(stream, strategy, seed, batch_size, reset), "sample stream")
    main = single or distributed.is_main()
    hooks = hooks if main else ()
    ranks, me = (1, 0) if single else (distributed.world_size(), distributed.rank())
    per_rank = round_batches if ranks > 1 else 1  # one process scores (and may checkpoint) after every batch
    seed_everything(seed)
    ctx.adapter = adapter = OnlineAdapter(model, strategy, stream.train_space(0)[0], reset=reset, drift=drift)
    start_task, start_offset = _resume(ctx, hooks, batch_size, single) if ctx.out_dir else (0, 0)
    call(hooks, "on_run_start", ctx)
    last_save = ctx.position
    bar = tqdm(total=sum(len(t.test) for t in stream.tasks), initial=ctx.position, desc=f"adapt {stream.name}",
               disable=no_bar(progress), leave=False)
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
        starts = list(range(first, len(task.test), batch_size))
        for r0 in range(0, len(starts), per_rank * ranks):
            # this rank's episodes of the round (all of them in one process), then everyone's, in stream order
            mine = []
            for b in range(r0 + me, min(r0 + per_rank * ranks, len(starts)), ranks):
                idx = torch.arange(starts[b], min(starts[b] + batch_size, len(task.test)))
                images, labels = load_batch(task.test, idx)
                if episodic:
                    strategy.reseed(episode_seed(seed, t, starts[b] // batch_size))
                t0 = time.perf_counter()
                with distributed.local():  # each rank adapts alone
                    logits = adapter(images).logits  # images only: labels never reach the strategy
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                mine.append((b, logits.detach().cpu() if ranks > 1 else logits, labels, time.perf_counter() - t0))
            gathered = [mine] if ranks == 1 else distributed.gather_objects(mine, "episode outputs")
            if not main:
                continue
            for b, logits, labels, seconds in sorted((x for part in gathered for x in part), key=lambda x: x[0]):
                ctx.logits, ctx.labels, ctx.seconds = logits, labels + offset, seconds
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
    if ctx.out_dir and main:
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


def _fingerprint_of(stream: TaskStream, strategy: Strategy, seed: int, batch_size: int, reset: Any) -> dict:
    return {"stream": stream.name, "tasks": [[t.name, len(t.test)] for t in stream.tasks],
            "strategy": type(strategy).__qualname__, "seed": seed, "batch_size": batch_size, "reset": str(reset)}


def _fingerprint(ctx: SampleContext, batch_size: int) -> dict:
    return _fingerprint_of(ctx.stream, ctx.strategy, ctx.seed, batch_size, ctx.adapter.reset_policy)


def _save(ctx: SampleContext, hooks, batch_size: int, task: int, offset: int) -> None:
    atomic_torch_save(ctx.out_dir / CHECKPOINT, {
        "task": task, "offset": offset, "position": ctx.position,
        "fingerprint": _fingerprint(ctx, batch_size),
        "adapter": ctx.adapter.state_dict(),
        "rng": rng_state(),
        "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks],
        "results": ctx.results,
    })


def _resume(ctx: SampleContext, hooks, batch_size: int, single: bool = True) -> tuple[int, int]:
    """Load the checkpoint, if any (with episodes sharded under torchrun, rank 0 reads it and sends it on)."""
    path = ctx.out_dir / CHECKPOINT
    ck = None
    if (single or distributed.is_main()) and path.exists():
        ck = safe_torch_load(path, map_location=ctx.model.device if single else "cpu")
        if ck["fingerprint"] != _fingerprint(ctx, batch_size):
            ck = ValueError(f"{path} belongs to a different run ({ck['fingerprint']}); "
                            f"this run is {_fingerprint(ctx, batch_size)}. Use another output directory.")
        elif len(ck["hooks"]) != len(hooks):
            ck = ValueError(f"{path} was written with {len(ck['hooks'])} hooks, this run has {len(hooks)}")
    if not single:
        ck = distributed.broadcast_object(ck, "checkpoint")
    if isinstance(ck, Exception):
        raise ck
    if ck is None:
        return 0, 0
    ctx.adapter.space = ctx.stream.train_space(min(int(ck["task"]), len(ctx.stream) - 1))[0]
    ctx.adapter.load_state_dict(distributed.to_device(ck["adapter"], ctx.model.device))
    for h, state in zip(hooks, ck["hooks"]):
        if state is not None:
            h.load_state_dict(state)
    if single or distributed.is_main():  # results belong to the hooks, which live on rank 0
        ctx.results.update(ck["results"])
    set_rng_state(ck["rng"])
    ctx.position, ctx.resumed = int(ck["position"]), True
    return int(ck["task"]), int(ck["offset"])
