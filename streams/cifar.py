"""CIFAR-100 class-incremental recipes (Continual-CLIP, RAPF, MoE-Adapters protocol).

Reads the python pickles ``<root>/cifar-100-python/{train,test,meta}`` (dict keys ``b'data'`` uint8 ``[N, 3072]``
channel-major, ``b'fine_labels'``; meta ``b'fine_label_names'``). Class names are CIFAR's raw names with underscores
kept ("aquarium_fish"), as Continual-CLIP and RAPF use them. The protocol splits the 100 classes in a fixed order —
the seed-1993 order (87, 0, 52, 58, ...; RAPF's too since its commit afbea62) by default, or the order of RAPF's
first commit (``order="rapf"``) — into B0-IncN or Bx-IncN tasks, evaluated over all seen classes (continuum's sample-weighted accuracy).

Images are 32x32; ``image_size`` resizes them (bicubic) for the model — 224 for ViT-B/16, 32 for the micro-CLIP.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ctta.stream import LabelSpace, TaskStream, class_incremental, class_order, split_sizes
from streams.images import TensorImages
from streams.manifest import DatasetError, Level, load_meta, manifests, verify

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def cifar_root(root: str | Path) -> Path:
    """Accept either the folder holding ``cifar-100-python/`` or that folder itself."""
    root = Path(root).expanduser()
    return root.parent if root.name == "cifar-100-python" else root


def _numpy_reconstruct(subtype, shape, typecode):
    """numpy's array reconstructor, restricted to plain ndarrays (no subclass's ``__new__`` runs)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not a plain numpy.ndarray")
    return _np_reconstruct(subtype, shape, typecode)


def _numpy_dtype(spec, align=False, copy=False):
    """A numpy dtype from a plain type code (``'u1'``); object dtypes are refused (they hold pickled objects)."""
    dt = np.dtype(spec.decode("ascii") if isinstance(spec, bytes) else spec, align=bool(align), copy=bool(copy))
    if dt.hasobject:
        raise pickle.UnpicklingError(f"object dtype {spec!r}")
    return dt


