"""The sample-stream loop (test-time adaptation benchmarks), read top to bottom.

Each task of the stream is a test-time domain (no training data). Its test samples are fed in order, ``batch_size``
at a time, through one `OnlineAdapter`, so the loop measures exactly what a deployed adapter does: the strategy sees
images only; labels stay here and reach only the hooks, which score the returned logits. The adapter owns every
reset (its policy, and here the revealed domain boundaries when ``reset_on_shift``); at a revealed boundary
``strategy.begin_task`` is called too, and a hidden boundary changes nothing the strategy can see.

With ``out_dir`` the stream position, the adapter state, the RNG states, the hooks' states and the results are
checkpointed every ``checkpoint_every`` samples or ``checkpoint_seconds`` seconds, whichever comes first; re-running
with the same ``out_dir`` resumes there and ends with the same metrics as an uninterrupted run.

Each task's test batches (this rank's, from the resume position on) are loaded ahead through `ctta.loading` (its
``workers`` / ``prefetch`` options; auto: no workers on one core): a file-backed dataset is decoded in worker
processes while the model adapts on the previous batches; the batches, their order and every prediction are those of
loading one batch at a time (on CUDA, ``device_decode`` may decode JPEGs with nvJPEG, as for evaluation). In-memory
datasets are still loaded in process, one ``get_batch`` call per batch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ctta import distributed
from ctta.data import iter_batches
from ctta.loading import in_memory, loading_defaults
from ctta.loop.checkpoint import (Checkpoint, check_saved, ensure_writable, hook_states, load_hook_states,
                                  rng_state, run_identity, seed_everything, set_rng_state)
from ctta.loop.context import RunContext, call, finish_again, no_bar, share_progress
from ctta.loop.parallel import Parallel
from ctta.model import Clip
from ctta.online import OnlineAdapter, ResetPolicy, resolve_policy
from ctta.strategy import Strategy
from ctta.stream import TaskStream

CHECKPOINT = "samples_checkpoint.pt"
log = logging.getLogger("ctta")


def fingerprint(stream: TaskStream, strategy: Strategy, seed: int, batch_size: int, reset: Any,
                model: Clip | None = None, hooks: Sequence[Any] = (), reset_on_shift: bool = True) -> dict:
    """The run's identity in its checkpoint (`ctta.loop.checkpoint.run_identity`), with the batch size and the reset
    settings."""
    return run_identity(stream, strategy, seed, model, hooks, batch_size=batch_size, reset=str(reset),
                        reset_on_shift=bool(reset_on_shift))


def run_samples(model: Clip, strategy: Strategy, stream: TaskStream, hooks: Sequence[Any] = (), *,
                batch_size: int = 1, reset: ResetPolicy | None = None, reset_on_shift: bool = True,
                drift: Callable[[dict], bool] | None = None, out_dir: str | Path | None = None,
                checkpoint_every: int | None = 1000, checkpoint_seconds: float | None = 60.0, seed: int = 0,
                config: Any = None, progress: bool | None = None, round_batches: int = 32) -> dict:
    """Run a sample stream through a test-time strategy; returns the results dict the hooks filled.

    ``reset``: the adapter's policy (None: the strategy's ``default_reset``, e.g. episodic for TPT). Under torchrun
    an episodic stream's episodes are dealt to the ranks in rounds of ``round_batches`` per rank and scored in
    stream order on rank 0 (the same predictions as one process); an online stream depends on its order and runs
    on rank 0 alone."""
    for name, v in (("batch_size", batch_size), ("round_batches", round_batches),
                    ("checkpoint_every", checkpoint_every), ("checkpoint_seconds", checkpoint_seconds)):
        if v is not None and not v > 0:  # NaN too
            raise ValueError(f"samples.{name} must be positive, got {v}")
    policy = resolve_policy(reset, strategy)
    par = Parallel.for_sample_stream(episodic=policy == "episodic")
    if par.idle:
        return {}
    out = Path(out_dir) if out_dir else None
    if out is not None and par.main:
        ensure_writable(out)
    fp = fingerprint(stream, strategy, seed, batch_size, policy, model, hooks, reset_on_shift)
    par.check_same(fp, "sample stream")
    hooks = list(hooks) if par.main else []
    share_progress(hooks, progress)
    ckpt = Checkpoint(out, CHECKPOINT, fp, par)
    saved = ckpt.read(model.device)  # before anything is adapted or written
    ctx = RunContext(model, strategy, stream, out, seed, config)
    check_saved(saved, ckpt.path, {"task": int, "offset": int, "position": int, "adapter": dict, "rng": object,
                                   "hooks": list, "results": dict},
                {"task": (0, len(stream)), "offset": (0, None), "position": (0, None)})
    start_task, start_offset = (int(saved["task"]), int(saved["offset"])) if saved else (0, 0)
    if saved:
        if par.main:
            load_hook_states(hooks, saved["hooks"], ckpt.path)
            ctx.results.update(saved["results"])
        ctx.position, ctx.resumed = int(saved["position"]), True
        log.info("resuming %s at sample %d", out, ctx.position)
    if start_task < len(stream):
        call(hooks, "on_run_start", ctx)  # the untouched model: the adapter has not set the strategy up yet
    seed_everything(seed)
    ctx.adapter = adapter = OnlineAdapter(model, strategy, stream.train_space(0)[0], reset=policy, drift=drift,
                                          seed=seed)
    if strategy.min_batch > batch_size:  # known once set up (TENT on a BatchNorm tower): refused before any sample
        adapter.close()
        raise ValueError(f"samples.batch_size={batch_size}, but {type(strategy).__name__} needs {strategy.min_batch} "
                         f"images per call on this model (batch statistics); set samples.batch_size="
                         f"{strategy.min_batch} or more")
    try:
        if saved:
            adapter.space = stream.train_space(min(start_task, len(stream) - 1))[0]
            adapter.load_state_dict(distributed.to_device(saved["adapter"], model.device))
            set_rng_state(saved["rng"])
        if start_task >= len(stream):
            finish_again(hooks, ctx, f"{ctx.position} samples")
            return ctx.results
        _stream(ctx, hooks, par, ckpt, batch_size, reset_on_shift, start_task, start_offset, checkpoint_every,
                checkpoint_seconds, round_batches, progress)
        return ctx.results
    finally:
        adapter.close()


def _prefetched(dataset: Any, batches: list[torch.Tensor], batch_size: int, device: torch.device
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(images, labels, indices)`` of ``batches`` in order, loaded ahead by `ctta.loading` (the process's loading
    options); an in-memory dataset never gets workers (they would only copy its tensors between processes)."""
    opts = loading_defaults()
    if in_memory(dataset):
        opts = replace(opts, workers=0)
    return iter_batches(dataset, batch_size, batches=batches, device=device, loading=opts)


