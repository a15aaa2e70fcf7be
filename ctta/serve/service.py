"""The server without HTTP: one `OnlineAdapter`, its micro-batcher, its state file and its metrics.

Everything that touches the adapter runs in the batcher's one model thread, in queue order: model calls, reset,
pause, resume and snapshots. Persistence is the adapter's own `OnlineAdapter.save` / `OnlineAdapter.load` (atomic,
content-hashed, checked against this adapter and rolled back on failure); this module only decides when: at start
(resume when the file exists), on ``POST /snapshot``, every ``snapshot_every_s`` when the state moved, and after
the last request at shutdown. Pause is an operator's switch, not part of the adapted state: a restarted server adapts
again until it is paused again.

**Padded calls (a deliberate serving deviation).** A strategy may need several images per model call
(`ctta.Strategy.min_batch`): TENT on a BatchNorm image tower normalises every forward with its own batch's
statistics, as the reference does, and the reference never sees a batch of 1. When a model call would hold fewer
images than that (a lone request with nobody to batch with), the call is padded with the most recent images this
server has already answered (a ring buffer of the last ``min_batch`` preprocessed inputs, on the model's device),
run **without adaptation** (`OnlineAdapter.predict`: the padding is context for the batch statistics only, never
a loss term), and only the request's own rows are answered (``adapted: false``, ``batch.padding``: how many
images were added). So a lone answer depends on the images served just before it, as an answer in a micro-batch
depends on its neighbours; the padding images come from earlier clients. Counted in ``ctta_padded_calls_total``.
Before anything has been answered (a fresh start: the ring buffer is not saved with the state) such a call is
refused with a 422 ``batch_too_small`` that says how many images to send. Calls of ``min_batch`` images or more,
alone or gathered from concurrent requests, are not touched.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ctta.files import CorruptFileError, probe_writable
from ctta.online import OnlineAdapter
from ctta.data import pil_to_rgb
from ctta.predictions import prepare_images
from ctta.views import shrink_to
from ctta.serve.batcher import Job, MicroBatcher
from ctta.serve.inputs import decode_image
from ctta.serve.metrics import Metrics
from ctta.serve.options import ServeError, ServeOptions, StateError

log = logging.getLogger("ctta.serve")


@dataclass
class Payload:
    images: Tensor | list[Tensor]  # [n, 3, H, W] preprocessed on the model's device, or n whole images [3, H, W]
    #                                on the CPU for a view strategy (`Service.decode`)
    top_k: int


class Service:
    """``adapter`` served under ``options``. Construction loads the state file when it exists (a `StateError` if
    it is corrupt or another adapter's), so a bad file stops a deployment before it listens."""

    def __init__(self, adapter: OnlineAdapter, options: ServeOptions | None = None):
        if not isinstance(adapter, OnlineAdapter):
            raise TypeError(f"serve needs a ctta.OnlineAdapter (ctta.wrap(...)), got {type(adapter).__name__}")
        self.adapter, self.options = adapter, options or ServeOptions()
        if adapter.strategy.min_batch > self.options.max_batch:
            raise ValueError(f"{type(adapter.strategy).__name__} needs {adapter.strategy.min_batch} images per model "
                             f"call, but serve.max_batch is {self.options.max_batch}: concurrent requests could "
                             f"never be gathered into a call it adapts on")
        self.space = adapter.space
        self.metrics = Metrics(self.options.window)
        self.state_path = Path(self.options.state_path).expanduser() if self.options.state_path else None
        if self.state_path is not None:  # refused now, not at the final save after hours of adaptation
            try:
                probe_writable(self.state_path.parent)
            except OSError as e:
                raise StateError(f"serve.state_path={self.state_path}: cannot write in {self.state_path.parent} "
                                 f"({e.strerror or e}); the adapted state could never be saved") from None
        self.save_error: str | None = None  # set when the final save failed: the server then exits with an error
        self.resumed = self._load_state()
        # an episodic adapter's episode is one call: each request gets its own, so its answer never depends on
        # which strangers shared its batch (per-sample episodes, as TPT's, are independent in any batch)
        merge = not (adapter.reset_policy == "episodic" and not adapter.strategy.sample_episodes)
        o = self.options
        self.batcher = MicroBatcher(self._run_batch, max_batch=o.max_batch, max_wait_ms=o.max_wait_ms,
                                    max_queue=o.max_queue, merge=merge)
        self.ready = self.draining = False
        self.paused = False
        self._pause = contextlib.ExitStack()
        self._saved = self._marker()  # nothing has moved yet (the anchor, or the file just loaded)
        self._batches = 0
        self._periodic: asyncio.Task | None = None
        self.metrics.position.set(adapter.samples)
        self._recent: Tensor | None = None  # the last min_batch images answered (padding for too-small calls)
        self.padded_calls = 0
        if adapter.strategy.min_batch > 1:
            log.info("ctta serve: %s needs %d images per model call; a smaller call is padded with the last "
                     "images answered and not adapted on", type(adapter.strategy).__name__,
                     adapter.strategy.min_batch)

    # ---------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.batcher.start()
        if self.options.snapshot_every_s:
            self._periodic = asyncio.get_running_loop().create_task(self._snapshots(), name="ctta-snapshots")
        self.ready = True

    async def stop(self) -> None:
        """Stop taking requests, serve every queued one, then write the state (when there is a state path)."""
        self.ready, self.draining = False, True
        if self._periodic is not None:
            self._periodic.cancel()
        await self.batcher.close()
        if self.state_path is not None:
            try:
                info = await self.batcher.in_model_thread(self.snapshot)
            except Exception as e:  # (a full disk, a folder removed meanwhile): said plainly; the exit code says it
                self.save_error = (f"the adapted state could not be written to {self.state_path} "
                                   f"({type(e).__name__}: {e}); this run's adaptation since the last snapshot is lost")
                log.error("ctta serve: %s", self.save_error)
            else:
                log.info("ctta serve: adapted state written to %s (%d samples)", info["path"], info["samples"])
        self.batcher.executor.shutdown(wait=True)

    def _load_state(self) -> bool:
        path = self.state_path
        if path is None or not path.exists():
            return False
        if not path.is_file():
            raise StateError(f"serve.state_path={path} is not a file")
        try:
            self.adapter.load(path)
        except (CorruptFileError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise StateError(f"refusing the state file {path}: {e}. Start with the configuration that wrote it, or "
                             f"move the file away to start from the unadapted model") from e
        log.info("ctta serve: resumed from %s (%d samples adapted on)", path, self.adapter.samples)
        return True

    # ---------------------------------------------------------------------------------------------- requests
    def decode(self, parts: list[tuple[str, bytes]]) -> Tensor:
        """Encoded images -> the model's input batch (decoded under the limits, preprocessed). Runs in a worker
        thread of its own, never in the model thread."""
        side, left, images = self.adapter.model.image_size, self.options.max_request_pixels, []
        for what, data in parts:
            images.append(decode_image(data, self.options, what, side=side, budget=left))
            left -= images[-1].size[0] * images[-1].size[1]
        if self.whole_images:  # the strategy crops its views from the whole image: shrunk here, off the model thread
            return [shrink_to(pil_to_rgb(im), self.adapter.source_side) for im in images]
        return prepare_images(self.adapter.model, images)

    @property
    def whole_images(self) -> bool:
        """Does the strategy get each image whole (`Strategy.views_from_source`: TPT, TDA, DPE, ...), as
        `ctta.OnlineAdapter` gives it, rather than its eval crop? Not with padded calls (``min_batch`` > 1), whose
        images must share one size."""
        strategy = self.adapter.strategy
        return strategy.views_from_source and strategy.min_batch <= 1

    def _run_batch(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """One model call for ``jobs`` (equal keys), in the model thread; each job gets its own rows."""
        a = self.adapter
        adapt, classes = jobs[0].key
        if self.whole_images:  # a list of whole images, perhaps of several sizes: the adapter groups them
            x = [image for j in jobs for image in j.payload.images]
        else:
            x = torch.cat([j.payload.images for j in jobs]) if len(jobs) > 1 else jobs[0].payload.images
        resets, skipped, position = a.resets, a.skipped_steps, a.samples
        pad = self._padding(len(x))  # None unless the call is smaller than the strategy's min_batch
        t = time.perf_counter()
        if pad is None:
            out = a(x, classes) if adapt else a.predict(x, classes)
        else:  # context for the batch statistics only: predict (no adaptation step), then keep the real rows
            out = a.predict(torch.cat([x, pad]), classes).head(len(x))
        seconds = time.perf_counter() - t
        self._remember(x)
        m = self.metrics
        m.call_seconds.labels("true" if out.adapted else "false").observe(seconds)
        m.batch_images.observe(len(x) + (0 if pad is None else len(pad)))
        if pad is not None:
            self.padded_calls += 1
            m.padded.inc()
        m.samples.labels("true" if out.adapted else "false").inc(len(x))
        m.resets.inc(max(0, a.resets - resets))
        m.skipped.inc(max(0, a.skipped_steps - skipped))
        m.position.set(a.samples)
        m.queue.set(self.batcher.queued_images)
        conf = out.probs.max(-1).values
        m.observe_samples(out.entropy.tolist(), conf.tolist(), out.probs.shape[1])
        names = [self.space.classnames[i] for i in range(len(self.space))] if classes is None else list(classes)
        self._batches += 1
        results, row = [], 0
        for job in jobs:
            k = job.payload.top_k
            probs, idx = out.probs[row:row + job.n].topk(k, dim=-1)
            preds = [{"class": out.classnames[row + i], "index": self.space.index(out.classnames[row + i]),
                      "confidence": float(probs[i, 0]), "entropy": float(out.entropy[row + i]),
                      "top_k": [{"class": names[j], "prob": float(p)} for j, p in zip(idx[i].tolist(),
                                                                                        probs[i].tolist())]}
                     for i in range(job.n)]
            results.append({"predictions": preds, "adapted": out.adapted, "skipped_updates": out.skipped,
                            "reset": out.reset, "position": position + row if out.adapted else None,
                            "seq": job.seq, "batch": {"id": self._batches, "images": len(x), "requests": len(jobs),
                                                          "padding": 0 if pad is None else len(pad)}})
            row += job.n
        return results

    def _padding(self, n: int) -> Tensor | None:
        """The images that bring a call of ``n`` up to the strategy's ``min_batch``: the most recent answered ones
        (None when the call is large enough). 422 when fewer have been answered so far."""
        need = self.adapter.strategy.min_batch - n
        if need <= 0:
            return None
        have = 0 if self._recent is None else len(self._recent)
        if have < need:
            strategy = self.adapter.strategy
            k, what = strategy.min_batch, type(strategy).__name__
            if getattr(strategy, "batch_norms", None):
                what += " on a BatchNorm image tower"
            raise ServeError(422, "batch_too_small", f"this strategy ({what}) needs at least {k} images per model "
                             f"call, and this server has no earlier images to pad a call of {n} with yet; send {k} "
                             f"or more images in one request (the first request), or send concurrent requests")
        return self._recent[have - need:]

    def _remember(self, x: Tensor) -> None:
        """Keep the last ``min_batch`` answered images (copies, so a large call's batch is not held)."""
        k = self.adapter.strategy.min_batch
        if k <= 1:
            return
        recent = x.detach() if self._recent is None else torch.cat([self._recent, x.detach()])
        self._recent = recent[-k:].clone()

    # ---------------------------------------------------------------------------------------------- control
    def reset(self) -> dict[str, Any]:
        self.adapter.reset()
        self.metrics.resets.inc()
        return {"reset": True, "samples": self.adapter.samples}

    def pause(self) -> dict[str, Any]:
        if not self.paused:  # idempotent: one /resume undoes any number of /pause
            self._pause.enter_context(self.adapter.paused())
            self.paused = True
            self.metrics.paused.set(1)
        return {"paused": True}

    def resume(self) -> dict[str, Any]:
        self._pause.close()
        self._pause = contextlib.ExitStack()
        self.paused = False
        self.metrics.paused.set(0)
        return {"paused": False}

    def snapshot(self) -> dict[str, Any]:
        """Write the adapted state to the state path (atomic: `OnlineAdapter.save`)."""
        if self.state_path is None:
            raise ServeError(409, "no_state_path", "this server has no state path (serve.state_path), so there is "
                             "nowhere to snapshot to")
        path = self.adapter.save(self.state_path)
        self._saved = self._marker()
        self.metrics.snapshots.inc()
        return {"path": str(path), "bytes": path.stat().st_size, "samples": self.adapter.samples}

    def _marker(self) -> tuple[int, int, int]:
        a = self.adapter
        return a.calls, a.samples, a.resets

    async def _snapshots(self) -> None:
        """Every ``snapshot_every_s``: a snapshot through the queue, when the state moved since the last one."""
        while True:
            await asyncio.sleep(self.options.snapshot_every_s)
            if self._marker() == self._saved:
                continue
            try:
                await self.batcher.control(self.snapshot)
            except ServeError:  # shutting down: the final snapshot follows
                return
            except Exception as e:  # a full disk must not stop the serving; say so and try again next time
                log.error("ctta serve: periodic snapshot to %s failed: %s", self.state_path, e)

    def info(self) -> dict[str, Any]:
        a = self.adapter
        return {"status": "ok" if self.batcher.alive or not self.ready else "worker stopped",
                "strategy": type(a.strategy).__name__, "reset_policy": a.reset_policy, "classes": len(self.space),
                "samples": a.samples, "calls": a.calls, "resets": a.resets, "paused": self.paused,
                "queue_images": self.batcher.queued_images, "state_path": str(self.state_path or "") or None,
                "resumed": self.resumed, "micro_batching": self.batcher.merge,
                "min_batch": a.strategy.min_batch, "padded_calls": self.padded_calls}
