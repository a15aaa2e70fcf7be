"""`OnlineAdapter`: a deployed CLIP that predicts and adapts on every call.

    adapter = ctta.wrap(clip, Tent(), ["cat", "dog"], reset="never")
    out = adapter(images)            # adapts, then returns logits, probabilities and class names
    with adapter.paused():           # serve without adapting (strategy.predict, no state change)
        out = adapter(images)
    adapter.save("adapted.pt")       # strategy state + the model's trainable tensors, atomic, weights_only-loadable

The adapter is the one owner of resets (architecture.md, "State ownership"): the anchor, the reset policy and the
request lock. Strategies keep only their state (``state_dict``) and never reset themselves. The anchor is a small
snapshot taken once after ``strategy.setup``: the model's trainable tensors and the strategy's ``state_dict()``
(optimizer moments, prompt context, caches), cloned so it never aliases live state; restoring copies it back
(cloning again), so two resets give identical outputs. After a reset the strategy is re-seeded from the stream
position (`Strategy.reseed`), so a restored anchor does not replay the same random views.

One adapter holds a `Clip` at a time: a second adapter on the same model is refused (`close()` releases it, or
wrap a copy), since two adapters would silently share the weights they adapt.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from ctta.io import atomic_torch_save, safe_torch_load
from ctta.model import Clip
from ctta.predictions import (SOURCE_SIDE, Prediction, as_clip, as_space, class_subset, make_prediction,
                              prepare_images, prepare_sources)
from ctta.state import (check_finite_weights, check_same_structure, clone_tree, differences, short,
                        strategy_config)
from ctta.strategy import Strategy
from ctta.views import check_source_side
from ctta.stream import DEFAULT_TEMPLATES, LabelSpace

ResetPolicy = Literal["never", "episodic"] | int
FORMAT = 2
log = logging.getLogger(__name__)


# the network each live adapter holds (weak on both sides: a dropped adapter or model frees its entry)
_HOLDERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def resolve_policy(reset: ResetPolicy | None, strategy: Strategy) -> ResetPolicy:
    """``reset`` checked, or the strategy's ``default_reset`` when None (TPT's protocol is episodic)."""
    policy = getattr(strategy, "default_reset", "never") if reset is None else reset
    if not (policy in ("never", "episodic") or (isinstance(policy, int) and not isinstance(policy, bool)
                                                   and policy > 0)):
        raise ValueError(f"reset must be 'never', 'episodic' or a positive sample count, got {policy!r}")
    return policy


def episode_seed(seed: int, position: int) -> int:
    """The seed of the episode starting at stream ``position``: a function of the position only (any rank)."""
    return (seed * 1_000_003 + position) % 2**63


class Snapshot:
    """Trainable tensors of the model + the strategy's state, detached copies (never the whole CLIP)."""

    def __init__(self, model: Clip, strategy: Strategy):
        self.model_state = model.trainable_state()  # already clones
        self.strategy_state = clone_tree(strategy.state_dict())

    def restore(self, model: Clip, strategy: Strategy) -> None:
        model.load_trainable_state(self.model_state)  # in-place copy: the anchor stays untouched
        # torch optimizers keep the loaded tensors by reference: hand them a copy, never the anchor itself
        strategy.load_state_dict(clone_tree(self.strategy_state))


def _columns(logits: Tensor, columns: list[int] | None) -> Tensor:
    """The logits of the chosen classes (all of them for None); malformed logits pass through to be named."""
    if columns is None or logits.dim() != 2 or logits.shape[1] <= max(columns):
        return logits
    return logits[:, columns]


def _read_counters(c: dict[str, Any]) -> tuple[int, int, int, int, bool, bool]:
    """The saved counters as ``(calls, samples, resets, since_reset, dirty, reseed)``, checked before a load."""
    try:
        counts = tuple(int(c[k]) for k in ("calls", "samples", "resets", "since_reset"))
    except (KeyError, TypeError, ValueError):
        raise ValueError("saved adapter state: 'counters' must hold the integers calls, samples, resets and "
                         f"since_reset; got {short(c)}") from None
    if min(counts) < 0:
        raise ValueError(f"saved adapter state: negative counters {short(c)}")
    return (*counts, bool(c.get("dirty", True)), bool(c.get("reseed", False)))


