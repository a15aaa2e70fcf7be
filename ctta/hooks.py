"""Metric hooks: observers of a run. They evaluate with ``strategy.predict`` and write into ``ctx.results``;
they never touch the loss, the batch, the model or the optimizer. Any object with methods named after the five
events (``on_run_start``, ``on_task_start``, ``on_batch_end``, ``on_task_end``, ``on_run_end``) is a hook; hooks
with state implement ``state_dict`` / ``load_state_dict`` so that a resumed run continues their accumulators.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ctta.data import Dataset, iter_batches
from ctta.io import atomic_write_json, code_revision, provenance
from ctta.loop.parallel import evaluation_share
from ctta.metrics import summarize
from ctta.strategy import SingleProcess
from ctta.stream import LabelSpace, Task


class ZeroShotPredictor:
    """The untouched model's zero-shot prediction, for hooks that measure before any strategy exists. ``templates``:
    the prompts the strategy will use (`Strategy.templates`), so that a later measurement through the strategy
    differs from this one by what the strategy learnt, not by its prompts."""

    def __init__(self, model, eval_batch_size: int = 256, templates: Sequence[str] | None = None):
        self.model, self.eval_batch_size = model, eval_batch_size
        self.templates = tuple(templates) if templates else None

    def predict(self, images, space: LabelSpace):
        return self.model.zero_shot(images, space.with_templates(self.templates) if self.templates else space)


def evaluation_bar(datasets: Sequence[Dataset], batch_size: int, desc: str, progress: bool | None) -> tqdm:
    """A transient bar (``leave=False``) over the evaluation batches of ``datasets``: evaluation can take minutes
    (10 tasks x 10 rows of a CIL matrix). ``progress``: None = only on a terminal, True = always, False = never."""
    total = sum(math.ceil(len(d) / batch_size) for d in datasets)
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=None if progress is None else not progress)


@torch.no_grad()
def evaluate(strategy, dataset: Dataset, space: LabelSpace, offset: int = 0, batch_size: int | None = None,
             bar: tqdm | None = None, comm: Any = None) -> dict:
    """Top-1 accuracy of ``strategy.predict`` (anything with ``predict``, ``model`` and ``eval_batch_size``) on
    ``dataset`` over ``space``; labels are shifted by ``offset``. ``bar`` is advanced by one per batch. ``comm``:
    see `evaluate_sets`."""
    return evaluate_sets(strategy, [(dataset, space, offset)], batch_size, bar, comm)[0]


@torch.no_grad()
def evaluate_sets(strategy, sets: Sequence[tuple[Dataset, LabelSpace, int]], batch_size: int | None = None,
                  bar: tqdm | None = None, comm: Any = None) -> list[dict]:
    """`evaluate` on several ``(dataset, space, offset)`` at once: ``[{"accuracy", "n"}, ...]``.

    ``comm`` (``strategy.comm`` under torchrun, `ctta.loop.parallel.DataParallel`): every rank must make this call,
    scores its share of the batches (`ctta.loop.parallel.evaluation_share`) and the counts are summed — the same
    figures as one process. Only hooks that run on every rank (``every_rank = True``) may pass it; None: this
    process scores everything."""
    if any(len(d) == 0 for d, _, _ in sets):  # the same verdict on every rank, before any collective
        raise ValueError("cannot evaluate on an empty dataset")
    comm = comm if comm is not None else SingleProcess()
    bs = batch_size or strategy.eval_batch_size
    device = strategy.model.device
    shares = evaluation_share([len(d) for d, _, _ in sets], bs, comm)
    skipped = sum(-(-len(d) // bs) for d, _, _ in sets) - sum(map(len, shares))  # other ranks' batches
    if bar is not None and skipped and bar.total is not None:
        bar.total -= skipped  # this rank's bar counts its own batches
        bar.refresh()
    counts = torch.zeros(len(sets), 2, dtype=torch.int64)  # correct, seen
    for j, ((dataset, space, offset), batches) in enumerate(zip(sets, shares)):
        if not batches:
            continue
        for images, labels, _ in iter_batches(dataset, bs, batches=batches, device=device):
            pred = strategy.predict(images, space).argmax(-1).cpu()
            counts[j, 0] += int((pred == labels + offset).sum())
            counts[j, 1] += len(labels)
            if bar is not None:
                bar.update(1)
    comm.sum_(counts, "evaluation counts")
    return [{"accuracy": int(c) / int(n), "n": int(n)} for c, n in counts.tolist()]


class AccuracyMatrix:
    """After each task, evaluates every task of the stream (future ones included) in the stream's scope:
    row ``t`` of ``R``. Writes ``accuracy_matrix``, ``test_sizes`` and ``metrics`` (see `ctta.metrics.summarize`).
    ``progress``: the evaluation bar (None: only on a terminal; scripts/run.py sets it from its ``progress``)."""

    every_rank = True  # under torchrun each rank scores its share of every row (`ctta.loop.parallel`)

    def __init__(self, progress: bool | None = None) -> None:
        self.R: list[list[float]] = []
        self.sizes: list[int] = []
        self.progress = progress

    def on_task_end(self, ctx) -> None:
        stream, t = ctx.stream, ctx.task_index
        bs = ctx.strategy.eval_batch_size
        bar = evaluation_bar([task.test for task in stream.tasks], bs,
                             f"evaluate after task {t + 1}/{len(stream)}", self.progress)
        sets = [(task.test, *stream.space_for(t, j)) for j, task in enumerate(stream.tasks)]
        scores = evaluate_sets(ctx.strategy, sets, bar=bar, comm=ctx.strategy.comm)
        row, sizes = [r["accuracy"] for r in scores], [r["n"] for r in scores]
        bar.close()
        self.R.append(row)
        self.sizes = sizes
        ctx.results["accuracy_matrix"] = self.R
        ctx.results["test_sizes"] = sizes
        done = len(self.R)  # square part so far: tasks 0..t trained and evaluated
        ctx.results["metrics"] = summarize([r[:done] for r in self.R], sizes[:done], stream.scope)

    def state_dict(self) -> dict:
        return {"R": self.R, "sizes": self.sizes}

    def load_state_dict(self, state: dict) -> None:
        self.R, self.sizes = [list(r) for r in state["R"]], list(state["sizes"])


class ZeroShotRetention:
    """Held-out control tasks the stream never trains on, measured before the run and after every task:
    ``ratio = acc_t / acc_0`` and ``drop = acc_0 - acc_t`` per control task, and their means. ``acc_0`` is the
    untouched model's zero-shot accuracy, measured in ``on_run_start``, before the strategy exists (a strategy's
    own ``predict`` at setup, e.g. RAPF's untrained adapter, is not zero-shot). ``progress`` as for
    `AccuracyMatrix`."""

    every_rank = True  # under torchrun each rank scores its share of the controls (`ctta.loop.parallel`)

    def __init__(self, controls: Sequence[Task], progress: bool | None = None):
        if not controls:
            raise ValueError("ZeroShotRetention needs at least one control task")
        self.controls = list(controls)
        self.acc0: dict[str, float] = {}
        self.history: dict[str, list[float]] = {c.name: [] for c in self.controls}
        self.progress = progress

    def _measure(self, predictor, comm: Any) -> dict[str, float]:
        bar = evaluation_bar([c.test for c in self.controls], predictor.eval_batch_size, "zero-shot controls",
                             self.progress)
        scores = evaluate_sets(predictor, [(c.test, c.space, 0) for c in self.controls], bar=bar, comm=comm)
        bar.close()
        return {c.name: r["accuracy"] for c, r in zip(self.controls, scores)}

    def on_run_start(self, ctx) -> None:
        if not self.acc0:  # (a resumed run brings its baseline along)
            zs = ZeroShotPredictor(ctx.model, ctx.strategy.eval_batch_size, ctx.strategy.templates)
            self.acc0 = self._measure(zs, ctx.strategy.comm)
        self._write(ctx)

    def on_task_end(self, ctx) -> None:
        for name, acc in self._measure(ctx.strategy, ctx.strategy.comm).items():
            self.history[name].append(acc)
        self._write(ctx)

    def _write(self, ctx) -> None:
        per = {}
        for name, a0 in self.acc0.items():
            accs = self.history[name]
            # a control the untouched model scores 0 on has no ratio (None, not NaN: it would turn the mean NaN)
            per[name] = {"acc0": a0, "acc": accs, "ratio": [a / a0 if a0 > 0 else None for a in accs],
                         "drop": [a0 - a for a in accs]}
        out: dict[str, Any] = {"tasks": per}
        if all(v["acc"] for v in per.values()):
            ratios = [v["ratio"][-1] for v in per.values() if v["ratio"][-1] is not None]
            out["mean_ratio"] = sum(ratios) / len(ratios) if ratios else None
            out["mean_drop"] = sum(v["drop"][-1] for v in per.values()) / len(per)
            out["mean_acc0"] = sum(v["acc0"] for v in per.values()) / len(per)
            out["mean_acc"] = sum(v["acc"][-1] for v in per.values()) / len(per)
        ctx.results["retention"] = out

    def identity(self) -> list[list[Any]]:
        """The control tasks (classes, test-set size and labels), in a run's checkpoint identity: a resume with other
        controls would compare the baseline of one set with the accuracies of another."""
        from ctta.loop.checkpoint import tasks_identity
        return tasks_identity(self.controls)

    def state_dict(self) -> dict:
        return {"acc0": self.acc0, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.acc0, self.history = dict(state["acc0"]), {k: list(v) for k, v in state["history"].items()}


class StrategySummary:
    """Copies ``strategy.summary()`` (if the strategy has one: effective LoRA ranks, parameter drift, ...) into
    ``ctx.results[key]`` after every task. The strategy keeps what it summarises in its own ``state_dict``."""

    def __init__(self, key: str = "strategy"):
        self.key = key

    def on_task_end(self, ctx) -> None:
        summary = getattr(ctx.strategy, "summary", None)
        if summary is not None:
            ctx.results[self.key] = summary()


class JsonResults:
    """Writes ``results.json`` (atomically) after every task and at the end, with provenance; at the end also a
    PNG of the accuracy matrix and per-step accuracy. Place it after the hooks whose results it writes."""

    def __init__(self, filename: str = "results.json", plot: bool = True):
        self.filename, self.plot = filename, plot
        code_revision()  # pinned now: the code this run executes, whatever is committed while it runs

    def _write(self, ctx, final: bool) -> None:
        if ctx.out_dir is None:
            return
        doc = {"finished": final, "stream": {"name": ctx.stream.name, "scope": ctx.stream.scope,
                                             "tasks": [t.name for t in ctx.stream.tasks]},
               "strategy": type(ctx.strategy).__qualname__,
               "provenance": provenance(ctx.model, seed=ctx.seed, config=ctx.config),
               "tasks_done": ctx.task_index + 1, "skipped_steps": ctx.strategy.skipped_steps,
               "results": ctx.results}
        atomic_write_json(Path(ctx.out_dir) / self.filename, doc)
        if final and self.plot and "accuracy_matrix" in ctx.results:
            from ctta.plots import plot_results
            plot_results(ctx.results, Path(ctx.out_dir) / Path(self.filename).with_suffix(".png").name,
                         title=f"{type(ctx.strategy).__name__} on {ctx.stream.name}")

    def on_task_end(self, ctx) -> None:
        self._write(ctx, final=False)

    def on_run_end(self, ctx) -> None:
        self._write(ctx, final=True)

    def written(self, ctx) -> bool:
        """Are this finished run's files on disk (a readable results file marked finished, and its plot)? A kill
        between the final checkpoint and `on_run_end` leaves them unfinished (`ctta.loop.context.finish_again`)."""
        if ctx.out_dir is None:
            return True
        path = Path(ctx.out_dir) / self.filename
        try:
            finished = json.loads(path.read_text()).get("finished") is True
        except (OSError, ValueError, AttributeError):  # missing, truncated, or not an object
            return False
        plotted = not (self.plot and "accuracy_matrix" in ctx.results) or path.with_suffix(".png").exists()
        return finished and plotted
