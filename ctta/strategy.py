"""The `Strategy` base class: every learning decision lives in a strategy.

The runner calls, per task: ``begin_task`` (only when the boundary is revealed), ``learn`` on batches of the
task's training data, ``end_task``; hooks evaluate with ``predict``, which has no side effects. Sample streams call
``adapt`` (no labels ever reach it). Subclasses override what they need; the defaults are a frozen zero-shot CLIP.

All parameter updates go through `step`, the one place where backward, gradient clipping, the optimizer and the
scheduler run, so that a non-finite loss or gradient is skipped and counted without touching the model.

Data parallelism is installed around a strategy, never called from inside it: ``comm`` is a `SingleProcess` unless
the loop runs under torchrun and installs its `ctta.loop.parallel.DataParallel`, which shards data, sums statistics
and synchronises gradients. A strategy only ever calls ``self.comm``'s three methods.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import Tensor

from ctta.checks import check_number
from ctta.model import Clip
from ctta.optim import steps_per_task
from ctta.state import check_optimizer_state
from ctta.stream import LabelSpace, Task


class SingleProcess:
    """Data parallelism as a strategy sees it, for one process (the default ``Strategy.comm``): every method is
    the identity. Under torchrun the loop installs `ctta.loop.parallel.DataParallel`, with the same three methods."""

    def shard(self, n: int) -> Tensor:
        """This process's indices of ``n`` items (a statistics pass over a task's data): all of them."""
        return torch.arange(n)

    def sum_(self, tensor: Tensor, what: str = "sum") -> Tensor:
        """Sum ``tensor`` over processes, in place: nothing to sum with."""
        return tensor

    def sync_gradients(self, params: list[torch.nn.Parameter], finite: bool) -> bool:
        """Make the gradients those of the global batch; returns whether every process's loss was finite."""
        return finite


