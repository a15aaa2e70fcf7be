"""``draft`` (reduced-size JPEG decoding, `streams.images`) through the real-data recipes: ImageNet variants,
ImageNet-100, MTIL's torchvision readers and X-TAIL's CoOp splits, on tiny trees in the real layouts. Each check
looks at the dataset the recipe built (its ``draft``) and at the pixels: a photo-size JPEG decodes differently with
draft on (and exactly as `ImageFiles` with that draft does), a thumbnail too small to reduce does not."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctta.data import iter_batches
from streams import imagenet as IN
from streams import mtil
from streams.images import ImageFiles
from streams.manifest import load_meta
from tests.test_recipes_mtil import CALTECH, EUROSAT, write_coop_split

SIZE = 8  # model input; draft=2 may reduce a JPEG while its shorter side stays >= 16


def _jpeg(path: Path, w: int, h: int, seed: int) -> None:
    """A textured JPEG (noise over a gradient): reduced-size decoding visibly changes its 8x8 thumbnail."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 160, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    a = np.clip(grad + rng.integers(0, 90, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path, format="JPEG", quality=90)


def _draft_of(ds) -> float | None:
    while not hasattr(ds, "draft"):  # through class-incremental / split subsets to the files
        ds = ds.base
    return ds.draft


def _paths_of(ds) -> list[str]:
    idx = torch.arange(len(ds))
    while not hasattr(ds, "paths"):
        idx, ds = ds.indices[idx], ds.base
    return [ds.paths[int(i)] for i in idx]


def _images(ds) -> torch.Tensor:
    return torch.cat([x for x, _, _ in iter_batches(ds, 64)])


def _check_pixels(plain, drafted, big: set[str], reducible: bool = True) -> None:
    """``drafted`` (draft=2) vs ``plain`` (draft=None), item by item: same files; a file in ``big`` decodes as a
    draft-2 `ImageFiles` does and unlike the full-size decode; any other (a thumbnail) identically."""
    paths = _paths_of(drafted)
    assert paths == _paths_of(plain) and paths
    xp, xd = _images(plain), _images(drafted)
    for k, p in enumerate(paths):
        ref = ImageFiles([(p, 0)], SIZE, draft=2)[0][0]
        assert torch.equal(xd[k], ref), p
        if p in big:
            assert (xd[k] - xp[k]).abs().max() > 1e-3, p  # reduced decode: not the full-size pixels
        else:
            assert torch.equal(xd[k], xp[k]), p  # too small to reduce: nothing changes
    assert bool(big & set(paths)) == reducible  # the tree holds a reducible JPEG where the test means it to


def _imagenet_a(root: Path) -> set[str]:
    wn = IN.imagenet_wnids()
    folders = [wn[i] for i in load_meta("imagenet_variants")["a_indices"]]
    for f in folders:
        (root / f).mkdir(parents=True, exist_ok=True)
    _jpeg(root / folders[0] / "big.jpg", 96, 64, 0)
    _jpeg(root / folders[3] / "big2.JPEG", 64, 80, 1)
    _jpeg(root / folders[3] / "small.jpg", 10, 6, 2)
    return {str(root / folders[0] / "big.jpg"), str(root / folders[3] / "big2.JPEG")}


def test_tta_stream_passes_draft_to_every_variant_dataset(tmp_path):
    big = _imagenet_a(tmp_path / "imagenet-a")
    kw = dict(roots={"imagenet_a": str(tmp_path / "imagenet-a")}, image_size=SIZE, verify_level="none")
    plain = IN.tta_stream(["imagenet_a"], **kw).tasks[0].test
    assert plain.draft is None  # off by default
    drafted = IN.tta_stream(["imagenet_a"], draft=2, **kw).tasks[0].test
    assert drafted.draft == 2.0
    _check_pixels(plain, drafted, big)
    # the shuffled and "sh"-filtered copies are rebuilt from the paths: they keep the draft
    shuffled = IN.tta_stream(["imagenet_a"], draft=2, shuffle=True, sh_filter=True, **kw).tasks[0].test
    assert shuffled.draft == 2.0 and sorted(shuffled.paths) == sorted(drafted.paths)
    _check_pixels(IN.tta_stream(["imagenet_a"], shuffle=True, sh_filter=True, **kw).tasks[0].test, shuffled, big)