def _latin1_encode(text, encoding="utf-8"):
    """Python 3's protocol-2 spelling of a bytes object, ``_codecs.encode(str, 'latin1')``, and nothing more."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


# Every global a CIFAR-100 python pickle refers to: Python 2's protocol-2 pickles of a dict of strings, lists of
# ints and uint8 arrays (``_reconstruct`` / ``ndarray`` / ``dtype``), and ``_codecs.encode``, with which Python 3
# writes bytes at protocol 2 (copies re-pickled that way). Nothing else is ever looked up: no other callable can run.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-100 python format holds (see `_CIFAR_GLOBALS`), whatever the verification
    level: a pickle naming any other global (``os.system``, ``builtins.eval``, ...) is refused before it runs."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR-100 python pickle never "
                                         "needs") from None


def load_cifar_pickle(path: str | Path) -> dict:
    """A CIFAR python pickle (dict with bytes keys) through `CifarUnpickler`; anything else is a `DatasetError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a damaged or foreign file: whatever the unpickler tripped on, name the file
        raise DatasetError(f"{path} is not a CIFAR-100 python pickle ({e}); it was not loaded. Re-download "
                           f"{manifests()['cifar100'].source} and extract it again") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path} holds a {type(d).__name__}, not the dict of a CIFAR-100 python pickle")
    return d


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"missing {path}; download {manifests()['cifar100'].source} and extract it under "
                           f"{path.parent.parent}")
    return load_cifar_pickle(path)


def _key(d: dict, name: str, path: Path):
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise DatasetError(f"{path} lacks key {name!r} (found {sorted(map(str, d))[:6]}); is it a CIFAR-100 python pickle?")


def read_cifar100(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images [N, 3, 32, 32], fine labels [N])`` of the ``"train"`` or ``"test"`` pickle."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = cifar_root(root) / "cifar-100-python" / split
    d = _unpickle(path)
    data, labels = _key(d, "data", path), _key(d, "fine_labels", path)
    data = check_cifar_arrays(path, data, labels, 100)[0]
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetError(f"{path}: data {data.shape} / labels ({len(labels)}) are not CIFAR's [N, 3072] / [N]")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def check_cifar_arrays(path: Path, data: object, labels: object, n_classes: int, labels_path: Path | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR's pixel array must be uint8 as released (a cast would wrap 300 to 44 and floor floats in [0, 1] to 0)
    and its labels integers in ``[0, n_classes)`` (an out-of-range label would drop the sample from its task).
    Returns both as arrays; raises `DatasetError` naming the file (``labels_path``: the labels', if another)."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        got = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: pixels must be a uint8 array as released, got {got}")
    where = labels_path or path
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{where}: labels are not a list of integers ({e})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{where}: labels must be a list of integers, got {labels.dtype} of shape {labels.shape}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise DatasetError(f"{where}: labels must lie in [0, {n_classes}), got values in "
                           f"[{int(labels.min())}, {int(labels.max())}]")
    return data, labels


def cifar100_classnames(root: str | Path | None = None) -> list[str]:
    """The 100 fine label names: from ``meta`` on disk when ``root`` is given (and checked against the release's
    list), else the stored list."""
    stored = load_meta("cifar100")["classnames"]
    if root is None:
        return list(stored)
    path = cifar_root(root) / "cifar-100-python" / "meta"
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(_unpickle(path), "fine_label_names", path)]
    if names != stored:
        raise DatasetError(f"{path}: fine_label_names differ from CIFAR-100's ({names[:3]}... vs {stored[:3]}...)")
    return names


def resolve_templates(templates: str | Sequence[str], table: dict[str, list[str]]) -> list[str]:
    """A template list, or the name of one in ``table``."""
    if isinstance(templates, str) and "{}" not in templates:
        if templates not in table:
            raise ValueError(f"unknown template set {templates!r}; known: {sorted(table)} (or pass a list)")
        return list(table[templates])
    return [templates] if isinstance(templates, str) else list(templates)


def resolve_order(order: str | int | Sequence[int] | None, table: dict[str, list[int]], n: int) -> list[int]:
    """A class order: a name in ``table``, an int seed (numpy RandomState permutation), ``None`` / "natural", or
    a list."""
    if order is None or order == "natural":
        return list(range(n))
    if isinstance(order, str):
        if order not in table:
            raise ValueError(f"unknown class order {order!r}; known: {sorted(table)}, 'natural', an int seed or a list")
        return list(table[order])
    if isinstance(order, int):
        return class_order(n, order)
    out = [int(c) for c in order]
    if sorted(out) != list(range(n)):
        raise ValueError(f"class order must be a permutation of range({n})")
    return out


def cifar100_space(templates: str | Sequence[str] = "continual_clip", root: str | Path | None = None) -> LabelSpace:
    meta = load_meta("cifar100")
    return LabelSpace(cifar100_classnames(root), resolve_templates(templates, meta["templates"]), name="cifar100")


def cifar100_cil(data_root: str | Path = "data", *, increment: int = 10, initial: int = 0,
                 order: str | int | Sequence[int] | None = "seed1993",
                 templates: str | Sequence[str] = "continual_clip",
                 image_size: int = 224, verify_level: Level = "checksum", name: str | None = None) -> TaskStream:
    """CIFAR-100 B{initial}-Inc{increment} in the given class order (see the module docstring).

    ``templates``: ``"continual_clip"`` ("a bad photo of a {}."), ``"rapf"`` ("a good photo of a {}."),
    ``"cifar_ensemble"`` (CLIP's 18) or a list. ``order``: ``"seed1993"``, ``"rapf"``, ``"natural"``, a seed, a list.
    """
    split_sizes(100, increment, initial)  # a bad split fails before any file is read
    root = cifar_root(data_root)
    verify(manifests()["cifar100"], root, verify_level)
    meta = load_meta("cifar100")
    space = cifar100_space(templates, root)
    train = TensorImages(*read_cifar100(root, "train"), image_size=image_size)
    test = TensorImages(*read_cifar100(root, "test"), image_size=image_size)
    return class_incremental(space, train, test, increment=increment, initial=initial,
                             order=resolve_order(order, meta["orders"], 100),
                             name=name or f"cifar100-b{initial}inc{increment}")