class Strategy:
    """Base strategy: frozen CLIP, predictions by cosine similarity to the class text head."""

    learns: bool = True  # does the runner feed this strategy training data?
    # Under an episodic reset policy, is every sample of a call its own episode (TPT tunes per image), rather than
    # the whole call (TENT adapts on a batch)? Read by `ctta.OnlineAdapter`, the one owner of resets.
    sample_episodes: bool = False
    # The reset policy `ctta.OnlineAdapter` uses when given none: "never" (online), "episodic" or a sample count.
    default_reset: str | int = "never"
    # Is the adapted state built for one label space (TDA's caches, DMN's memory, DPE's prototypes, keyed by class)?
    # Then `ctta.OnlineAdapter` always runs the strategy on its whole label space and answers a call restricted to a
    # class subset from those logits, so a subset call neither loses nor locks the state.
    holds_label_space: bool = False
    # Prompt templates the strategy puts on every label space it predicts over (ZeroShot's and RAPF's ``templates``),
    # None: each space's own. Hooks that compare with the untouched model's zero-shot use the same prompts.
    templates: tuple[str, ...] | None = None
    # Does the strategy crop its own test-time views from the image it is given (`ctta.views.tpt_views`: view 0 the
    # eval view, the others random crops)? Then `ctta.OnlineAdapter` hands it images of any size as they come, the
    # whole photograph of a stream with ``source_side``, as the reference augmenter crops from the photograph;
    # every other strategy gets them resized and centre-cropped to the model's input.
    views_from_source: bool = False
    comm: SingleProcess = SingleProcess()  # replaced by the loop under torchrun (instance attribute)

    def __new__(cls, *args: Any, **kwargs: Any) -> "Strategy":
        # Record the constructor's arguments (defaults filled in) before __init__ runs: they are the strategy's
        # configuration, which checkpoints and adapter files are checked against (`ctta.state.strategy_config`).
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(obj, *args, **kwargs)
            bound.apply_defaults()
            obj._config = {k: v for k, v in bound.arguments.items() if k != "self"}
        except TypeError:  # bad arguments: __init__ raises the usual error
            obj._config = {}
        return obj

    def __init__(self, *, batch_size: int = 64, epochs: int = 1, iterations: int | None = None,
                 eval_batch_size: int = 256, grad_clip: float | None = None, amp: bool = False):
        if batch_size <= 0 or epochs < 0 or (iterations is not None and iterations < 0):
            raise ValueError(f"bad schedule: batch_size={batch_size}, epochs={epochs}, iterations={iterations}")
        if self.learns and epochs == 0 and not iterations:
            # would silently report zero-shot results under this strategy's name
            raise ValueError(f"{type(self).__name__}: epochs=0 trains nothing; set epochs >= 1 or iterations >= 1 "
                             f"(use strategy=zeroshot for no training)")
        check_number(type(self).__name__, "grad_clip", grad_clip, low=0.0, low_open=True, none_ok=True)
        self.batch_size = batch_size
        self.epochs = epochs
        self.iterations = iterations  # if set: exactly this many steps per task, cycling the data
        self.eval_batch_size = eval_batch_size
        self.grad_clip = grad_clip
        self.amp = amp  # bf16 autocast on CUDA (no loss scaling needed); ignored on CPU
        self.model: Clip | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.skipped_steps = 0
        self.steps = 0

    # ----------------------------------------------------------------------------------------- lifecycle
    def setup(self, model: Clip) -> None:
        """Attach to the model: freeze, inject adapters, build the optimizer."""
        self.model = model
        model.freeze()

    def begin_task(self, task: Task, space: LabelSpace) -> None:
        """A revealed task boundary; ``space`` is the label space the task is trained over."""

    def learn(self, images: Tensor, labels: Tensor, space: LabelSpace) -> dict[str, float]:
        """One supervised step on a batch whose labels index ``space``."""
        raise NotImplementedError(f"{type(self).__name__} does not learn from labelled data")

    @torch.no_grad()
    def predict(self, images: Tensor, space: LabelSpace) -> Tensor:
        """Logits ``[B, len(space)]``; pure (no state changes)."""
        return self._model().zero_shot(images, space)

    def adapt(self, images: Tensor, space: LabelSpace) -> Tensor:
        """Unlabelled test-time step: returns logits and may update the strategy. Default: predict only."""
        return self.predict(images, space)

    def end_task(self, task: Task, space: LabelSpace) -> None:
        """After training a task (merge adapters, fuse weights, store statistics...)."""

    def reseed(self, seed: int) -> None:
        """Seed the random draws that follow. `ctta.OnlineAdapter` calls it after every reset with a seed derived
        from the stream position, so that an episode's result depends neither on the order of episodes nor on the
        rank that runs it, and a restored anchor does not replay the same draws. Default: the global torch
        generator (a strategy that draws from its own generator re-seeds that too): the CPU's, and the model's CUDA
        device's when it runs on one. (``torch.manual_seed`` would also queue a seed for every CUDA device, which on
        a machine where CUDA is not initialised records a stack trace per call: 0.2-0.5 ms an episode.)"""
        torch.default_generator.manual_seed(seed)
        device = self.model.device if self.model is not None else None
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything the strategy owns (the model's weights are saved by the runner)."""
        return {
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "skipped_steps": self.skipped_steps,
            "steps": self.steps,
        }

    def check_state(self, state: dict[str, Any], what: str) -> None:
        """Raise ValueError if ``state`` (structurally checked against `state_dict` already) would load but break
        the next step: counters that are not counts, optimizer moments of the wrong shapes. Called before any
        part of a load; a strategy with more to check extends it."""
        for key in ("skipped_steps", "steps"):
            v = state.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{what}: {key} must be a count (an integer >= 0), got {v!r}")
        check_optimizer_state(state.get("optimizer"), self.optimizer, f"{what}: optimizer")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.steps = int(state.get("steps", 0))

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def min_batch(self) -> int:
        """The fewest images one ``adapt`` or ``predict`` call accepts (default 1: every sample is scored on its
        own). A strategy whose forward normalises with its batch's own statistics (TENT on a BatchNorm tower) needs
        more; a server that cannot gather that many pads the call instead (`ctta.serve.service`)."""
        return 1

    def task_steps(self, task: Task) -> int:
        """How many times the runner will call ``learn`` for ``task`` (at least 1, for schedules)."""
        n = len(task.train) if task.train is not None else 0
        return max(1, steps_per_task(n, self.batch_size, self.epochs, self.iterations))

    def _model(self) -> Clip:
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}.setup(model) has not been called")
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        m = self._model()
        if self.amp and m.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, loss: Tensor) -> bool:
        """Backward + optimizer step. A non-finite loss or gradient norm skips the update (counted in
        ``skipped_steps``) and leaves parameters and optimizer state untouched. Returns whether it stepped."""
        opt = self.optimizer
        if opt is None:
            raise RuntimeError(f"{type(self).__name__} has no optimizer; build one in setup()")
        finite = bool(torch.isfinite(loss.detach()).all())
        if finite:
            loss.backward()
        # under torchrun: the global batch's gradient on every rank, and every rank skips if any loss was not finite
        finite = self.comm.sync_gradients([p for g in opt.param_groups for p in g["params"]], finite)
        if not finite:
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return False
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if not torch.isfinite(norm):
                opt.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                return False
            if self.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(
                    [p for g in opt.param_groups for p in g["params"] if p.grad is not None], self.grad_clip, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        return True