def test_imagenet_c_passes_draft(tmp_path):
    from streams.corrupted import imagenet_c_stream
    wn = IN.imagenet_wnids()
    for w in wn:  # ImageNet-C keeps all 1,000 class folders
        (tmp_path / "fog" / "3" / w).mkdir(parents=True)
    _jpeg(tmp_path / "fog" / "3" / wn[1] / "big.JPEG", 96, 64, 0)
    big = {str(tmp_path / "fog" / "3" / wn[1] / "big.JPEG")}
    plain = imagenet_c_stream(tmp_path, corruptions=["fog"], severity=3, image_size=SIZE).tasks[0].test
    drafted = imagenet_c_stream(tmp_path, corruptions=["fog"], severity=3, image_size=SIZE, draft=2).tasks[0].test
    assert _draft_of(plain) is None and _draft_of(drafted) == 2.0
    _check_pixels(plain, drafted, big)


def test_imagenet100_passes_draft_to_train_and_test(tmp_path):
    wn = IN.imagenet_wnids()
    lines = {"train": [], "val": []}
    big = set()
    for label, w in enumerate(wn[:2]):
        for split, (wd, ht) in (("train", (96, 64)), ("val", (12, 10))):
            p = tmp_path / "imagenet" / split / w / f"{w}.JPEG"
            _jpeg(p, wd, ht, label)
            lines[split].append(f"{split}/{w}/{w}.JPEG {label}")
            if split == "train":
                big.add(str(p))
    for split, ls in lines.items():
        (tmp_path / f"{split}.txt").write_text("\n".join(ls) + "\n")
    kw = dict(data_root=tmp_path, increment=1, order=[0, 1], image_size=SIZE)
    plain = IN.imagenet100_cil(tmp_path / "train.txt", tmp_path / "val.txt", **kw)
    drafted = IN.imagenet100_cil(tmp_path / "train.txt", tmp_path / "val.txt", draft=2, **kw)
    for tp, td in zip(plain.tasks, drafted.tasks):
        assert _draft_of(tp.train) is None and _draft_of(tp.test) is None
        assert _draft_of(td.train) == 2.0 and _draft_of(td.test) == 2.0
        _check_pixels(tp.train, td.train, big)
        _check_pixels(tp.test, td.test, big, reducible=False)  # 12x10 val images: too small to reduce


def test_mtil_torchvision_readers_read_files_with_draft(tmp_path):
    big = set()
    for c, name in enumerate(EUROSAT):  # ImageFolder layout, random 80/20 split
        for j in range(5):
            p = tmp_path / "eurosat" / "2750" / name / f"{name}_{j + 1}.jpg"
            _jpeg(p, 64 if j % 2 else 10, 64 if j % 2 else 10, 10 * c + j)
            big |= {str(p)} if j % 2 else set()
    for c, name in enumerate(["BACKGROUND_Google"] + CALTECH):  # Caltech101 builds its paths in __getitem__
        p = tmp_path / "caltech101" / "101_ObjectCategories" / name / "image_0001.jpg"
        _jpeg(p, 48, 40, 1000 + c)
        big.add(str(p))
    kw = dict(order=["eurosat", "caltech101"], image_size=SIZE, train_crop=None)  # the eval view, item by item
    plain = mtil.mtil_stream(tmp_path, **kw)
    drafted = mtil.mtil_stream(tmp_path, draft=2, **kw)
    for tp, td in zip(plain.tasks, drafted.tasks):
        for split in ("train", "test"):
            a, b = getattr(tp, split), getattr(td, split)
            assert not hasattr(a.base, "draft")  # default: torchvision decodes, as before
            assert _draft_of(b) == 2.0 and isinstance(b.base, ImageFiles)
            assert torch.equal(torch.as_tensor(a.targets), torch.as_tensor(b.targets))
            xa, xb = _images(a), _images(b)
            paths = _paths_of(b)
            for k, p in enumerate(paths):  # the same files in the same order as torchvision's reader
                if p not in big:
                    assert torch.equal(xa[k], xb[k]), p
            _check_pixels(ImageFiles([(p, 0) for p in paths], SIZE), b, big)
    # X-TAIL on the same readers (splits="torchvision")
    xt = mtil.xtail_stream(tmp_path, order=["eurosat"], shots=2, image_size=SIZE, splits="torchvision", draft=2)
    assert _draft_of(xt.tasks[0].train) == _draft_of(xt.tasks[0].test) == 2.0