class OnlineAdapter:
    """Predict-and-adapt front of a deployed CLIP. Thread-safe: calls are serialised by one lock.

    ``reset``: ``"never"`` (online: the state persists), ``"episodic"`` (every episode starts from the anchor and the
    adapter rests there between calls; an episode is a call, or each sample of it for strategies with
    ``sample_episodes`` such as TPT), ``k`` (back to the anchor once ``k`` samples have been adapted on since the
    last reset), or None: the strategy's ``default_reset``. ``drift``: optional ``callable(stats) -> bool`` called
    after every adapting call with ``entropy`` and ``confidence`` (batch means), ``entropy_normalized``
    (entropy / log C), ``samples``, ``samples_since_reset``, ``skipped_steps``; returning True resets, so the next
    call starts from the anchor. ``seed``: seeds the strategy's random draws after every reset (`episode_seed`).
    ``source_side``: for a strategy that crops its own views (`Strategy.views_from_source`: TPT, TDA, DPE, ...),
    images are kept whole, shrunk only above this shorter side (`prepare_sources`), as the reference augmenter
    crops from the photograph; a call whose images differ in size runs as several strategy calls, in order.
    """

    def __init__(self, model: Clip, strategy: Strategy, space: LabelSpace | Sequence[str], *,
                 reset: ResetPolicy | None = None, drift: Callable[[dict], bool] | None = None, seed: int = 0,
                 source_side: int = SOURCE_SIDE):
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a ctta.Strategy, got {type(strategy).__name__}")
        if drift is not None and not callable(drift):
            raise TypeError("drift must be a callable(stats: dict) -> bool")
        self.reset_policy, self.drift, self.seed = resolve_policy(reset, strategy), drift, int(seed)
        self.model = as_clip(model)
        self.strategy = strategy
        self.space = as_space(space)
        self.source_side = check_source_side(source_side, self.model.image_size)
        holder = _HOLDERS.get(self.model.net)
        if holder is not None and holder() is not None:
            raise ValueError("this Clip is already held by another OnlineAdapter, which adapts its weights; two "
                             "adapters on one model would silently share them. Call close() on the other adapter, "
                             "or wrap a copy (copy.deepcopy(clip))")
        if strategy.model is not None and strategy.model is not self.model:
            raise ValueError(f"this {type(strategy).__name__} is set up on another model; use a new strategy "
                             f"instance for each adapter")
        if strategy.model is not self.model:
            strategy.setup(self.model)
        _HOLDERS[self.model.net] = weakref.ref(self)
        self._anchor = Snapshot(self.model, strategy)
        self._lock = threading.RLock()
        self._paused = 0
        self._dirty = False       # has the state moved away from the anchor since the last restore?
        self._reseed = True       # re-seed the strategy before the next adaptation (fresh or just reset)
        self.calls = self.samples = self.resets = self._since_reset = 0

    def close(self) -> None:
        """Release the model so that another adapter may hold it (the adapted weights stay as they are)."""
        holder = _HOLDERS.get(self.model.net)
        if holder is not None and holder() is self:
            del _HOLDERS[self.model.net]

    # ----------------------------------------------------------------------------------------- serving
    def __call__(self, images: Any, classes: Sequence[str] | None = None, *, position: int | None = None
                 ) -> Prediction:
        """Predict and adapt on a batch: a float tensor ``[B, 3, H, W]`` in [0, 1], a PIL image or a list of PIL
        images (preprocessed with `Clip.preprocess`). ``classes`` restricts the prediction to some of the
        adapter's class names (a strategy whose state is keyed by class, `Strategy.holds_label_space`, still adapts
        over all of them, and the answer is read from those logits). A tensor of another size than the model's is
        resized and centre-cropped as a PIL image is, unless the strategy crops its own views from the whole image
        (`Strategy.views_from_source`): then images are kept whole (``source_side``), and a list may also hold image
        tensors ``[3, H, W]`` of different sizes. ``position``: the stream position of the first image (seeds random
        draws after a reset; default: the number of samples this adapter has adapted on)."""
        with self._lock:
            batches = (prepare_sources(self.model, images, self.source_side) if self.strategy.views_from_source
                       else [prepare_images(self.model, images)])
            starts = [sum(len(b) for b in batches[:k]) for k in range(len(batches))]
            space = class_subset(self.space, classes)
            # a strategy whose state is keyed by class runs on the whole space; the subset is read from its logits
            run_space, columns = space, None
            if self.strategy.holds_label_space and space is not self.space:
                run_space, columns = self.space, [self.space.index(c) for c in space.classnames]
            if self._paused:
                logits = _columns(torch.cat([self.strategy.predict(x, run_space) for x in batches]), columns)
                return make_prediction(logits, space, self._who, adapted=False, skipped=0, reset=False)
            position = self.samples if position is None else int(position)
            before = self.strategy.skipped_steps
            episodic = self.reset_policy == "episodic"
            did_reset = episodic or (isinstance(self.reset_policy, int) and self._since_reset >= self.reset_policy)
            if did_reset and not episodic:
                self._restore()
            runs = [(x, position + k) for x, k in zip(batches, starts)]
            logits = _columns(self._episodes(runs, run_space) if episodic else self._online(runs, run_space), columns)
            out = make_prediction(logits, space, self._who, adapted=True, skipped=self.strategy.skipped_steps - before,
                               reset=did_reset)
            if self.drift is not None and self._drifted(out, len(space)):
                self._restore()
                out.reset = True
            return out

    def _drifted(self, out: Prediction, n_classes: int) -> bool:
        """The drift callable's verdict. It runs after the call has adapted, so if it raises, the prediction is still
        returned (the caller would otherwise lose it) and the error is logged with its traceback."""
        try:
            return bool(self.drift(self._stats(out, n_classes)))
        except Exception:
            log.exception("the drift callable raised; this call's prediction is returned without a reset")
            return False

    def _adapt(self, x: Tensor, space: LabelSpace, position: int) -> Tensor:
        if self._reseed:
            self.strategy.reseed(episode_seed(self.seed, position))
            self._reseed = False
        self._dirty = True
        return self.strategy.adapt(x, space)

    def _count(self, n: int, counted: bool) -> bool:
        """Count ``n`` images adapted on as soon as they are (a call that fails part-way leaves the counters at what
        was adapted on, so the next call's positions and episode seeds follow on), and the call once."""
        self.calls += not counted
        self.samples += n
        self._since_reset += n
        return True

    def _online(self, runs: list[tuple[Tensor, int]], space: LabelSpace) -> Tensor:
        out, counted = [], False
        for x, position in runs:
            out.append(self._adapt(x, space, position))
            counted = self._count(len(x), counted)
        return torch.cat(out)

    def _episodes(self, runs: list[tuple[Tensor, int]], space: LabelSpace) -> Tensor:
        """Episodic: each episode starts from the anchor, and the adapter rests there afterwards, even after a
        failure. An episode is the whole call (all its runs of equal size), or each image of it for a strategy with
        ``sample_episodes`` (TPT, ZERO)."""
        episodes = ([[(x[i:i + 1], position + i)] for x, position in runs for i in range(len(x))]
                    if self.strategy.sample_episodes else [runs])
        out, counted = [], False
        try:
            for episode in episodes:
                if self._dirty:
                    self._restore()
                self._reseed = True
                for x, position in episode:
                    out.append(self._adapt(x, space, position))
                    counted = self._count(len(x), counted)
                self._restore()
        finally:
            if self._dirty:
                self._restore()
        return torch.cat(out)

    def predict(self, images: Any, classes: Sequence[str] | None = None) -> Prediction:
        """Predict without adapting (no state change)."""
        with self.paused():
            return self(images, classes)

    @contextlib.contextmanager
    def paused(self) -> Iterator["OnlineAdapter"]:
        """Serve without adapting inside the block (for every caller: the adapter is shared)."""
        with self._lock:
            self._paused += 1
        try:
            yield self
        finally:
            with self._lock:
                self._paused -= 1

    def reset(self) -> None:
        """Back to the anchor (the state right after ``strategy.setup``)."""
        with self._lock:
            self._restore()

    @property
    def skipped_steps(self) -> int:
        """Adaptation steps skipped because their loss or gradient was non-finite (model left unchanged)."""
        return self.strategy.skipped_steps

    # ----------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """The adapted state: the model's trainable tensors, the strategy's state and the counters (copies)."""
        with self._lock:
            return {"format": FORMAT, "fingerprint": self._fingerprint(), "model": self.model.trainable_state(),
                    "strategy": clone_tree(self.strategy.state_dict()),
                    "counters": {"calls": self.calls, "samples": self.samples, "resets": self.resets,
                                 "since_reset": self._since_reset, "dirty": self._dirty, "reseed": self._reseed}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`. Everything is checked first (format, strategy class and configuration, label
        space, tensor shapes), and a load that still fails half-way is rolled back: a failed load changes nothing."""
        with self._lock:
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                got = state.get("format") if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"not an OnlineAdapter state of this version (format {got!r}, expected {FORMAT})")
            for key in ("fingerprint", "model", "strategy", "counters"):
                if not isinstance(state.get(key), dict):
                    raise ValueError(f"saved adapter state: {key!r} is missing or not a dict")
            counters = _read_counters(state["counters"])
            mine, theirs = self._fingerprint(), state["fingerprint"]
            for key in mine:
                if key == "config" and isinstance(theirs.get(key), dict) and mine[key] != theirs[key]:
                    diff = ", ".join(differences(theirs[key], mine[key], sep=" ", n=120))
                    raise ValueError(f"saved adapter state is of a differently configured "
                                     f"{type(self.strategy).__name__}: config differs: {diff} (saved -> here)")
                if mine[key] != theirs.get(key):
                    raise ValueError(f"saved adapter state does not match this adapter: {key} was "
                                     f"{short(theirs.get(key))}, is {short(mine[key])}")
            check_same_structure(state["model"], self.model.trainable_state(), "saved adapter state: model")
            check_finite_weights(state["model"], "saved adapter state: model")
            check_same_structure(state["strategy"], self.strategy.state_dict(), "saved adapter state: strategy")
            self.strategy.check_state(state["strategy"], "saved adapter state: strategy")
            backup = Snapshot(self.model, self.strategy)
            try:
                self.model.load_trainable_state(state["model"])
                self.strategy.load_state_dict(clone_tree(state["strategy"]))
            except (TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
                backup.restore(self.model, self.strategy)  # a malformed value the checks above do not cover
                raise ValueError(f"saved adapter state does not load into this {self._who} "
                                 f"({type(e).__name__}: {e}); nothing was changed") from e
            except BaseException:
                backup.restore(self.model, self.strategy)
                raise
            (self.calls, self.samples, self.resets, self._since_reset, self._dirty, self._reseed) = counters

    def save(self, path: str | Path) -> Path:
        """Write `state_dict` atomically, content-hashed (a reader never sees a partial file)."""
        return atomic_torch_save(path, self.state_dict())

    def load(self, path: str | Path) -> None:
        """Load a file written by `save` (hash verified, ``weights_only=True``; a failed load changes nothing)."""
        self.load_state_dict(safe_torch_load(path, map_location=self.model.device))

    # ----------------------------------------------------------------------------------------- internals
    def _restore(self) -> None:
        self._anchor.restore(self.model, self.strategy)
        self.resets += 1
        self._since_reset = 0
        self._dirty, self._reseed = False, True

    def _fingerprint(self) -> dict[str, Any]:
        return {"strategy": type(self.strategy).__qualname__, "config": strategy_config(self.strategy),
                "classnames": list(self.space.classnames),
                "trainable": {n: list(p.shape) for n, p in self.model.net.named_parameters() if p.requires_grad}}

    @property
    def _who(self) -> str:
        return type(self.strategy).__name__

    def _stats(self, out: Prediction, n_classes: int) -> dict[str, float]:
        h = float(out.entropy.mean())
        return {"entropy": h, "entropy_normalized": h / math.log(n_classes) if n_classes > 1 else 0.0,
                "confidence": float(out.probs.max(-1).values.mean()), "samples": self.samples,
                "samples_since_reset": self._since_reset, "skipped_steps": self.strategy.skipped_steps}


def wrap(model: Clip | nn.Module, strategy: Strategy, space: LabelSpace | Sequence[str], *,
         templates: Sequence[str] = DEFAULT_TEMPLATES, tokenizer: Callable | None = None,
         reset: ResetPolicy | None = None, drift: Callable[[dict], bool] | None = None,
         seed: int = 0, source_side: int = SOURCE_SIDE) -> OnlineAdapter:
    """Put ``strategy`` in front of a deployed model: a `Clip` or an open_clip CLIP module; ``space`` is a
    `LabelSpace` or class names (prompted with ``templates``). ``reset`` None: the strategy's ``default_reset``
    (episodic for TPT, as its paper evaluates; "never" otherwise). ``source_side``: see `OnlineAdapter`."""
    return OnlineAdapter(as_clip(model, tokenizer), strategy,
                         space if isinstance(space, LabelSpace) else as_space(space, templates),
                         reset=reset, drift=drift, seed=seed, source_side=source_side)