def _stream(ctx: RunContext, hooks, par: Parallel, ckpt: Checkpoint, batch_size: int, reset_on_shift: bool,
            start_task: int, start_offset: int, every: int | None, seconds: float | None, round_batches: int,
            progress: bool | None) -> None:
    stream, adapter, strategy, model = ctx.stream, ctx.adapter, ctx.strategy, ctx.model
    lengths = [len(t.test) for t in stream.tasks]
    bar = tqdm(total=sum(lengths), initial=ctx.position, desc=f"adapt {stream.name}", unit="sample",
               disable=no_bar(progress, par.main), leave=False)
    last_pos, last_time = ctx.position, time.monotonic()

    def save(task: int, offset: int) -> None:
        ckpt.write({"task": task, "offset": offset, "position": ctx.position, "adapter": adapter.state_dict(),
                    "rng": rng_state(), "hooks": hook_states(hooks), "results": ctx.results})

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
        base = sum(lengths[:t])  # stream position of the task's first sample: seeds episodes on any rank
        starts = list(range(first, lengths[t], batch_size))
        rounds = list(par.rounds(len(starts), round_batches))  # this rank's batches of each round, known up front
        loaded = _prefetched(task.test, [torch.arange(starts[b], min(starts[b] + batch_size, lengths[t]))
                                         for mine in rounds for b in mine], batch_size, model.device)
        try:
            for mine in rounds:
                outs = []
                for b in mine:
                    images, labels, _ = next(loaded)
                    t0 = time.perf_counter()
                    logits = adapter(images, position=base + starts[b]).logits  # images only: labels stay here
                    if model.device.type == "cuda":
                        torch.cuda.synchronize(model.device)
                    outs.append((b, logits.cpu() if par.active else logits, labels, time.perf_counter() - t0))
                for b, logits, labels, secs in par.gather(outs, "episode outputs"):
                    ctx.logits, ctx.labels, ctx.seconds = logits, labels + offset, secs
                    ctx.position += len(labels)
                    ctx.task_position += len(labels)
                    call(hooks, "on_batch_end", ctx)
                    bar.update(len(labels))
                due = (every is not None and ctx.position - last_pos >= every) or (
                    seconds is not None and time.monotonic() - last_time >= seconds)
                if ckpt.path is not None and par.main and due:
                    save(t, ctx.task_position)
                    last_pos, last_time = ctx.position, time.monotonic()
        finally:
            loaded.close()  # a task left early (an error, a kill) stops its loader's workers now
        if task.boundary:  # the end of a revealed task is revealed too
            strategy.end_task(task, space)
        call(hooks, "on_task_end", ctx)
    bar.close()
    save(len(stream), 0)
    call(hooks, "on_run_end", ctx)
