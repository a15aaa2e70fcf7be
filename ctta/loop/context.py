"""`RunContext`, what every hook sees, and `call`, the whole hook mechanism."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from torch import Tensor

from ctta.model import Clip
from ctta.strategy import Strategy
from ctta.stream import LabelSpace, Task, TaskStream

if TYPE_CHECKING:
    from ctta.online import OnlineAdapter

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What hooks see, for task and sample streams alike. Hooks read it and write only into ``results``.

    ``on_run_start`` comes before the strategy touches the model (no setup, no adapters, no resumed weights), so a
    hook measures the untouched model there through ``model`` (``strategy`` is not usable yet)."""

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
    last_stats: dict[str, float] = field(default_factory=dict)  # task streams: the last ``learn``'s figures
    # sample streams: the adapter and the batch just adapted on (read in ``on_batch_end``)
    adapter: "OnlineAdapter | None" = None
    space: LabelSpace | None = None
    position: int = 0            # samples processed in the whole stream, this batch included
    task_position: int = 0       # samples processed in the current task, this batch included
    logits: Tensor | None = None  # [B, C] returned by the adapter (over ``space``)
    labels: Tensor | None = None  # [B] indices into ``space`` (CPU); never passed to the strategy
    seconds: float = 0.0         # wall time of the adapter call (CUDA synchronised)


def call(hooks: Sequence[Any], event: str, ctx: RunContext) -> None:
    """Duck-typed dispatch: every hook with a method named ``event`` is called, in order."""
    for h in hooks:
        fn = getattr(h, event, None)
        if fn is not None:
            fn(ctx)


def finish_again(hooks: Sequence[Any], ctx: RunContext, what: str) -> None:
    """A finished run started again: nothing is redone, but if a kill came between the final checkpoint and the
    end-of-run writes (a hook with ``written(ctx)`` says its final files are missing, unfinished or damaged), the
    run's end is played again from the saved state, so the results on disk are those of the finished run."""
    missing = [type(h).__name__ for h in hooks if hasattr(h, "written") and not h.written(ctx)]
    if not missing:
        log.info("run already finished (%s): nothing to do", what)
        return
    log.info("run already finished (%s), but its final results were not all written (%s): writing them from the "
             "saved state", what, ", ".join(missing))
    call(hooks, "on_run_end", ctx)


def no_bar(progress: bool | None, main: bool = True) -> bool | None:
    """tqdm's ``disable``: None (auto: only on a terminal) unless ``progress`` says; always off off rank 0."""
    if not main:
        return True
    return None if progress is None else not progress


def share_progress(hooks: Sequence[Any], progress: bool | None) -> None:
    """The run's ``progress`` setting reaches the hooks that draw bars of their own (evaluation), unless a hook was
    given its own setting."""
    if progress is None:
        return
    for h in hooks:
        if hasattr(h, "progress") and h.progress is None:
            h.progress = progress
