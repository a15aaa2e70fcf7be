"""Turn an Avalanche benchmark (``avalanche-lib``, the ``avalanche`` extra) into a `ctta.stream.TaskStream`.

Avalanche is imported lazily and only duck-typed attributes are read, so this module loads (and is tested) without
it. From Avalanche 0.6's class-incremental benchmarks (``nc_benchmark``, ``SplitCIFAR100``, ...) it reads
``train_stream`` / ``test_stream`` (experiences with a ``dataset`` of items ``(x, y, ...)`` with ``targets``, and
``classes_in_this_experience``), and, when present, ``original_classes_in_exp`` (per experience, the set of
**original** class ids), ``class_mapping`` (``class_mapping[original id]`` = the id the datasets label it with),
``classes_order_original_ids`` (the class order in original ids), ``classes_order``, ``n_classes`` and
``class_ids_from_zero_in_each_exp``.

Class names are always given **by original id** (``classnames[c]`` names the class the original dataset labels
``c``, e.g. ``torchvision.datasets.CIFAR100(...).classes``), whatever class-id option the benchmark was built
with: plain ids, ``class_ids_from_zero_from_first_exp=True`` (Avalanche relabels ids in order of appearance, and
``classes_order`` is then ``0..n-1``) or ``class_ids_from_zero_in_each_exp=True`` (ids restart at 0 in every
experience). The bridge maps each experience's labels back through ``class_mapping`` itself. Names that cannot be
those of the benchmark's classes (fewer names than classes, an original id without a name, or names that differ
from a ``classes`` list the original dataset carries) are refused.

Each training experience becomes one task whose label space holds that experience's classes **in the benchmark's
class order**; labels are remapped to the task's local ids. Test data for a task = the test experience at the same
index when both streams have equal length (Avalanche's class-/domain-incremental generators), otherwise every test
sample of the task's classes. Images may be PIL or tensors; they must be in [0, 1] (drop any ``Normalize``
transform: the model normalises), and are resized to ``image_size`` when given.
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


def _names_of_dataset(dataset: Any, depth: int = 6) -> list[str] | None:
    """The ``classes`` list of str that an (Avalanche-wrapped) original dataset carries, if any."""
    seen, todo = set(), [(dataset, 0)]
    while todo:
        d, k = todo.pop(0)
        if d is None or id(d) in seen or k > depth:
            continue
        seen.add(id(d))
        names = getattr(d, "classes", None)
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            return list(names)
        for attr in ("_datasets", "datasets", "dataset", "_dataset"):
            sub = getattr(d, attr, None)
            todo += [(x, k + 1) for x in (sub if isinstance(sub, (list, tuple)) else [sub])]
    return None


def original_ids(benchmark: Any, k: int, experience: Any) -> dict[int, int]:
    """``{label as experience k's datasets use it: original class id}`` for every Avalanche class-id option."""
    labels = [int(c) for c in experience.classes_in_this_experience]
    originals = getattr(benchmark, "original_classes_in_exp", None)
    mapping = getattr(benchmark, "class_mapping", None)
    if originals is None or mapping is None:  # no relabelling information: the datasets use the original ids
        return {c: c for c in labels}
    inverse = {int(mapping[o]): int(o) for o in originals[k]}
    if sorted(inverse) != sorted(labels):
        raise ValueError(f"experience {k}: its labels {sorted(labels)} do not match the benchmark's class_mapping "
                         f"of its original classes {sorted(originals[k])}")
    return inverse


def from_avalanche(benchmark: Any, classnames: Sequence[str], *, templates: Sequence[str] = ("a photo of a {}.",),
                   image_size: int | None = None, scope: str = "seen", name: str = "avalanche",
                   boundaries: bool = True) -> TaskStream:
    """Convert ``benchmark`` into a `TaskStream`.

    ``classnames[c]`` names the class with **original** id ``c`` (the id of the dataset the benchmark was built
    from), for any of Avalanche's class-id options: the bridge undoes Avalanche's relabelling itself.
    ``scope``: "seen" (class-incremental), "own" (task-incremental) or "all".
    """
    train_stream, test_stream = list(benchmark.train_stream), list(benchmark.test_stream)
    if not train_stream:
        raise ValueError("the benchmark's train_stream is empty")
    classnames = list(classnames)
    n_classes = getattr(benchmark, "n_classes", None)
    if n_classes is not None and len(classnames) < int(n_classes):
        raise ValueError(f"the benchmark has {n_classes} classes but {len(classnames)} class names were given")
    known = _names_of_dataset(getattr(benchmark, "original_train_dataset", None))
    if known is not None and known[:len(classnames)] != classnames[:len(known)]:
        bad = [i for i, (a, b) in enumerate(zip(known, classnames)) if a != b]
        raise ValueError(f"the class names differ from the original dataset's classes at ids {bad[:5]} (e.g. id "
                         f"{bad[0]}: dataset {known[bad[0]]!r}, given {classnames[bad[0]]!r}); give the names in "
                         f"the dataset's original id order, not in the benchmark's class order")
    order = getattr(benchmark, "classes_order_original_ids", None)
    if order is None and getattr(benchmark, "class_mapping", None) is None:
        order = getattr(benchmark, "classes_order", None)
    rank = {int(c): i for i, c in enumerate(order or [])}
    space = LabelSpace(classnames, list(templates), name=name)
    paired = len(test_stream) == len(train_stream)
    if not paired and getattr(benchmark, "class_ids_from_zero_in_each_exp", False):
        raise ValueError("with class_ids_from_zero_in_each_exp the test stream must have one experience per "
                         "training experience (labels restart at 0 in each)")
    pool = None if paired else _Concat([e.dataset for e in test_stream])

    tasks = []
    for k, exp in enumerate(train_stream):
        to_original = original_ids(benchmark, k, exp)
        bad = sorted(o for o in to_original.values() if not 0 <= o < len(classnames))
        if bad:
            raise ValueError(f"experience {k} has original class ids {bad} outside the {len(classnames)} class names")
        classes = sorted(to_original.values(), key=lambda c: (rank.get(c, 1 << 30), c))
        local = {c: i for i, c in enumerate(classes)}
        remap = {label: local[o] for label, o in to_original.items()}  # dataset label -> task-local id
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
