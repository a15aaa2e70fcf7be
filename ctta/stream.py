"""Label spaces, tasks and task streams.

A `LabelSpace` is an ordered list of class names, each with the prompt templates that describe it. A `Task`
is one step of a stream: its own label space, test data and optionally training data. A `TaskStream` is a list
of tasks plus the *evaluation scope*, which decides over which classes a prediction is made:

- ``"own"``  — each task in its own label space (task-incremental; MTIL).
- ``"seen"`` — over the union of the classes of every task seen so far (class-incremental, continuum's protocol).
  A task ``j`` that has not been trained yet is evaluated over the union of tasks ``0..j`` (the seen classes, the
  tasks between, and its own: the label space it will be trained in), so that the accuracy matrix has meaningful
  zero-shot entries above the diagonal.
- ``"all"``  — over the union of every task's classes, from the start (X-TAIL).

Tasks whose label spaces are identical (domain-incremental streams) share one block of the union.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from ctta.data import Dataset, RemappedSubset, dataset_targets

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
Scope = Literal["own", "seen", "all"]



def repeated(items: Sequence[Any]) -> list[Any]:
    """The items that occur more than once in ``items``, sorted (by their text): the one duplicate check of class
    names, class subsets and class-folder lists."""
    return sorted((x for x, k in Counter(items).items() if k > 1), key=str)

class LabelSpace:
    """Ordered class names with their prompt templates (``"{}"`` is replaced by the class name).

    All classes usually share one template set; `concat` builds unions whose blocks keep their own templates
    (MTIL datasets each have theirs). Instances are immutable and hashable.
    """

    def __init__(self, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, name: str = ""):
        if isinstance(classnames, str):
            raise TypeError("classnames must be a sequence of strings, not one string")
        names = tuple(classnames)
        temps = _check_templates(templates)
        self._init(names, (temps,) * len(names), name)

    def _init(self, names: tuple[str, ...], per_class: tuple[tuple[str, ...], ...], name: str) -> None:
        if not names:
            raise ValueError(f"label space {name!r} has no classes")
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"label space {name!r}: class names must be non-empty strings, got {bad[:5]!r}")
        dups = repeated(names)
        if dups:
            raise ValueError(f"label space {name!r} has duplicate class names: {dups[:10]!r}")
        self.classnames = names
        self.class_templates = per_class
        self.name = name
        self._index = {n: i for i, n in enumerate(names)}

    @classmethod
    def concat(cls, spaces: Sequence["LabelSpace"], name: str = "") -> "LabelSpace":
        """The union of several spaces, in order; each class keeps its own templates."""
        if not spaces:
            raise ValueError("cannot concatenate zero label spaces")
        if len(spaces) == 1:
            return spaces[0]
        out = cls.__new__(cls)
        names = tuple(n for s in spaces for n in s.classnames)
        temps = tuple(t for s in spaces for t in s.class_templates)
        out._init(names, temps, name or "+".join(s.name for s in spaces if s.name))
        return out

    @property
    def templates(self) -> tuple[str, ...]:
        """The shared template set (raises if the classes have different ones)."""
        first = self.class_templates[0]
        if any(t != first for t in self.class_templates):
            raise ValueError(f"label space {self.name!r} has per-class templates; use class_templates")
        return first

    def prompts(self, i: int) -> list[str]:
        """All prompts of class ``i`` (one per template)."""
        return [t.replace("{}", self.classnames[i]) for t in self.class_templates[i]]

    def index(self, classname: str) -> int:
        try:
            return self._index[classname]
        except KeyError:
            raise KeyError(f"unknown class {classname!r} in label space {self.name!r}") from None

    def locate(self, sub: "LabelSpace") -> slice:
        """Where the classes of ``sub`` sit in this space (they must be a contiguous block, in order)."""
        start = self.index(sub.classnames[0])
        block = slice(start, start + len(sub))
        if self.classnames[block] != sub.classnames:
            raise ValueError(f"label space {sub.name!r} is not a contiguous block of {self.name!r}")
        return block

    def subset(self, indices: Sequence[int], name: str = "") -> "LabelSpace":
        out = LabelSpace.__new__(LabelSpace)
        idx = [int(i) for i in indices]
        out._init(tuple(self.classnames[i] for i in idx), tuple(self.class_templates[i] for i in idx), name)
        return out

    def with_templates(self, templates: Sequence[str]) -> "LabelSpace":
        return LabelSpace(self.classnames, templates, self.name)

    @property
    def fingerprint(self) -> str:
        """A stable id of the classes and their templates, the same in every process (unlike ``hash``, which
        Python salts per process): stateful strategies key their per-class state by it, and it travels in their
        ``state_dict``."""
        if not hasattr(self, "_fingerprint"):
            blob = json.dumps([self.classnames, self.class_templates], ensure_ascii=True).encode()
            self._fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.classnames)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSpace) and (self.classnames, self.class_templates) == (
            other.classnames, other.class_templates)

    def __hash__(self) -> int:
        return hash((self.classnames, self.class_templates))

    def __repr__(self) -> str:
        head = ", ".join(self.classnames[:4]) + (", ..." if len(self) > 4 else "")
        return f"LabelSpace({self.name!r}, {len(self)} classes: {head})"


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        templates = (templates,)
    temps = tuple(templates)
    if not temps:
        raise ValueError("at least one prompt template is needed")
    for t in temps:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}' placeholder")
    return temps


@dataclass
class Task:
    """One step of a stream. Labels of ``train`` and ``test`` index ``space``."""

    name: str
    space: LabelSpace
    test: Dataset
    train: Dataset | None = None
    boundary: bool = True  # is the start of this task revealed to the strategy (begin_task)?

    def __repr__(self) -> str:
        ntr = len(self.train) if self.train is not None else 0
        return f"Task({self.name!r}, {len(self.space)} classes, train={ntr}, test={len(self.test)})"


@dataclass
class TaskStream:
    """Tasks in order plus the evaluation scope (see the module docstring)."""

    tasks: list[Task]
    scope: Scope = "seen"
    name: str = ""
    _offsets: list[int] = field(init=False, repr=False)
    _blocks: list[LabelSpace] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"stream {self.name!r} has no tasks")
        if self.scope not in ("own", "seen", "all"):
            raise ValueError(f"unknown evaluation scope {self.scope!r}; expected 'own', 'seen' or 'all'")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"stream {self.name!r} has duplicate task names: {names}")
        # Union layout: identical spaces (domain-incremental) share one block.
        self._blocks, self._offsets, block_of = [], [], {}
        for t in self.tasks:
            if t.space not in block_of:
                block_of[t.space] = sum(len(b) for b in self._blocks)
                self._blocks.append(t.space)
            self._offsets.append(block_of[t.space])

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def _union(self, upto: int) -> LabelSpace:
        """Union of the blocks used by tasks[0..upto]."""
        end = max(self._offsets[i] + len(self.tasks[i].space) for i in range(upto + 1))
        blocks, size = [], 0
        for b in self._blocks:
            if size >= end:
                break
            blocks.append(b)
            size += len(b)
        return LabelSpace.concat(blocks, name=f"{self.name}[:{upto + 1}]")

    def space_for(self, after: int, task: int) -> tuple[LabelSpace, int]:
        """Label space used to evaluate ``task`` after training task ``after``, and the offset of its labels."""
        if self.scope == "own":
            return self.tasks[task].space, 0
        if self.scope == "all":
            return self._union(len(self.tasks) - 1), self._offsets[task]
        return self._union(max(after, task)), self._offsets[task]

    def train_space(self, task: int) -> tuple[LabelSpace, int]:
        """Label space over which task ``task`` is trained, and the offset of its labels."""
        return self.space_for(task, task)


def class_order(num_classes: int, seed: int | None) -> list[int]:
    """A seeded permutation of the classes (``None`` keeps the natural order)."""
    if seed is None:
        return list(range(num_classes))
    return [int(i) for i in np.random.RandomState(seed).permutation(num_classes)]


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def split_sizes(num_classes: int, increment: int, initial: int = 0) -> list[int]:
    """The task sizes of a B{initial}-Inc{increment} split of ``num_classes`` classes, or a `ValueError` saying
    which value to change. Recipes call it before reading any data, so a bad split fails at once."""
    increment, initial = _count(increment, "increment"), _count(initial, "initial")
    if increment < 1:
        raise ValueError(f"increment must be at least 1 class per task, got {increment}")
    if not 0 <= initial <= num_classes:
        raise ValueError(f"initial must be between 0 (B0) and {num_classes} (the number of classes), got {initial}")
    rest = num_classes - initial
    if rest % increment:
        raise ValueError(f"{rest} classes{f' after the first task of {initial}' if initial else ''} do not split "
                         f"into tasks of {increment}; choose an increment that divides {rest}")
    return ([initial] if initial else []) + [increment] * (rest // increment)


def split_into_tasks(num_classes: int, n_tasks: int) -> int:
    """The increment that splits ``num_classes`` classes into ``n_tasks`` equal tasks, or a `ValueError`."""
    n_tasks = _count(n_tasks, "n_tasks")
    if not 1 <= n_tasks <= num_classes:
        raise ValueError(f"n_tasks must be between 1 and {num_classes} (the number of classes), got {n_tasks}")
    if num_classes % n_tasks:
        raise ValueError(f"{num_classes} classes do not split into {n_tasks} equal tasks; choose n_tasks among "
                         f"{[k for k in range(1, num_classes + 1) if num_classes % k == 0]}")
    return num_classes // n_tasks


def class_incremental(
    space: LabelSpace,
    train: Dataset,
    test: Dataset,
    *,
    increment: int,
    initial: int = 0,
    order: Sequence[int] | None = None,
    seed: int | None = None,
    name: str = "cil",
    scope: Scope = "seen",
) -> TaskStream:
    """Split a dataset into class-incremental tasks.

    ``initial=0`` gives B0-IncN (every task has ``increment`` classes); ``initial=x`` gives Bx-IncN (a first task
    of x classes, then ``increment`` each). The class order is ``order`` if given, else a permutation seeded by
    ``seed`` (natural order when both are None). Each task's labels are local to its own label space, whose classes
    follow the order, so the union of the seen tasks is the first classes of the order.
    """
    n = len(space)
    sizes = split_sizes(n, increment, initial)
    order = list(order) if order is not None else class_order(n, seed)
    if sorted(order) != list(range(n)):
        raise ValueError(f"class order must be a permutation of range({n})")
    train_targets, test_targets = dataset_targets(train), dataset_targets(test)
    tasks, start = [], 0
    for k, size in enumerate(sizes):
        classes = order[start:start + size]
        start += size
        sub = space.subset(classes, name=f"{name}/t{k}")
        remap = {c: i for i, c in enumerate(classes)}
        tasks.append(Task(
            name=f"{name}/t{k}",
            space=sub,
            train=RemappedSubset.by_classes(train, train_targets, remap),
            test=RemappedSubset.by_classes(test, test_targets, remap),
        ))
    return TaskStream(tasks, scope=scope, name=name)


def domain_incremental(
    space: LabelSpace, domains: Sequence[tuple[str, Dataset | None, Dataset]], *, name: str = "dil"
) -> TaskStream:
    """One task per domain ``(name, train, test)``, all in the same label space."""
    tasks = [Task(name=f"{name}/{d}", space=space, train=tr, test=te) for d, tr, te in domains]
    return TaskStream(tasks, scope="seen", name=name)
