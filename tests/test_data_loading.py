"""`ctta.loading`: the same batches in the same order whatever the number of workers, the global RNG untouched,
reduced-size JPEG decoding with hand-checked sizes, the bytes path (device decoding, here on the CPU), clear
errors, and the sharded evaluation plan of `ctta.loop.parallel.evaluation_share`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ctta import LabelSpace, class_incremental
from ctta.data import ImageTensorDataset, RemappedSubset
from ctta.loading import Loading, auto_workers, configure_loading, iter_batches, load_batch, loading_defaults
from ctta.loop.parallel import evaluation_share
from ctta.strategies.finetune import Finetune
from ctta.strategy import SingleProcess
from streams.images import ImageFiles, IndexSubset, TensorImages, image_folder, load_image
from streams.manifest import DatasetError
from tests.conftest import make_tiny_clip


def photo(seed: int, w: int = 120, h: int = 90) -> Image.Image:
    """A noisy gradient with a coloured block: JPEG has real work to do."""
    rng = np.random.default_rng(seed)
    a = np.linspace(0, 180, w)[None, :, None] + rng.normal(0, 20, (h, w, 3))
    a[h // 4: h // 2, w // 3: w // 2] += rng.uniform(0, 80, 3)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 12 JPEGs (120x90) plus one PNG, in ImageFolder layout."""
    root = tmp_path_factory.mktemp("jpegs")
    for c in range(3):
        (root / f"class{c}").mkdir()
        for k in range(12):
            photo(100 * c + k).save(root / f"class{c}" / f"{k:02d}.jpg", quality=90)
    photo(999).save(root / "class1" / "zz.png")
    return root


def collect(dataset, batch_size=8, **kw):
    out = list(iter_batches(dataset, batch_size, **kw))
    return torch.cat([x for x, _, _ in out]), torch.cat([y for _, y, _ in out]), [i.tolist() for _, _, i in out]


# ------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("draft", [None, 2.0])
def test_workers_give_identical_batches_in_order(folder, draft):
    data, _ = image_folder(folder, 16, draft=draft)
    assert len(data) == 37 and data.draft == draft
    ref = collect(data, loading=Loading(workers=0))
    assert ref[2][0] == list(range(8)) and ref[2][-1] == [32, 33, 34, 35, 36]  # in order, the last batch short
    assert torch.equal(ref[0], torch.stack([data[i][0] for i in range(37)]))  # = one image at a time
    for workers in (1, 2):
        x, y, idx = collect(data, loading=Loading(workers=workers, prefetch=1))
        assert torch.equal(x, ref[0]) and torch.equal(y, ref[1]) and idx == ref[2], workers


def test_in_memory_data_keeps_one_batched_call_and_workers_change_nothing():
    calls = []

    class Spy(ImageTensorDataset):
        def get_batch(self, indices):
            calls.append(len(indices))
            return super().get_batch(indices)

    g = torch.Generator().manual_seed(0)
    data = TensorImages((torch.rand(40, 3, 20, 24, generator=g) * 255).to(torch.uint8), torch.arange(40) % 4, 16)
    spy = Spy(torch.rand(40, 3, 8, 8, generator=g), torch.arange(40) % 4)
    assert auto_workers(data, 10_000) == 0 and auto_workers(spy, 10_000) == 0  # in memory: loaded in process
    collect(spy, 16)
    assert calls == [16, 16, 8]  # one get_batch per batch, never a loop over items
    sub = RemappedSubset(data, [3, 1, 4, 1, 5, 9, 2, 6] * 4, [0, 1] * 16)
    for ds in (data, sub, IndexSubset(data, range(5, 37))):
        ref = collect(ds, 16, loading=Loading(workers=0))
        x, y, idx = collect(ds, 16, loading=Loading(workers=2))  # chunks of 16 and 8: batched resize, same pixels
        assert torch.equal(x, ref[0]) and torch.equal(y, ref[1]) and idx == ref[2]


def test_loading_draws_nothing_from_the_global_rng(folder):
    data, _ = image_folder(folder, 16)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    collect(data, loading=Loading(workers=2))
    assert torch.equal(torch.get_rng_state(), before)  # a DataLoader seeds its workers from the global RNG unless
    # it is given a generator: training would then depend on the worker count


