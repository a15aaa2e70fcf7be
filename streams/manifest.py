"""Manifests of public datasets: what must be on disk, where it comes from, and checksums where known.

A recipe calls `verify(MANIFESTS[name], root)` before reading. A missing file or folder, a wrong size, a wrong
checksum or a wrong number of class folders / images raises `DatasetError` with what to download, from where, and
how to lay it out under ``root``. Checksums are MD5 where the dataset's publishers (and torchvision) list MD5, SHA-256
otherwise; a digest is computed once per process per (path, size, mtime).

Digests of the small key files are checked by default (CIFAR-100's three pickles: ~0.5 s). Image trees are checked
by their class folders and image counts, not by hashing every image.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal

META = Path(__file__).parent / "meta"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
Level = Literal["checksum", "structure", "none"]


class DatasetError(FileNotFoundError):
    """A dataset is missing, incomplete or not the expected version."""


@lru_cache(maxsize=None)
def load_meta(name: str) -> dict:
    """A JSON file from ``streams/meta`` (class names, orders, templates, masks)."""
    return json.loads((META / f"{name}.json").read_text())


def read_lines(name: str) -> list[str]:
    """A TXT file from ``streams/meta``, one entry per non-empty line."""
    return [ln.strip() for ln in (META / name).read_text().splitlines() if ln.strip()]


@dataclass(frozen=True)
class FileSpec:
    """One file or folder a dataset needs, relative to the dataset root."""

    path: str                       # relative path ("" = the root itself)
    kind: Literal["file", "dir"] = "file"
    size: int | None = None         # bytes, files only
    md5: str | None = None
    sha256: str | None = None
    subdirs: tuple[str, ...] | int | None = None  # dirs: exact class-folder names, or their number
    images: int | None = None       # dirs: number of image files below (recursive)


@dataclass(frozen=True)
class Manifest:
    name: str
    files: tuple[FileSpec, ...]
    source: str                     # where to download it
    layout: str                     # how to put it under the root
    archive: str = ""               # archive name (and its checksum, for the record)
    notes: str = ""


def _digest(path: Path, algo: str) -> str:
    st = path.stat()
    return _digest_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, algo)


@lru_cache(maxsize=256)
def _digest_cached(path: str, size: int, mtime_ns: int, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_files(folder: str | Path) -> list[str]:
    """The image files below ``folder``, directories in sorted path order, files sorted within each. Links are
    followed as torchvision's ``ImageFolder`` follows them (a class folder often links to another disk), but each
    real directory is read once, and a link to the folder itself or one above it (a loop) is not entered."""
    found: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    start = os.path.realpath(folder)
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or (real != start and (start + os.sep).startswith(real.rstrip(os.sep) + os.sep)):
            dirnames[:] = []  # read already, or an ancestor of the folder (a loop): do not descend
            continue
        seen.add(real)
        dirnames.sort()  # which of two links to one directory is read does not depend on the file system's order
        found.append((dirpath, files))
    return [os.path.join(d, f) for d, files in sorted(found) for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS)]


def count_images(folder: Path) -> int:
    """How many images `image_files` lists: the loaders and the structure check walk a tree the same way."""
    return len(image_files(folder))


def _fail(m: Manifest, root: Path, problem: str) -> DatasetError:
    return DatasetError(
        f"{m.name}: {problem} (dataset root: {root}).\n"
        f"  Download: {m.source}{f' ({m.archive})' if m.archive else ''}\n"
        f"  Layout:   {m.layout}")


def verify(manifest: Manifest, root: str | Path, level: Level = "checksum") -> Path:
    """Check ``root`` against ``manifest``; returns the root as a Path. Raises `DatasetError` naming the problem."""
    root = Path(root).expanduser()
    if level == "none":
        return root
    if level not in ("checksum", "structure"):
        raise ValueError(f"verify level must be 'checksum', 'structure' or 'none', got {level!r}")
    if not root.is_dir():
        raise _fail(manifest, root, "the dataset folder does not exist")
    for spec in manifest.files:
        _check_spec(manifest, root, spec, level)
    return root


def _check_spec(m: Manifest, root: Path, spec: FileSpec, level: Level) -> None:
    p = root / spec.path if spec.path else root
    if spec.kind == "dir":
        if not p.is_dir():
            raise _fail(m, root, f"missing folder {spec.path or '.'!r}")
        if spec.subdirs is not None:
            found = sorted(d.name for d in os.scandir(p) if d.is_dir())
            if isinstance(spec.subdirs, int):
                if len(found) != spec.subdirs:
                    raise _fail(m, root, f"{spec.path or '.'!r} has {len(found)} class folders, "
                                         f"expected {spec.subdirs}")
            else:
                missing = sorted(set(spec.subdirs) - set(found))
                extra = sorted(set(found) - set(spec.subdirs))
                if missing or extra:
                    raise _fail(m, root, f"{spec.path or '.'!r}: class folders differ from the release "
                                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})")
        if spec.images is not None:
            n = count_images(p)
            if n != spec.images:
                raise _fail(m, root, f"{spec.path or '.'!r} holds {n} images, the release has {spec.images}")
        return
    if not p.is_file():
        raise _fail(m, root, f"missing file {spec.path!r}")
    if spec.size is not None and p.stat().st_size != spec.size:
        raise _fail(m, root, f"{spec.path!r} has {p.stat().st_size} bytes, expected {spec.size}")
    if level == "checksum":
        for algo in ("md5", "sha256"):
            want = getattr(spec, algo)
            if want is not None:
                got = _digest(p, algo)
                if got != want.lower():
                    raise _fail(m, root, f"{spec.path!r} has {algo} {got}, expected {want}: the file is corrupt or "
                                         f"from a different release; delete it, re-download the archive below "
                                         f"and extract it again")


def write_manifest(root: str | Path, name: str, paths: Iterable[str], *, source: str = "", layout: str = "",
                   algo: str = "sha256") -> Manifest:
    """Build a manifest (size + digest) from files under ``root`` — to pin a private copy of a dataset."""
    root = Path(root)
    specs = []
    for rel in paths:
        p = root / rel
        specs.append(FileSpec(rel, size=p.stat().st_size, **{algo: _digest(p, algo)}))
    return Manifest(name, tuple(specs), source=source or "(private copy)", layout=layout or "as found")


# ------------------------------------------------------------------------------------------- known datasets
def _imagenet_tree(name: str, folder: str, count_key: str, source: str, archive: str, subdirs) -> Manifest:
    counts = load_meta("imagenet_variants")["counts"]
    return Manifest(name, (FileSpec("", "dir", subdirs=subdirs, images=counts[count_key]),), source=source,
                    layout=f"extract so that the dataset root is {folder}/ holding one folder per class",
                    archive=archive)


def _wnids(indices: list[int] | None = None) -> tuple[str, ...]:
    w = read_lines("imagenet_wnids.txt")
    return tuple(w if indices is None else [w[i] for i in indices])


def _build() -> dict[str, Manifest]:
    v = load_meta("imagenet_variants")
    return {
        # MD5s: torchvision.datasets.CIFAR100 (train_list / test_list / meta) and its tgz_md5.
        "cifar100": Manifest("CIFAR-100", (
            FileSpec("cifar-100-python/train", md5="16019d7e3df5f24257cddd939b257f8d"),
            FileSpec("cifar-100-python/test", md5="f0ef6b0ae62326f3e7ffdfab6717acfc"),
            FileSpec("cifar-100-python/meta", md5="7973b15100ade9c7d40fb424638fde48"),
        ), source="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            archive="cifar-100-python.tar.gz, md5 eb9058c3a382ffc7106e4002c42a8d85",
            layout="extract under the root: <root>/cifar-100-python/{train,test,meta}"),
        # Zenodo record 3555552; archive MD5 from RobustBench-style downloaders (two independent sources agree).
        "cifar100_c": Manifest("CIFAR-100-C", (FileSpec("CIFAR-100-C/labels.npy"),),
                               source="https://zenodo.org/records/3555552/files/CIFAR-100-C.tar",
                               archive="CIFAR-100-C.tar, md5 11f0ed0f1191edbf9fa23466ae6021d3",
                               layout="extract under the root: <root>/CIFAR-100-C/{<corruption>.npy, labels.npy}"),
        "imagenet": _imagenet_tree("ImageNet (ILSVRC-2012 val)", "imagenet/val", "imagenet",
                                   "https://image-net.org/challenges/LSVRC/2012/ (ILSVRC2012_img_val.tar, md5 "
                                   "29b22e2961454d5413ddabcf34fc5622), sorted into wnid folders",
                                   "ILSVRC2012_img_val.tar", _wnids()),
        "imagenet_a": _imagenet_tree("ImageNet-A", "imagenet-a", "imagenet_a",
                                     "https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar",
                                     "imagenet-a.tar, md5 c3e55429088dc681f30d81f4726b6595", _wnids(v["a_indices"])),
        "imagenet_r": _imagenet_tree("ImageNet-R", "imagenet-r", "imagenet_r",
                                     "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar",
                                     "imagenet-r.tar, md5 a61312130a589d0ca1a8fca1f2bd3337", _wnids(v["r_indices"])),
        "imagenet_v2": _imagenet_tree("ImageNet-V2 (matched-frequency)", "imagenetv2-matched-frequency-format-val",
                                      "imagenet_v2", "https://huggingface.co/datasets/vaishaal/ImageNetV2 "
                                      "(imagenetv2-matched-frequency.tar.gz)", "imagenetv2-matched-frequency.tar.gz",
                                      tuple(str(i) for i in range(1000))),
        "imagenet_sketch": _imagenet_tree("ImageNet-Sketch", "sketch", "imagenet_sketch",
                                          "https://github.com/HaohanWang/ImageNet-Sketch (ImageNet-Sketch.zip)",
                                          "ImageNet-Sketch.zip", _wnids()),
    }


@lru_cache(maxsize=1)
def manifests() -> dict[str, Manifest]:
    """The manifests of the public datasets the recipes read (built lazily from ``streams/meta``)."""
    return _build()


def image_tree(name: str, expected: int | None = None) -> Manifest:
    """A structure-only manifest for a folder dataset without a published checksum."""
    return Manifest(name, (FileSpec("", "dir", subdirs=expected),), source="the dataset's publisher",
                    layout="one folder per class under the dataset root")


def main(argv: list[str] | None = None) -> int:
    """``python -m streams.manifest NAME ROOT [--level structure]``: check a dataset copy; exit 1 with the reason."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m streams.manifest", description=main.__doc__)
    ap.add_argument("name", choices=sorted(manifests()))
    ap.add_argument("root", help="the dataset root (see each manifest's layout)")
    ap.add_argument("--level", default="checksum", choices=["checksum", "structure"])
    args = ap.parse_args(argv)
    try:
        verify(manifests()[args.name], args.root, args.level)
    except DatasetError as e:
        print(e)
        return 1
    print(f"{manifests()[args.name].name}: OK ({args.level}) at {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DatasetError", "FileSpec", "Manifest", "verify", "manifests", "load_meta", "read_lines",
           "write_manifest", "image_tree", "count_images", "image_files"]
