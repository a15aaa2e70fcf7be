"""The task-stream loop (continual learning), read top to bottom.

Per task: seed → hooks.on_task_start → strategy.begin_task (revealed boundaries only) → strategy.learn over the
task's training batches → strategy.end_task → hooks.on_task_end (evaluation) → checkpoint. Hooks start before the
strategy touches the model, so a zero-shot baseline is the untouched model's. Re-running with the same ``out_dir``
resumes after the last finished task; every task re-seeds from ``seed + task index``, so a resumed run ends with
exactly the results of an uninterrupted one.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ctta import distributed
from ctta.data import iter_batches
from ctta.loop.checkpoint import (Checkpoint, check_saved, ensure_writable, hook_states, load_hook_states,
                                  run_identity, seed_everything)
from ctta.loop.context import RunContext, call, finish_again, no_bar, share_progress
from ctta.loop.parallel import Parallel
from ctta.model import Clip
from ctta.optim import steps_per_task
from ctta.state import check_finite_weights, check_same_structure
from ctta.strategy import Strategy
from ctta.stream import Task, TaskStream

CHECKPOINT = "checkpoint.pt"
log = logging.getLogger("ctta")


def fingerprint(stream: TaskStream, strategy: Strategy, seed: int, model: Clip | None = None,
                hooks: Sequence[Any] = ()) -> dict:
    """The run's identity in its checkpoint (`ctta.loop.checkpoint.run_identity`)."""
    return run_identity(stream, strategy, seed, model, hooks)


def run_tasks(model: Clip, strategy: Strategy, stream: TaskStream, hooks: Sequence[Any] = (), *,
              out_dir: str | Path | None = None, seed: int = 0, config: Any = None,
              progress: bool | None = None) -> dict:
    """Run a task stream through a strategy; returns the results dict the hooks filled."""
    if strategy.learns and type(strategy).learn is Strategy.learn and any(t.train is not None for t in stream.tasks):
        raise ValueError(f"{type(strategy).__name__} does not implement learn(), and this stream trains: a test-time "
                         f"strategy sets learns = False (a task stream then only evaluates it), or run it on a "
                         f"sample stream")
    par = Parallel()
    out = Path(out_dir) if out_dir else None
    if out is not None and par.main:
        ensure_writable(out)
    fp = fingerprint(stream, strategy, seed, model, hooks)
    par.check_same({**fp, "classes": [t.space.classnames for t in stream.tasks]}, "stream, class order and strategy")
    all_hooks = list(hooks)
    hooks = par.hooks(all_hooks)  # rank 0: all; other ranks: the sharded evaluation hooks, which write no files
    share_progress(hooks, progress if par.main else False)
    ckpt = Checkpoint(out, CHECKPOINT, fp, par)
    saved = ckpt.read(model.device)  # before anything is trained or written
    ctx = RunContext(model, strategy, stream, out, seed, config)
    check_saved(saved, ckpt.path, {"next_task": int, "model": dict, "strategy": dict, "hooks": list,
                                   "results": dict}, {"next_task": (0, len(stream))})
    start = int(saved["next_task"]) if saved else 0
    if saved:  # on every rank: the sharded hooks must agree (a retention baseline is not measured again)
        load_hook_states(all_hooks, saved["hooks"], ckpt.path)
        ctx.results.update(saved["results"])
        ctx.resumed = True
        if start < len(stream):  # a finished run says so below, and nothing else
            log.info("resuming %s after task %d/%d", out, start, len(stream))
    ctx.task_index = start - 1
    par.install(strategy)  # before on_run_start: evaluation there is sharded through strategy.comm too
    try:
        if start < len(stream):
            call(hooks, "on_run_start", ctx)  # the untouched model: no strategy state exists yet
        seed_everything(seed)
        strategy.setup(model)
        if saved:  # checked against this run's shapes first: a failed load changes nothing
            check_same_structure(saved["model"], model.net.state_dict(), f"{ckpt.path}: model")
            check_finite_weights(saved["model"], f"{ckpt.path}: model")
            check_same_structure(saved["strategy"], strategy.state_dict(), f"{ckpt.path}: strategy state")
            strategy.check_state(saved["strategy"], f"{ckpt.path}: strategy state")
            model.net.load_state_dict(saved["model"])
            strategy.load_state_dict(distributed.to_device(saved["strategy"], model.device))
        if start >= len(stream):
            finish_again(hooks, ctx, f"{len(stream)} tasks")
            return ctx.results if par.main else {}
        tasks = tqdm(range(start, len(stream)), initial=start, total=len(stream), desc="tasks",
                     disable=no_bar(progress, par.main))
        for t in tasks:
            task = stream.tasks[t]
            ctx.task_index, ctx.task = t, task
            seed_everything(seed + 1000 * (t + 1))
            space, offset = stream.train_space(t)
            call(hooks, "on_task_start", ctx)
            t_start = time.perf_counter()
            if task.boundary:
                strategy.begin_task(task, space)
            if strategy.learns and task.train is not None and len(task.train) > 0:
                tasks.set_postfix_str(f"{task.name}: train")
                _train(ctx, hooks, par, task, space, offset, progress)
            strategy.end_task(task, space)
            t_trained = time.perf_counter()
            tasks.set_postfix_str(f"{task.name}: evaluate")
            call(hooks, "on_task_end", ctx)
            _record_time(ctx.results, t_trained - t_start, time.perf_counter() - t_trained)
            ckpt.write({"next_task": t + 1, "model": model.net.state_dict(), "strategy": strategy.state_dict(),
                        "hooks": hook_states(hooks), "results": ctx.results})
        tasks.close()
        call(hooks, "on_run_end", ctx)  # no closing barrier: the other ranks need not wait for rank 0's files
        return ctx.results if par.main else {}
    finally:
        par.uninstall(strategy)


