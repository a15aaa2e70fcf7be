"""Real-benchmark recipes on tiny datasets written in the real on-disk formats: CIFAR-100 pickles, manifests and
checksums, CIFAR-100-C arrays and its generated fallback."""
import hashlib
import pickle

import numpy as np
import pytest
import torch

from ctta.data import iter_batches
from streams import cifar, corrupted
from streams.images import TensorImages, list_image_folder, resize_center_crop
from streams.manifest import DatasetError, FileSpec, Manifest, load_meta, manifests, verify, write_manifest

NAMES = load_meta("cifar100")["classnames"]
SEED1993 = [87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32, 45, 88,
            11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62,
            82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23,
            85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39]


def write_cifar(root, per_class=(3, 1), names=NAMES):
    """CIFAR-100 python pickles (protocol 2, as the release's); every pixel of an image holds its fine label (so
    labels can be read back)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, k in zip(("train", "test"), per_class):
        labels = [c for c in range(100) for _ in range(k)][::-1]  # not sorted by class: order must not matter
        data = np.repeat(np.array(labels, dtype=np.uint8)[:, None], 3072, axis=1)
        with open(d / split, "wb") as f:
            pickle.dump({b"filenames": [b"x"] * len(labels), b"data": data, b"fine_labels": labels,
                         b"coarse_labels": [0] * len(labels)}, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c"] * 20}, f,
                    protocol=2)
    return root


def test_stored_seed1993_order_and_names():
    meta = load_meta("cifar100")
    assert meta["orders"]["seed1993"] == SEED1993
    assert sorted(meta["orders"]["rapf"]) == list(range(100)) and meta["orders"]["rapf"][:3] == [99, 71, 95]
    assert len(NAMES) == 100 and NAMES == sorted(NAMES) and "aquarium_fish" in NAMES and "maple_tree" in NAMES
    assert [NAMES[i] for i in SEED1993[:4]] == ["television", "apple", "oak_tree", "pickup_truck"]


def test_cifar100_cil_exact_mapping(tmp_path):
    root = write_cifar(tmp_path)
    s = cifar.cifar100_cil(root, increment=10, image_size=32, verify_level="none")
    assert len(s) == 10 and s.scope == "seen"
    t0 = s.tasks[0]
    assert t0.space.classnames == ("television", "apple", "oak_tree", "pickup_truck", "lizard",
                                   "trout", "road", "wolf", "mushroom", "camel")
    assert t0.space.templates == ("a bad photo of a {}.",)
    assert (len(t0.train), len(t0.test)) == (30, 10)
    for k, task in enumerate(s.tasks):
        x, y, _ = next(iter_batches(task.train, 1000))
        # the pixel value is the original CIFAR label: local label l must be class order[10k + l]
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), torch.tensor(SEED1993[10 * k:10 * k + 10])[y])
    space, off = s.space_for(9, 3)
    assert len(space) == 100 and off == 30 and space.classnames[:2] == ("television", "apple")


def test_cifar100_b50_rapf_order_and_resize(tmp_path):
    root = write_cifar(tmp_path)
    s = cifar.cifar100_cil(root / "cifar-100-python", increment=10, initial=50, order="rapf", templates="rapf",
                           image_size=48, verify_level="none")
    assert [len(t.space) for t in s.tasks] == [50] + [10] * 5
    assert s.tasks[0].space.classnames[:3] == ("worm", "sea", "whale")
    x, y = s.tasks[1].test[0]
    assert x.shape == (3, 48, 48) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_cifar_bad_inputs(tmp_path):
    root = write_cifar(tmp_path, names=NAMES[::-1])
    with pytest.raises(DatasetError, match="fine_label_names differ"):
        cifar.cifar100_cil(root, verify_level="none")
    with pytest.raises(ValueError, match="unknown class order"):
        cifar.resolve_order("sorted", {"seed1993": SEED1993}, 100)
    with pytest.raises(ValueError, match="permutation"):
        cifar.resolve_order([0, 0, 1], {}, 3)
    with pytest.raises(DatasetError, match="missing .*cifar-100-python/train"):
        cifar.read_cifar100(tmp_path / "nowhere", "train")


def test_manifest_checksum_mismatch_is_clear(tmp_path):
    root = write_cifar(tmp_path)
    with pytest.raises(DatasetError) as e:  # the real release checksums do not match our tiny pickles
        cifar.cifar100_cil(root)
    msg = str(e.value)
    assert "cifar-100-python/train" in msg and "16019d7e3df5f24257cddd939b257f8d" in msg
    assert "cifar-100-python.tar.gz" in msg and "<root>/cifar-100-python/{train,test,meta}" in msg
    # structure-only verification passes, a missing file is named
    s = cifar.cifar100_cil(root, verify_level="structure", image_size=32)
    assert s.tasks[0].space.classnames[0] == "television"
    (root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DatasetError, match="missing file 'cifar-100-python/meta'"):
        verify(manifests()["cifar100"], root, "structure")


def test_manifest_sha256_size_and_writer(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    m = write_manifest(tmp_path, "toy", ["a.bin"])
    assert m.files[0].sha256 == good and m.files[0].size == 5
    verify(m, tmp_path)
    bad = Manifest("toy", (FileSpec("a.bin", sha256="0" * 64),), source="https://example.org/toy.zip",
                   layout="<root>/a.bin")
    with pytest.raises(DatasetError, match=r"'a.bin' has sha256 .* expected 0{64}.*\n.*example.org/toy.zip"):
        verify(bad, tmp_path)
    with pytest.raises(DatasetError, match="has 5 bytes, expected 6"):
        verify(Manifest("toy", (FileSpec("a.bin", size=6),), "s", "l"), tmp_path)
    with pytest.raises(DatasetError, match="dataset folder does not exist"):
        verify(m, tmp_path / "nope")


def test_image_folder_lexicographic_and_tree_manifest(tmp_path):
    from PIL import Image
    for c in ("0", "1", "10", "2"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (12, 8), (int(c), 0, 0)).save(tmp_path / c / "a.png")
    samples, classes = list_image_folder(tmp_path)
    assert classes == ["0", "1", "10", "2"] and [y for _, y in samples] == [0, 1, 2, 3]
    m = Manifest("tree", (FileSpec("", "dir", subdirs=5, images=4),), "s", "l")
    with pytest.raises(DatasetError, match="4 class folders, expected 5"):
        verify(m, tmp_path)
    with pytest.raises(DatasetError, match="holds 4 images, the release has 3"):
        verify(Manifest("tree", (FileSpec("", "dir", images=3),), "s", "l"), tmp_path)


def test_resize_center_crop_shapes():
    x = torch.rand(2, 3, 20, 40)
    y = resize_center_crop(x, 10)
    assert y.shape == (2, 3, 10, 10) and float(y.min()) >= 0 and float(y.max()) <= 1
    assert resize_center_crop(x[:, :, :, :20], 20) is not None
    ds = TensorImages(torch.full((3, 3, 8, 8), 255, dtype=torch.uint8), [0, 1, 2], image_size=16)
    xb, yb = ds.get_batch(torch.tensor([2, 0]))
    assert xb.shape == (2, 3, 16, 16) and torch.allclose(xb, torch.ones_like(xb)) and yb.tolist() == [2, 0]


def write_cifar_c(root, corruptions=("gaussian_noise",), n=5):
    d = root / "CIFAR-100-C"
    d.mkdir(parents=True)
    labels = np.tile(np.arange(n) % 100, 5).astype(np.int64)
    full = np.zeros((5 * corrupted.PER_SEVERITY, 32, 32, 3), np.uint8)
    lab_full = np.zeros(5 * corrupted.PER_SEVERITY, np.int64)
    for s in range(5):  # pixel value = 10 * severity + label, so the block read can be checked
        full[s * 10000:s * 10000 + n] = (10 * (s + 1) + labels[:n])[:, None, None, None]
        lab_full[s * 10000:s * 10000 + n] = labels[:n]
    for c in corruptions:
        np.save(d / f"{c}.npy", full)
    np.save(d / "labels.npy", lab_full)


def test_cifar100_c_disk_reads_severity_block(tmp_path):
    write_cifar_c(tmp_path)
    s = corrupted.cifar100_c_stream(tmp_path, corruptions=["gaussian_noise"], severity=3, source="disk", n=5,
                                    image_size=32)
    t = s.tasks[0]
    x, y, _ = next(iter_batches(t.test, 10))
    assert t.name == "gaussian_noise-3" and not t.boundary and s.scope == "own" and len(t.space) == 100
    assert y.tolist() == [0, 1, 2, 3, 4] and (x[:, 0, 0, 0] * 255).round().long().tolist() == [30, 31, 32, 33, 34]
    with pytest.raises(DatasetError, match="missing .*fog.npy.*zenodo"):
        corrupted.cifar100_c_stream(tmp_path, corruptions=["fog"], source="disk")


def test_cifar100_c_generated_fallback(tmp_path):
    write_cifar(tmp_path)
    s = corrupted.cifar100_c_stream(tmp_path, corruptions=["gaussian_noise", "jpeg_compression"], severity=5,
                                    source="auto", n=20, image_size=32)
    x, y = s.tasks[0].test.get_batch(torch.arange(20))
    clean = torch.tensor(list(range(99, 79, -1)), dtype=torch.float32) / 255  # test labels are written reversed
    assert y.tolist() == list(range(99, 79, -1))
    assert float((x[:, 0] - clean[:, None, None]).abs().mean()) > 0.05  # noise was added
    with pytest.raises(DatasetError, match="cannot be generated"):
        corrupted.cifar100_c_stream(tmp_path, corruptions=["frost"], source="generate", n=2)


def test_verify_command(tmp_path, capsys):
    from streams.manifest import main
    root = write_cifar(tmp_path)
    assert main(["cifar100", str(root), "--level", "structure"]) == 0
    assert "CIFAR-100: OK (structure)" in capsys.readouterr().out
    assert main(["cifar100", str(root)]) == 1
    assert "md5" in capsys.readouterr().out


def test_image_folder_follows_links_once_and_refuses_bad_class_lists(tmp_path):
    """A link loop (n01/loop -> ..) used to list the whole tree again under n01, n02's images labelled n01; the
    manifest's count and the loader walk the tree the same way; a class listed twice is refused."""
    import os

    from PIL import Image

    from streams.manifest import DatasetError, count_images
    for c in ("n01", "n02"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (4, 4)).save(tmp_path / c / f"{i}.png")
    os.symlink("..", tmp_path / "n01" / "loop")
    os.symlink(tmp_path / "n02", tmp_path / "n01" / "again")  # a second road to a directory: read under n01 once
    samples, classes = list_image_folder(tmp_path)
    labels = {os.path.relpath(p, tmp_path): y for p, y in samples}
    assert classes == ["n01", "n02"] and len(samples) == 6
    assert labels["n02/0.png"] == 1 and labels["n01/again/0.png"] == 0 and not any("loop" in p for p in labels)
    assert count_images(tmp_path / "n01") == 4
    with pytest.raises(DatasetError, match="more than once"):
        list_image_folder(tmp_path, ["n01", "n01", "n02"])


