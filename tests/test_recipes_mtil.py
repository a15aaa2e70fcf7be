"""MTIL / X-TAIL recipes on tiny torchvision-layout datasets (EuroSAT, Caltech101, CIFAR-100): ZSCL's class names,
templates, orders and the seed-42 80/20 random splits."""
import pytest
import torch
from PIL import Image

from ctta.data import iter_batches
from streams import mtil
from streams.manifest import DatasetError, load_meta
from tests.test_recipes import write_cifar

EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]
CALTECH = ("Faces Faces_easy Leopards Motorbikes accordion airplanes anchor ant barrel bass beaver binocular bonsai "
           "brain "
           "brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair chandelier cougar_body "
           "cougar_face crab crayfish crocodile crocodile_head cup dalmatian dollar_bill dolphin dragonfly "
           "electric_guitar elephant emu euphonium ewer ferry flamingo flamingo_head garfield gerenuk gramophone "
           "grand_piano hawksbill headphone hedgehog helicopter ibis inline_skate joshua_tree kangaroo ketch lamp "
           "laptop llama lobster lotus mandolin mayfly menorah metronome minaret nautilus octopus okapi pagoda panda "
           "pigeon pizza platypus pyramid revolver rhino rooster saxophone schooner scissors scorpion sea_horse snoopy "
           "soccer_ball stapler starfish stegosaurus stop_sign strawberry sunflower tick trilobite umbrella watch "
           "water_lilly wheelchair wild_cat windsor_chair wrench yin_yang").split()


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path, format="PNG")  # lossless, whatever the extension


def write_coop_split(root, dataset_dir, image_dir, split_file, names, per_split=2, images=True) -> dict:
    """A CoOp split file (``[path, label, class name]`` per image, train / val / test) under ``root/dataset_dir``,
    with ``per_split`` images a class per split at ``<first word of the name>/<split>_<j>.jpg`` under
    ``image_dir`` (tiny PNGs whose red value is the label; ``images=False`` leaves them to the caller)."""
    import json
    d = root / dataset_dir
    d.mkdir(parents=True, exist_ok=True)
    split = {s: [[f"{n.split()[0]}/{s}_{j}.jpg", c, n] for c, n in enumerate(names) for j in range(per_split)]
             for s in ("train", "val", "test")}
    (d / split_file).write_text(json.dumps(split))
    if images:
        for items in split.values():
            for rel, c, _ in items:
                _png(d / image_dir / rel, c)
    return split


def write_eurosat(root, per_class=5):
    for c, name in enumerate(EUROSAT):
        for j in range(per_class):
            _png(root / "eurosat" / "2750" / name / f"{name}_{j + 1}.jpg", c)


def write_caltech(root, per_class=2):
    for c, name in enumerate(["BACKGROUND_Google"] + CALTECH):
        for j in range(per_class):
            _png(root / "caltech101" / "101_ObjectCategories" / name / f"image_{j + 1:04d}.jpg", max(c - 1, 0))


def test_orders_and_meta():
    m = load_meta("mtil")
    assert m["orders"]["I"][:3] == ["aircraft", "caltech101", "cifar100"] and len(m["orders"]["I"]) == 11
    assert m["orders"]["II"] == ["stanford_cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft",
                                 "caltech101", "dtd", "eurosat", "cifar100"]
    assert m["xtail_order"] == [d for d in m["orders"]["I"] if d != "cifar100"]
    d = m["datasets"]
    assert sum(v["classes"] for v in d.values()) == 1201
    assert len(d["caltech101"]["templates"]) == 34 and len(d["dtd"]["templates"]) == 8
    assert d["mnist"]["templates"] == ['a photo of the number: "{}".']
    assert len(CALTECH) == 101 and CALTECH == sorted(CALTECH)


def test_fixed_split_is_random_split_seed42():
    n = 137
    a, b = torch.utils.data.random_split(range(n), [int(0.8 * n), n - int(0.8 * n)],
                                         generator=torch.Generator().manual_seed(42))
    tr, te = mtil.fixed_split(n)
    assert tr == list(a.indices) and te == list(b.indices) and len(tr) == 109


def test_mtil_eurosat_caltech_cifar(tmp_path):
    write_eurosat(tmp_path)
    write_caltech(tmp_path)
    write_cifar(tmp_path, per_class=(1, 1))
    s = mtil.mtil_stream(tmp_path, order=["eurosat", "caltech101", "cifar100"], image_size=16)
    assert s.scope == "own" and [t.name for t in s.tasks] == ["eurosat", "caltech101", "cifar100"]
    eu, ca, ci = s.tasks
    assert eu.space.classnames[2] == "brushland or shrubland" and eu.space.class_templates[0][0] == \
        "a centered satellite photo of {}."
    assert ca.space.classnames[:3] == ("off-center face", "centered face", "leopard") and len(ca.space) == 101
    assert ci.space.classnames[1] == "aquarium fish" and len(ci.space.class_templates[0]) == 18
    # EuroSAT: 50 images -> 40/10 by the seed-42 permutation; labels follow sorted folder names
    tr, te = mtil.fixed_split(50)
    assert (len(eu.train), len(eu.test)) == (40, 10)
    assert eu.test.targets.tolist() == [i // 5 for i in te]
    x, y, _ = next(iter_batches(eu.test, 10))
    assert x.shape == (10, 3, 16, 16) and torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)
    assert (len(ca.train), len(ca.test)) == (161, 41)  # 202 images, BACKGROUND_Google excluded


