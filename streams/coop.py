"""CoOp split files (Zhou et al.; KaiyangZhou/CoOp ``datasets/*.py``), the train/val/test splits X-TAIL (RAIL,
CoDyRA) and most few-shot CLIP papers use.

Layout under ``data_root`` (CoOp's DATASETS.md): ``<dataset_dir>/<split_json>`` holds
``{"train" | "val" | "test": [[relative image path, label, classname], ...]}`` with paths relative to
``<dataset_dir>/<image_dir>``. FGVC-Aircraft has no JSON: ``fgvc_aircraft/variants.txt`` lists the 100 class names
(label = line number) and ``images_variant_{train,val,test}.txt`` hold ``<image id> <variant name>`` lines for
``images/<image id>.jpg``. Class names are the split files' own (e.g. EuroSAT "Annual Crop Land").
"""
from __future__ import annotations

import json
from pathlib import Path

from streams.images import ImageFiles, check_draft
from streams.manifest import DatasetError

# our dataset name -> (CoOp dataset_dir, image_dir, split file)
COOP = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "food": ("food-101", "images", "split_zhou_Food101.json"),
    "flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "oxford_pet": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "aircraft": ("fgvc_aircraft", "images", None),
}
SPLITS = ("train", "val", "test")

Samples = dict[str, list[tuple[str, int]]]


def _names_from(items: dict[int, str], where: Path) -> list[str]:
    labels = sorted(items)
    if labels != list(range(len(labels))):
        missing = sorted(set(range(max(labels) + 1)) - set(labels))
        raise DatasetError(f"{where}: labels are not 0..{len(labels) - 1} (missing {missing[:5]})")
    return [items[k] for k in labels]


def read_split_json(path: str | Path, image_root: str | Path) -> tuple[Samples, list[str]]:
    """A CoOp ``split_zhou_*.json``: samples per split (absolute paths) and the class names by label."""
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise DatasetError(f"CoOp split file {path} not found: download it from the CoOp repository's DATASETS.md "
                           f"links and put it next to the images ({image_root})")
    split = json.loads(path.read_text())
    out: Samples = {}
    names: dict[int, str] = {}
    for s in SPLITS:
        if s not in split:
            raise DatasetError(f"{path} has no {s!r} list (keys: {sorted(split)})")
        out[s] = []
        for rel, label, cname in split[s]:
            if names.setdefault(int(label), cname) != cname:
                raise DatasetError(f"{path}: label {label} is named both {names[int(label)]!r} and {cname!r}")
            out[s].append((str(image_root / rel), int(label)))
    return out, _names_from(names, path)


def read_aircraft(dataset_dir: str | Path) -> tuple[Samples, list[str]]:
    """CoOp's FGVC-Aircraft reader: variants.txt + images_variant_{train,val,test}.txt."""
    d = Path(dataset_dir)
    variants = d / "variants.txt"
    if not variants.is_file():
        raise DatasetError(f"{variants} not found: extract fgvc-aircraft-2013b and point at its data/ folder")
    names = [ln.strip() for ln in variants.read_text().splitlines() if ln.strip()]
    index = {n: i for i, n in enumerate(names)}
    out: Samples = {}
    for s in SPLITS:
        f = d / f"images_variant_{s}.txt"
        if not f.is_file():
            raise DatasetError(f"{f} not found")
        out[s] = []
        for ln in f.read_text().splitlines():
            if ln.strip():
                imid, _, variant = ln.strip().partition(" ")
                if variant not in index:
                    raise DatasetError(f"{f}: unknown variant {variant!r}")
                out[s].append((str(d / "images" / f"{imid}.jpg"), index[variant]))
    return out, names


def coop_dataset(name: str, data_root: str | Path, image_size: int, *, draft: float | None = None,
                 whole_train: bool = False) -> tuple[list[str], dict[str, ImageFiles]]:
    """``(class names, {"train", "val", "test": ImageFiles})`` of one CoOp-format dataset. ``draft``: reduced-size
    JPEG decoding (`streams.images`; None: full size). ``whole_train``: training images whole, as decoded (to be
    cropped by `streams.images.TrainCrops`)."""
    check_draft(draft)  # before any split file is read
    if name not in COOP:
        raise ValueError(f"{name!r} has no CoOp split; CoOp datasets: {sorted(COOP)}")
    ddir, idir, split = COOP[name]
    root = Path(data_root) / ddir
    samples, names = read_aircraft(root) if split is None else read_split_json(root / split, root / idir)
    return names, {s: ImageFiles(v, image_size, draft=draft, whole=whole_train and s == "train")
                   for s, v in samples.items()}
