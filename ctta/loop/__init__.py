"""The loop: the one place that owns the clock, checkpoints and ranks (`run` dispatches on the kind of stream)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ctta.loop.checkpoint import RunMismatch
from ctta.loop.context import RunContext, call
from ctta.loop.samples import run_samples
from ctta.loop.tasks import run_tasks
from ctta.model import Clip
from ctta.strategy import Strategy
from ctta.stream import TaskStream

__all__ = ["RunContext", "RunMismatch", "call", "run", "run_samples", "run_tasks"]


def run(model: Clip, strategy: Strategy, stream: TaskStream, hooks: Sequence[Any] = (), *,
        out_dir: str | Path | None = None, seed: int = 0, config: Any = None, progress: bool | None = None,
        samples: dict | None = None) -> dict:
    """Run ``stream`` through ``strategy`` on ``model``; returns the results dict the hooks filled.

    A stream with training data is a task stream (`run_tasks`: continual learning); one without any is a
    test-time sample stream (`run_samples`; ``samples``: its keyword options, e.g. ``batch_size``, ``reset``,
    ``checkpoint_every``; ignored for task streams, so that one config serves both kinds)."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a ctta.Strategy, got {type(strategy).__name__}")
    if len(stream) == 0:
        raise ValueError(f"stream {stream.name!r} has no tasks")
    if all(t.train is None for t in stream.tasks):
        return run_samples(model, strategy, stream, hooks, out_dir=out_dir, seed=seed, config=config,
                           progress=progress, **(samples or {}))
    return run_tasks(model, strategy, stream, hooks, out_dir=out_dir, seed=seed, config=config, progress=progress)