def _repickle(path, **changes):
    with open(path, "rb") as f:
        d = pickle.load(f)  # our own test file, written above
    d.update({k.encode(): v for k, v in changes.items()})
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


@pytest.mark.parametrize("changes, match", [
    ({"fine_labels": [100] + [0] * 99}, r"labels must lie in \[0, 100\), got values in \[0, 100\]"),
    ({"fine_labels": [-1] + [0] * 99}, r"got values in \[-1, 0\]"),
    ({"data": np.full((100, 3072), 300, dtype=np.int64)}, "pixels must be a uint8 array as released, got int64"),
    ({"data": np.zeros((100, 3072), dtype=np.float64)}, "got float64"),
])
def test_cifar_pickle_values_are_checked_not_cast(tmp_path, changes, match):
    """An out-of-range label used to drop its sample from every task, and a cast to uint8 wrapped 300 to 44."""
    root = write_cifar(tmp_path, per_class=(1, 1))
    _repickle(root / "cifar-100-python" / "train", **changes)
    with pytest.raises(DatasetError, match=match) as e:
        cifar.read_cifar100(root, "train")
    assert "cifar-100-python/train" in str(e.value)


def test_cifar100_c_files_are_checked_and_never_unpickled(tmp_path):
    write_cifar_c(tmp_path)
    folder = tmp_path / "CIFAR-100-C"
    good = np.load(folder / "gaussian_noise.npy")
    np.save(folder / "gaussian_noise.npy", good.astype(np.float32))
    with pytest.raises(DatasetError, match="gaussian_noise.npy: pixels must be a uint8 array as released, got float32"):
        corrupted.read_cifar100_c(tmp_path, "gaussian_noise", 1, n=5)
    np.save(folder / "gaussian_noise.npy", good)
    labels = np.load(folder / "labels.npy")
    np.save(folder / "labels.npy", labels.astype(np.int64) + 250)
    with pytest.raises(DatasetError, match=r"labels.npy: labels must lie in \[0, 100\)"):
        corrupted.read_cifar100_c(tmp_path, "gaussian_noise", 1, n=5)
    (folder / "labels.npy").write_text("not an array")
    with pytest.raises(DatasetError, match="labels.npy: not a CIFAR-100-C .npy array .*never done"):
        corrupted.read_cifar100_c(tmp_path, "gaussian_noise", 1, n=5)