def test_xtail_coop_splits_pass_draft(tmp_path):
    d = tmp_path / "eurosat"
    split = write_coop_split(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", ["Annual Crop Land", "Forest"],
                             images=False)
    big = set()
    for s, items in split.items():
        for k, (rel, _, _) in enumerate(items):
            _jpeg(d / "2750" / rel, 80 if k % 2 else 8, 60 if k % 2 else 8, k)
            big |= {str(d / "2750" / rel)} if k % 2 else set()
    plain = mtil.xtail_stream(tmp_path, order=["eurosat"], shots=None, image_size=SIZE)
    drafted = mtil.xtail_stream(tmp_path, order=["eurosat"], shots=None, image_size=SIZE, draft=2)
    assert plain.tasks[0].test.draft is None and drafted.tasks[0].test.draft == drafted.tasks[0].train.base.draft == 2.0
    # the training crops' whole images are decoded at reduced size too, by the same rule (>= 2x image_size)
    whole = drafted.tasks[0].train.base
    assert whole.whole and whole._draft_to() == 2 * SIZE
    _check_pixels(plain.tasks[0].test, drafted.tasks[0].test, big)


@pytest.mark.parametrize("bad", [0.5, 0, -2, "2", True])
def test_bad_draft_fails_plainly_before_any_folder(bad, tmp_path):
    from streams.coop import coop_dataset
    from streams.corrupted import imagenet_c_stream
    missing = tmp_path / "nowhere"  # a bad value is reported before the (absent) data is looked for
    msg = "draft must be None .* or a number >= 1"
    calls = [lambda: IN.tta_stream(["imagenet_a"], data_root=missing, draft=bad),
             lambda: IN.variant_dataset("imagenet_a", missing, draft=bad),
             lambda: IN.imagenet100_cil(missing / "a.txt", missing / "b.txt", data_root=missing, draft=bad),
             lambda: mtil.mtil_stream(missing, order=["eurosat"], draft=bad),
             lambda: mtil.xtail_stream(missing, order=["eurosat"], draft=bad),
             lambda: coop_dataset("eurosat", missing, 8, draft=bad),
             lambda: imagenet_c_stream(missing, corruptions=["fog"], draft=bad)]
    for call in calls:
        with pytest.raises(ValueError, match=msg):
            call()


@pytest.mark.parametrize("stream", ["imagenet_variants", "imagenet100_cil", "mtil", "xtail"])
def test_stream_configs_expose_draft(stream, tmp_path):
    from hydra import compose, initialize_config_dir
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        off = compose("run", overrides=[f"stream={stream}"]).stream
        on = compose("run", overrides=[f"stream={stream}", "stream.draft=2"]).stream
    assert off.draft is None and on.draft == 2


def test_imagenet_config_draft_reaches_the_dataset(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    configs = Path(__file__).resolve().parents[1] / "configs"
    _imagenet_a(tmp_path / "imagenet-a")
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("run", overrides=["stream=imagenet_variants", f"data_root={tmp_path}", "stream.draft=2",
                                        "stream.verify_level=none", "stream.image_size=8"]).stream
    assert instantiate(cfg, _convert_="all").tasks[0].test.draft == 2.0