def test_training_is_identical_with_workers(folder):
    space = LabelSpace([f"class {i}" for i in range(3)])
    data, _ = image_folder(folder, 16)
    weights = []
    for workers in (0, 2):
        configure_loading(workers=workers)
        try:
            stream = class_incremental(space, data, data, increment=3, seed=0)
            model = make_tiny_clip(0)
            from ctta import run
            run(model, Finetune("visual", lr=1e-3, batch_size=8, epochs=1, iterations=3), stream)
            weights.append(model.trainable_state())
        finally:
            configure_loading()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_an_unreadable_file_fails_clearly_from_a_worker(folder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    samples = [(p, 0) for p in sorted((folder / "class0").iterdir())][:8] + [(bad, 0)]
    with pytest.raises((OSError, DatasetError), match="cannot identify|bad.jpg|truncated|broken"):
        collect(ImageFiles(samples, 16), 4, loading=Loading(workers=2))


# ------------------------------------------------------------------------------------------- draft decoding
def test_draft_sizes_are_the_largest_reduction_that_keeps_the_gap(tmp_path):
    photo(1, 400, 300).save(tmp_path / "a.jpg", quality=90)
    photo(1, 400, 300).save(tmp_path / "a.png")
    # shorter side 300: 1/4 (75) is the largest scale that keeps >= 64; >= 150 needs 1/2; 151 and up: full size
    assert load_image(tmp_path / "a.jpg", 64).shape == (3, 75, 100)
    assert load_image(tmp_path / "a.jpg", 37).shape == (3, 38, 50)  # 1/8
    assert load_image(tmp_path / "a.jpg", 150).shape == (3, 150, 200)
    assert load_image(tmp_path / "a.jpg", 151).shape == (3, 300, 400)
    assert load_image(tmp_path / "a.png", 37).shape == (3, 300, 400)  # only JPEG has reduced-size decoding
    full = ImageFiles([(tmp_path / "a.jpg", 0)], 32, draft=None)[0][0]
    assert torch.equal(ImageFiles([(tmp_path / "a.jpg", 0)], 32)[0][0], full)  # exact unless asked for
    drafted = ImageFiles([(tmp_path / "a.jpg", 0)], 32, draft=2.0)[0][0]  # decoded at 100x75, resized to 32
    assert full.shape == drafted.shape == (3, 32, 32)
    assert 0 < (full - drafted).abs().mean() < 0.02  # different pixels, the same picture
    with pytest.raises(ValueError, match="draft"):
        ImageFiles([], 32, draft=0.5)


# ------------------------------------------------------------------------------------------- bytes / device decoding
def test_bytes_path_decodes_like_pil_and_falls_back_for_png(folder):
    data, _ = image_folder(folder, 16, draft=None)
    sub = RemappedSubset(data, list(range(10, 30)), [k % 2 for k in range(20)])  # holds the PNG (position 24)
    ref = collect(sub, 8, loading=Loading(workers=0, device_decode=False))
    for workers in (0, 2):
        x, y, idx = collect(sub, 8, device="cpu", loading=Loading(workers=workers, device_decode=True))
        assert torch.equal(y, ref[1]) and idx == ref[2]
        # torchvision's libjpeg and Pillow's may round chroma differently: a level or two at most
        assert (x - ref[0]).abs().max() < 8 / 255 and (x - ref[0]).abs().mean() < 1 / 255
        assert torch.equal(x[14], ref[0][14])  # the PNG went through PIL


# ------------------------------------------------------------------------------------------- options
def test_options_are_checked_and_auto_follows_the_cores(folder, monkeypatch):
    for bad in (dict(workers=-1), dict(workers=1.5), dict(prefetch=0), dict(device_decode="yes")):
        with pytest.raises(ValueError, match="loading"):
            Loading(**bad)
    try:
        assert configure_loading(workers="auto", device_decode="auto") == Loading()
        assert configure_loading(workers=3, prefetch=4).workers == 3 and loading_defaults().prefetch == 4
    finally:
        configure_loading()
    data, _ = image_folder(folder, 16)
    monkeypatch.setattr("ctta.loading.usable_cores", lambda: 2)
    assert auto_workers(data, 1000) == 2 and auto_workers(data, 10) == 0  # a small call stays in process
    monkeypatch.setattr("ctta.loading.usable_cores", lambda: 1)
    assert auto_workers(data, 1000) == 0
    monkeypatch.setattr("ctta.loading.usable_cores", lambda: 64)
    assert auto_workers(data, 1000) == 8
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_batches(data, 0))
    assert torch.equal(load_batch(data, torch.tensor([2, 0]))[1], torch.tensor([0, 0]))


# ------------------------------------------------------------------------------------------- evaluation shards
class RankOf(SingleProcess):
    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def shard(self, n: int):
        return torch.tensor_split(torch.arange(n), self.size)[self.rank]


def starts(share):
    return [[int(b[0]) for b in batches] for batches in share]


