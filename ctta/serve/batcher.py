"""Micro-batching: concurrent requests gathered into one model call, in the order they reach the queue.

One worker (an asyncio task) owns the model: it takes the oldest job, then gathers the jobs queued behind it that
can share its call (same class subset, same adapt flag) for up to ``max_wait_ms`` or until ``max_batch`` images,
and runs the call in its one model thread. So an online strategy sees every sample in one well-defined order — the
order of ``seq``, the number each job gets when it is queued — and each job gets back its own rows of the call.
Control jobs (reset, pause, resume, snapshot) go through the same queue: a reset lands between the requests queued
before it and those queued after it, never inside a batch.

The gathering stops early when no other request is on its way (none being read or decoded), so a lone client does
not pay the wait: the wait only buys something when more requests are coming. Request bodies are decoded before
they are queued, so the queue holds ready tensors and its bound (``max_queue`` images) is a bound on memory.
Shapes of this kind of batcher are common in model servers (TF Serving's ``batch_timeout_micros`` /
``max_batch_size``, Triton's dynamic batcher's ``max_queue_delay_microseconds``); this one is written for ctta.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from ctta.serve.options import ServeError


@dataclass
class Job:
    """One queued unit: a request's images (``n`` of them) with its call key, or a control function."""

    seq: int
    n: int                        # images (0 for a control job)
    key: Hashable = None          # jobs share a model call only when their keys are equal
    payload: Any = None           # what the batch function reads (images, options)
    control: Callable[[], Any] | None = None
    future: asyncio.Future = field(default=None, repr=False)


class MicroBatcher:
    """``run_batch(jobs) -> results`` (one result per job, in order) and control functions run in one thread,
    one at a time, in queue order. ``merge=False``: every request is its own call (episodic adapters, whose episode
    is a call: a co-batched stranger must not change a request's answer)."""

    def __init__(self, run_batch: Callable[[list[Job]], list[Any]], *, max_batch: int, max_wait_ms: float,
                 max_queue: int, merge: bool = True):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait_ms / 1000
        self.max_queue, self.merge = max_queue, merge
        self.queue: collections.deque[Job] = collections.deque()
        self.queued_images = 0
        self.arriving = 0         # requests being read / decoded: more jobs are on their way
        self.seq = 0
        self.closed = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctta-model")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ---------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="ctta-batcher")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        """Refuse new jobs, finish every queued one, stop the worker (the model thread stays for a final save)."""
        self.closed = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task

    async def in_model_thread(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the model thread outside the queue (only once the worker has stopped: a final save)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    # ---------------------------------------------------------------------------------------------- submitting
    def arrive(self) -> None:
        """A request has started arriving (its body is being read or decoded)."""
        self.arriving += 1

    def gone(self) -> None:
        """That request is queued now, or was refused."""
        self.arriving -= 1
        self._poke()

    def submit(self, n: int, key: Hashable, payload: Any) -> asyncio.Future:
        """Queue a request of ``n`` images; its future resolves to its result. 503 when full or shutting down."""
        if self.closed:
            raise ServeError(503, "shutting_down", "the server is shutting down; retry on another replica or "
                             "after the restart")
        if self.queued_images + n > self.max_queue:
            raise ServeError(503, "queue_full", f"the queue holds {self.queued_images} images (limit "
                             f"{self.max_queue}, serve.max_queue); retry shortly")
        return self._put(Job(self._next_seq(), n, key, payload))

    def control(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Queue ``fn`` to run in the model thread between the jobs queued before and after it."""
        if self.closed:
            raise ServeError(503, "shutting_down", "the server is shutting down")
        return self._put(Job(self._next_seq(), 0, control=fn))

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1

    def _put(self, job: Job) -> asyncio.Future:
        job.future = asyncio.get_running_loop().create_future()
        self.queue.append(job)
        self.queued_images += job.n
        self._poke()
        return job.future

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ---------------------------------------------------------------------------------------------- the worker
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                if self.closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self.queue.popleft()
            self.queued_images -= first.n
            if first.control is not None:
                await self._finish([first], loop.run_in_executor(self.executor, first.control), single=True)
                continue
            batch = await self._gather(first)
            await self._finish(batch, loop.run_in_executor(self.executor, self.run_batch, batch))

    async def _gather(self, first: Job) -> list[Job]:
        """``first`` and the jobs behind it that may share its call, waiting at most ``max_wait`` for them."""
        batch, n = [first], first.n
        deadline = time.monotonic() + self.max_wait
        while self.merge and n < self.max_batch:
            self._wake.clear()
            while self.queue:  # take what is queued and fits; stop at a control job or another key (order kept)
                nxt = self.queue[0]
                if nxt.control is not None or nxt.key != first.key or n + nxt.n > self.max_batch:
                    return batch
                self.queue.popleft()
                self.queued_images -= nxt.n
                batch.append(nxt)
                n += nxt.n
            left = deadline - time.monotonic()
            if n >= self.max_batch or left <= 0 or self.closed or self.arriving <= 0:
                break  # full, waited long enough, draining, or nobody else is on the way
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                pass
        return batch

    async def _finish(self, jobs: list[Job], work: asyncio.Future, single: bool = False) -> None:
        try:
            results = await work
        except Exception as e:  # the model call failed: every job in it gets the error, the worker carries on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job, result in zip(jobs, [results] if single else results):
            if not job.future.done():  # a client that went away cancelled its future; the job was still served
                job.future.set_result(result)
