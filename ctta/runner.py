"""`run()`: the task-stream loop, readable top to bottom (sample streams: `ctta.samples.run_samples`).

Per task: seed → hooks.on_task_start → strategy.begin_task (revealed boundaries only) → strategy.learn over the
task's training batches → strategy.end_task → hooks.on_task_end (evaluation) → checkpoint. Re-running with the same
``out_dir`` resumes after the last finished task; because every task re-seeds from ``seed + task index``, a resumed
run ends with exactly the results of an uninterrupted one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ctta import distributed
from ctta.data import load_batch
from ctta.io import atomic_torch_save, safe_torch_load
from ctta.model import Clip
from ctta.optim import steps_per_task
from ctta.strategy import Strategy
from ctta.stream import Task, TaskStream

CHECKPOINT = "checkpoint.pt"


@dataclass
class RunContext:
    """What hooks see. Hooks read it and write only into ``results``."""

    model: Clip
    strategy: Strategy
    stream: TaskStream
    out_dir: Path | None = None
    seed: int = 0
    config: Any = None
    results: dict[str, Any] = field(default_factory=dict)
    task_index: int = -1
    task: Task | None = None
    resumed: bool = False
    last_stats: dict[str, float] = field(default_factory=dict)


def call(hooks: Sequence[Any], event: str, ctx: RunContext) -> None:
    """Duck-typed dispatch: every hook with a method named ``event`` is called, in order."""
    for h in hooks:
        fn = getattr(h, event, None)
        if fn is not None:
            fn(ctx)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(model: Clip, strategy: Strategy, stream: TaskStream, hooks: Sequence[Any] = (), *,
        out_dir: str | Path | None = None, seed: int = 0, config: Any = None, progress: bool | None = None,
        samples: dict | None = None) -> dict:
    """Run a task stream through a strategy; returns the results dict the hooks filled.

    A stream without any training data is a test-time sample stream: it runs through `ctta.samples.run_samples`
    (``samples``: its keyword options, e.g. ``batch_size``, ``reset``, ``checkpoint_every``)."""
    if all(t.train is None for t in stream.tasks):
        from ctta.samples import run_samples  # imports this module
        return run_samples(model, strategy, stream, hooks, out_dir=out_dir, seed=seed, config=config,
                           progress=progress, **(samples or {}))
    ctx = RunContext(model, strategy, stream, Path(out_dir) if out_dir else None, seed, config)
    hooks = _main_rank_hooks(hooks, ctx)
    seed_everything(seed)
    strategy.setup(model)
    start = _resume(ctx, hooks) if ctx.out_dir else 0
    ctx.task_index = start - 1
    call(hooks, "on_run_start", ctx)
    for t in range(start, len(stream)):
        task = stream.tasks[t]
        ctx.task_index, ctx.task = t, task
        seed_everything(seed + 1000 * (t + 1))
        space, offset = stream.train_space(t)
        call(hooks, "on_task_start", ctx)
        if task.boundary:
            strategy.begin_task(task, space)
        if strategy.learns and task.train is not None and len(task.train) > 0:
            _train(ctx, hooks, task, space, offset, progress)
        strategy.end_task(task, space)
        call(hooks, "on_task_end", ctx)
        if ctx.out_dir and distributed.is_main():
            _save(ctx, hooks, next_task=t + 1)
    call(hooks, "on_run_end", ctx)  # no closing barrier: the other ranks need not wait for rank 0's evaluation
    return ctx.results


def _main_rank_hooks(hooks: Sequence[Any], ctx: RunContext) -> Sequence[Any]:
    """Under torchrun: check every rank built the same run, and keep the hooks (evaluation, files) on rank 0."""
    distributed.check_same({**_fingerprint(ctx), "classes": [t.space.classnames for t in ctx.stream.tasks]},
                           "stream, class order and strategy")
    return hooks if distributed.is_main() else ()


def _train(ctx: RunContext, hooks, task: Task, space, offset: int, progress: bool | None) -> None:
    """Feed the task's training data: ``strategy.iterations`` steps if set (cycling), else ``epochs`` passes.

    Under torchrun every rank draws the same global batches and loads only its shard of each (the strategy's
    ``step`` all-reduces the gradients weighted by ``grad_weight``, the shard's share of the batch)."""
    s = ctx.strategy
    gen = torch.Generator().manual_seed(ctx.seed + 7919 * (ctx.task_index + 1))
    n = len(task.train)
    total = steps_per_task(n, s.batch_size, s.epochs, s.iterations)
    bar = tqdm(total=total, desc=f"train {task.name}", leave=False, disable=no_bar(progress))
    done = 0
    while done < total:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, s.batch_size):
            batch = order[start:start + s.batch_size]
            rows, s.grad_weight = distributed.batch_shard(len(batch))
            images, labels = load_batch(task.train, batch[rows])
            ctx.last_stats = s.learn(images.to(ctx.model.device), labels.to(ctx.model.device) + offset, space)
            call(hooks, "on_batch_end", ctx)
            done += 1
            bar.update(1)
            if done >= total:
                break
    bar.close()


def no_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None (auto: only on a terminal) unless ``progress`` says; always off off rank 0."""
    if not distributed.is_main():
        return True
    return None if progress is None else not progress


def _fingerprint(ctx: RunContext) -> dict:
    return {"stream": ctx.stream.name, "tasks": [t.name for t in ctx.stream.tasks],
            "strategy": type(ctx.strategy).__qualname__, "seed": ctx.seed}


def _save(ctx: RunContext, hooks, next_task: int) -> None:
    atomic_torch_save(ctx.out_dir / CHECKPOINT, {
        "next_task": next_task,
        "fingerprint": _fingerprint(ctx),
        "model": ctx.model.net.state_dict(),
        "strategy": ctx.strategy.state_dict(),
        "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks],
        "results": ctx.results,
    })


def _resume(ctx: RunContext, hooks) -> int:
    """Load the checkpoint, if any (under torchrun rank 0 reads it and sends it to the others)."""
    path = ctx.out_dir / CHECKPOINT
    ck = None
    if distributed.is_main() and path.exists():
        ck = safe_torch_load(path, map_location="cpu" if distributed.is_distributed() else ctx.model.device)
        if ck["fingerprint"] != _fingerprint(ctx):
            ck = ValueError(f"{path} belongs to a different run ({ck['fingerprint']}); "
                            f"this run is {_fingerprint(ctx)}. Use another output directory.")
        elif len(ck["hooks"]) != len(hooks):
            ck = ValueError(f"{path} was written with {len(ck['hooks'])} hooks, this run has {len(hooks)}")
    ck = distributed.broadcast_object(ck, "checkpoint")
    if isinstance(ck, Exception):
        raise ck
    if ck is None:
        return 0
    ctx.model.net.load_state_dict(ck["model"])
    ctx.strategy.load_state_dict(distributed.to_device(ck["strategy"], ctx.model.device))
    for h, state in zip(hooks, ck["hooks"]):
        if state is not None:
            h.load_state_dict(state)
    if distributed.is_main():  # results belong to the hooks, which live on rank 0
        ctx.results.update(ck["results"])
    ctx.resumed = True
    return int(ck["next_task"])