def test_evaluation_share_splits_whole_batches_by_images():
    # one set of 600, batches of 256 start at 0, 256, 512; rank 0 holds positions 0..299, rank 1 300..599
    assert starts(evaluation_share([600], 256, RankOf(0, 2))) == [[0, 256]]
    assert starts(evaluation_share([600], 256, RankOf(1, 2))) == [[512]]
    # ten test sets of one batch each: five and five, not all on rank 0
    assert starts(evaluation_share([200] * 10, 256, RankOf(0, 2))) == [[0]] * 5 + [[]] * 5
    assert starts(evaluation_share([200] * 10, 256, RankOf(1, 2))) == [[]] * 5 + [[0]] * 5
    # three sets of 10 in batches of 4 (starts 0,4,8 | 10,14,18 | 20,24,28): rank 0 owns 0..14
    assert starts(evaluation_share([10, 10, 10], 4, RankOf(0, 2))) == [[0, 4, 8], [0, 4], []]
    assert starts(evaluation_share([10, 10, 10], 4, RankOf(1, 2))) == [[], [8], [0, 4, 8]]
    one = evaluation_share([10, 3], 4, SingleProcess())
    assert [[b.tolist() for b in s] for s in one] == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], [[0, 1, 2]]]


# ------------------------------------------------------------------------------------------- CUDA (scripts/gpu_check.sh)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run scripts/gpu_check.sh there)")
def test_cuda_pinned_copies_and_nvjpeg_decoding(folder):
    data, _ = image_folder(folder, 16)
    ref = collect(data, loading=Loading(workers=0))
    for workers in (0, 2):
        x, y, idx = collect(data, device="cuda", loading=Loading(workers=workers, device_decode=False))
        assert x.is_cuda and not y.is_cuda and idx == ref[2]
        assert torch.equal(x.cpu(), ref[0])  # pinned, non-blocking copies: the same pixels
        x, y, idx = collect(data, device="cuda", loading=Loading(workers=workers))  # auto: nvJPEG on the GPU
        assert x.is_cuda and torch.equal(y, ref[1]) and idx == ref[2]
        assert (x.cpu() - ref[0]).abs().mean() < 2 / 255  # nvJPEG's IDCT and chroma upsampling are not libjpeg's


@pytest.mark.parametrize("device_decode", [False, True])
def test_a_file_that_is_not_a_readable_image_is_named(tmp_path, device_decode):
    """PIL's own errors named a BytesIO (device decoding) or nothing ("Truncated File Read"), and a truncated JPEG
    was reported as a failed RGB conversion."""
    import io

    import numpy as np
    from PIL import Image

    from streams.images import image_folder
    from streams.manifest import DatasetError
    (tmp_path / "c").mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "c" / "a.jpg").write_bytes(buf.getvalue())
    half = buf.getvalue()[: len(buf.getvalue()) // 2]
    cases = {"b.jpg": (half, "the image data cannot be decoded, the file is damaged"),
             "c.png": (b"this is not an image", "not an image file in a format PIL reads")}
    for name, (blob, match) in cases.items():
        (tmp_path / "c" / name).write_bytes(blob)
        data, _ = image_folder(tmp_path, 32)
        with pytest.raises(DatasetError, match=f"c/{name}: {match}"):
            list(iter_batches(data, 4, device="cpu", loading=Loading(workers=0, device_decode=device_decode)))
        (tmp_path / "c" / name).unlink()


def test_source_side_keeps_the_whole_image_for_test_time_views(tmp_path):
    """The reference crops its random views from the photograph; an eval crop to 16x16 drops a wide image's sides.
    With source_side the stream gives the whole image (shrunk only above that side), and the views reach its edges."""
    from ctta.views import eval_view, tpt_views
    (tmp_path / "c").mkdir()
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :10] = 255  # a white band at the left edge, outside the centre crop
    Image.fromarray(wide).save(tmp_path / "c" / "a.png")
    Image.fromarray(np.zeros((200, 100, 3), dtype=np.uint8)).save(tmp_path / "c" / "b.png")
    cropped, _ = image_folder(tmp_path, 16)
    whole, _ = image_folder(tmp_path, 16, source_side=40)
    assert tuple(cropped[0][0].shape) == (3, 16, 16) and float(cropped[0][0].max()) < 0.05  # the band is gone
    assert tuple(whole[0][0].shape) == (3, 20, 60) and tuple(whole[1][0].shape) == (3, 80, 40)  # kept / shrunk
    views = tpt_views(whole[0][0][None], 16, 31, generator=torch.Generator().manual_seed(0))
    assert torch.equal(views[0, 0], eval_view(whole[0][0][None], 16)[0])  # view 0 is the eval view
    assert float(views[0, 1:].amax(dim=(1, 2, 3)).max()) > 0.9  # some random view reaches the band
    with pytest.raises(ValueError, match="samples.batch_size=1"):
        list(iter_batches(whole, 2, loading=Loading(workers=0, device_decode=False)))
    with pytest.raises(ValueError, match="source_side must be an integer >= the model.s image size"):
        image_folder(tmp_path, 16, source_side=8)
