"""Turn an Avalanche benchmark (``avalanche-lib``, the ``avalanche`` extra) into a `ctta.stream.TaskStream`.

Avalanche is imported lazily and only duck-typed attributes are read, so this module loads (and is tested) without
it: ``benchmark.train_stream`` / ``benchmark.test_stream`` (sequences of experiences), ``experience.dataset``
(items ``(x, y, ...)`` with a ``targets`` attribute), ``experience.classes_in_this_experience`` (class ids as the
datasets label them), and optionally ``benchmark.classes_order`` / ``benchmark.n_classes``.

Each training experience becomes one task whose label space holds that experience's classes, **in the benchmark's
class order** (``classes_order`` when present, else increasing ids); labels are remapped to the task's local ids.
Test data for a task = the test experience at the same index when both streams have equal length (Avalanche's
class-/domain-incremental generators), otherwise every test sample of the task's classes. Images may be PIL or
tensors; they must be in [0, 1] (drop any ``Normalize`` transform: the model normalises), and are resized to
``image_size`` when given.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ctta.data import RemappedSubset
from ctta.stream import LabelSpace, Task, TaskStream
from streams.images import WrappedImages


def _targets(dataset: Any) -> torch.Tensor:
    t = getattr(dataset, "targets", None)
    if t is None:
        return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)
    return torch.as_tensor([int(y) for y in t], dtype=torch.long)


class _Concat:
    """Several experience datasets read as one (positions run through them in order)."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.starts = torch.tensor([0] + [len(d) for d in self.parts]).cumsum(0)
        self.targets = torch.cat([_targets(d) for d in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        k = int(torch.searchsorted(self.starts, torch.tensor(i), right=True)) - 1
        return self.parts[k][i - int(self.starts[k])]


def from_avalanche(benchmark: Any, classnames: Sequence[str], *, templates: Sequence[str] = ("a photo of a {}.",),
                   image_size: int | None = None, scope: str = "seen", name: str = "avalanche",
                   boundaries: bool = True) -> TaskStream:
    """Convert ``benchmark`` into a `TaskStream`.

    ``classnames[c]`` names the class with id ``c`` *as the benchmark's datasets label it* (for a benchmark built with
    ``class_ids_from_zero_from_first_exp=True``, pass ``[names[c] for c in benchmark.classes_order]``).
    ``scope``: "seen" (class-incremental), "own" (task-incremental) or "all".
    """
    train_stream, test_stream = list(benchmark.train_stream), list(benchmark.test_stream)
    if not train_stream:
        raise ValueError("the benchmark's train_stream is empty")
    n_classes = getattr(benchmark, "n_classes", None)
    if n_classes is not None and len(classnames) < int(n_classes):
        raise ValueError(f"the benchmark has {n_classes} classes but {len(classnames)} class names were given")
    order = [int(c) for c in getattr(benchmark, "classes_order", None) or range(len(classnames))]
    rank = {c: i for i, c in enumerate(order)}
    space = LabelSpace(list(classnames), list(templates), name=name)
    paired = len(test_stream) == len(train_stream)
    pool = None if paired else _Concat([e.dataset for e in test_stream])

    tasks = []
    for k, exp in enumerate(train_stream):
        classes = sorted((int(c) for c in exp.classes_in_this_experience), key=lambda c: (rank.get(c, 1 << 30), c))
        bad = [c for c in classes if not 0 <= c < len(classnames)]
        if bad:
            raise ValueError(f"experience {k} has class ids {bad} outside the {len(classnames)} class names")
        remap = {c: i for i, c in enumerate(classes)}
        train = WrappedImages(exp.dataset, _targets(exp.dataset), image_size)
        test_base = test_stream[k].dataset if paired else pool
        test = WrappedImages(test_base, _targets(test_base), image_size)
        tasks.append(Task(
            name=f"{name}/t{k}", space=space.subset(classes, name=f"{name}/t{k}"), boundary=boundaries,
            train=RemappedSubset.by_classes(train, train.targets, remap),
            test=RemappedSubset.by_classes(test, test.targets, remap)))
    return TaskStream(tasks, scope=scope, name=name)


def require_avalanche() -> Any:
    """Import ``avalanche`` or explain how to install it."""
    try:
        import avalanche
    except ImportError as e:
        raise ImportError("the Avalanche bridge needs avalanche-lib: pip install 'ctta[avalanche]' "
                          "(or pip install avalanche-lib)") from e
    return avalanche