def test_few_shot_and_xtail(tmp_path):
    write_eurosat(tmp_path)
    write_caltech(tmp_path)
    s = mtil.xtail_stream(tmp_path, order=["eurosat", "caltech101"], shots=2, image_size=8, splits="torchvision")
    assert s.scope == "all"
    eu = s.tasks[0]
    assert eu.space.class_templates[0] == ("a centered satellite photo of {}.",)
    counts = torch.bincount(eu.train.targets, minlength=10)
    assert counts.max() <= 2 and int(counts.sum()) == 20  # every class has >= 2 of its 4-ish train images here
    space, off = s.space_for(0, 1)
    assert len(space) == 111 and off == 10  # union of all domains, from the first task on


def test_missing_dataset_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="EuroSAT not found under"):
        mtil.mtil_stream(tmp_path, order=["eurosat"])
    with pytest.raises(ValueError, match="unknown MTIL datasets"):
        mtil.mtil_stream(tmp_path, order=["imagenet"])


def test_coop_split_files(tmp_path):
    import json
    from streams import coop
    d = tmp_path / "eurosat"
    names = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land"]
    split = {s: [[f"{n.split()[0]}/{s}_{j}.jpg", c, n] for c, n in enumerate(names) for j in range(k)]
             for s, k in (("train", 4), ("val", 1), ("test", 2))}
    (d).mkdir()
    (d / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    for s, items in split.items():
        for rel, c, _ in items:
            _png(d / "2750" / rel, c)
    a = tmp_path / "fgvc_aircraft"
    a.mkdir()
    (a / "variants.txt").write_text("707-320\nA300B4\nForest\n")  # "Forest" is also a EuroSAT class
    for s in ("train", "val", "test"):
        lines = [f"{s}{c}{j} {v}\n" for c, v in enumerate(["707-320", "A300B4", "Forest"]) for j in range(3)]
        (a / f"images_variant_{s}.txt").write_text("".join(lines))
        for c in range(3):
            for j in range(3):
                _png(a / "images" / f"{s}{c}{j}.jpg", c)
    s = mtil.xtail_stream(tmp_path, order=["aircraft", "eurosat"], shots=2, image_size=8, seed=1, prompts="zscl")
    air, eu = s.tasks
    assert air.space.classnames == ("707-320", "A300B4", "Forest")
    assert air.space.class_templates[0] == ("a photo of a {}, a type of aircraft.",)
    # the union repeats "Forest" (as the reference's concatenated lists do): the second copy gets a trailing space
    assert eu.space.classnames == ("Annual Crop Land", "Forest ", "Herbaceous Vegetation Land")
    assert eu.space.class_templates[1] == ("a centered satellite photo of {}.",)
    assert (len(eu.train), len(eu.test)) == (6, 6)
    x, y, _ = next(iter_batches(eu.test, 10))
    assert y.tolist() == [0, 0, 1, 1, 2, 2] and torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)
    assert s.space_for(0, 1) == (s.space_for(1, 1)[0], 3) and len(s.space_for(0, 0)[0]) == 6
    bad = dict(split, test=[["Forest/x.jpg", 0, "Forest"]])
    (d / "split_zhou_EuroSAT.json").write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="label 0 is named both"):
        coop.coop_dataset("eurosat", tmp_path, 8)


def test_caltech_without_scipy_fails_before_any_training(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(DatasetError, match="Caltech101 reads its items with scipy.*ctta\\[mtil\\]"):
        mtil.mtil_stream(tmp_path, order=["caltech101"], image_size=8)


def write_mnist(root, per_class=2):
    """torchvision's MNIST raw files (idx format), ``per_class`` 28x28 images of each digit in both splits."""
    import struct
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = bytes(c for c in range(10) for _ in range(per_class))
    pixels = bytes(len(labels) * 28 * 28)
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(labels), 28, 28) + pixels)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(labels)) + labels)


def test_xtail_prompts_are_codyras_by_default(tmp_path):
    """CoDyRA prompts template[0].format(name) of its dataset files: CoOp names as written (underscores kept),
    EuroSAT's with ' satellite location', MNIST's number named twice, DTD's bare '{} texture.'."""
    write_coop_split(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", ["Annual Crop Land", "Forest"])
    # an underscore, as a CoOp split may carry
    write_coop_split(tmp_path, "dtd", "images", "split_zhou_DescribableTextures.json", ["banded", "zig_zagged"])
    write_mnist(tmp_path)
    s = mtil.xtail_stream(tmp_path, order=["dtd", "eurosat", "mnist"], shots=1, image_size=8)
    dtd, eu, mn = s.tasks
    assert dtd.space.prompts(1) == ["zig_zagged texture."]
    assert eu.space.prompts(0) == ["a centered satellite photo of Annual Crop Land satellite location."]
    assert mn.space.prompts(0) == ['a photo of the number: "number: "0 - zero"".'] and len(mn.space) == 10
    assert (len(mn.train), len(mn.test)) == (10, 20)
    zscl = mtil.xtail_stream(tmp_path, order=["dtd", "eurosat", "mnist"], shots=1, image_size=8, prompts="zscl")
    assert [t.space.prompts(0)[0] for t in zscl.tasks] == [
        "a photo of a banded texture.", "a centered satellite photo of Annual Crop Land.",
        'a photo of the number: "0 - zero".']
    with pytest.raises(ValueError, match="prompts must be 'codyra' or 'zscl'"):
        mtil.xtail_stream(tmp_path, order=["dtd"], prompts="rail")
    with pytest.raises(ValueError, match="use splits='coop'"):
        mtil.xtail_stream(tmp_path, order=["eurosat"], prompts="codyra", splits="torchvision")