def _record_time(results: dict, train_s: float, evaluate_s: float) -> None:
    """Seconds per task in ``results["timing"]``: learning (begin_task, the steps, end_task) and evaluation (the
    task-end hooks), and their running total. It travels in the checkpoint, so a resumed run keeps the earlier
    tasks' times and adds only what it ran."""
    timing = results.setdefault("timing", {"train_s": [], "evaluate_s": [], "wall_s": 0.0})
    timing["train_s"].append(round(train_s, 3))
    timing["evaluate_s"].append(round(evaluate_s, 3))
    timing["wall_s"] = round(sum(timing["train_s"]) + sum(timing["evaluate_s"]), 3)


def _train(ctx: RunContext, hooks, par: Parallel, task: Task, space, offset: int, progress: bool | None) -> None:
    """Feed the task's training data: ``strategy.iterations`` steps if set (cycling), else ``epochs`` passes.
    A training set with ``begin_pass(seed)`` (random crops, `streams.images.TrainCrops`) is told each pass's seed,
    drawn from the same generator as the order, so its crops follow the run seed, the task and the pass.

    Every rank draws the same global batches (same generator) and loads only its shard of each, ahead of the step
    (`ctta.data.iter_batches`: worker processes for files, prefetch)."""
    s = ctx.strategy
    gen = torch.Generator().manual_seed(ctx.seed + 7919 * (ctx.task_index + 1))
    n = len(task.train)
    total = steps_per_task(n, s.batch_size, s.epochs, s.iterations)
    bar = tqdm(total=total, desc=f"train {task.name}", leave=False, disable=no_bar(progress, par.main))
    done = 0
    while done < total:
        order = torch.randperm(n, generator=gen)
        begin_pass = getattr(task.train, "begin_pass", None)  # random training crops: this pass's draw
        if begin_pass is not None:
            begin_pass(int(torch.randint(2 ** 62, (1,), generator=gen)))
        mine, weights = par.shard_batches([order[i:i + s.batch_size] for i in range(0, n, s.batch_size)])
        batches = iter_batches(task.train, s.batch_size, batches=mine, device=ctx.model.device)
        for (images, labels, _), weight in zip(batches, weights):
            par.set_weight(weight)
            ctx.last_stats = s.learn(images, labels.to(ctx.model.device) + offset, space)
            call(hooks, "on_batch_end", ctx)
            done += 1
            bar.update(1)
            if done >= total:
                break
        batches.close()  # stops the loader's workers of a partial last epoch
    bar.close()
