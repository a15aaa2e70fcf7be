"""Training crops of the MTIL / X-TAIL recipes (`streams.images.TrainCrops`): CLIP's train transform as ZSCL and
open_clip apply it — RandomResizedCrop(scale 0.9–1, ratio 3/4–4/3, bicubic) of the whole image — drawn
deterministically per item and pass, and told each pass's seed by the task loop."""
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ctta import LabelSpace, Task, TaskStream, run
from ctta.data import iter_batches
from ctta.loading import Loading
from ctta.strategies import Finetune
from ctta.views import crop_params
from streams import mtil
from streams.images import ImageFiles, TensorImages, TrainCrops
from tests.conftest import make_tiny_clip
from tests.test_recipes_mtil import write_coop_split, write_eurosat


def _ramp(h: int, w: int) -> torch.Tensor:
    """An image whose pixels say where they are: red = column, green = row (so a crop can be read back)."""
    x = torch.zeros(3, h, w)
    x[0] = torch.arange(w).float().div(w - 1).expand(h, w)
    x[1] = torch.arange(h).float().div(h - 1)[:, None].expand(h, w)
    return x


def test_crop_box_follows_torchvisions_rule_at_clips_train_scale():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = crop_params(2000, 300, 400, g, (0.9, 1.0), (3 / 4, 4 / 3)).unbind(1)
    area = h * w / (300 * 400)
    # rounding of sqrt(area·ratio) moves the area by at most a pixel row/column
    assert area.min() >= 0.9 - 2 / 300 and area.max() <= 1.0
    assert (h <= 300).all() and (w <= 400).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 300).all() and (left + w <= 400).all()
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 0.01 and ratio.max() <= 4 / 3 + 0.01
    # a 10:1 image cannot hold 90 % of its area at ratio <= 4/3: torchvision's fallback, the centre crop at 4/3
    assert crop_params(1, 10, 100, g, (0.9, 1.0), (3 / 4, 4 / 3))[0].tolist() == [0, 43, 10, 13]


def test_a_crop_is_the_box_of_the_whole_image_resized_bicubic():
    image = _ramp(30, 40)
    data = TrainCrops(TensorImages(image[None], [3]), 16)
    data.begin_pass(5)
    x, y = data[0]
    g = torch.Generator().manual_seed((5 * 1_000_003 + 0) % 2 ** 63)
    top, left, h, w = (int(v) for v in crop_params(1, 30, 40, g, (0.9, 1.0), (3 / 4, 4 / 3))[0])
    want = TF.resized_crop(image, top, left, h, w, [16, 16], interpolation=InterpolationMode.BICUBIC,
                           antialias=True).clamp(0, 1)
    assert y == 3 and x.shape == (3, 16, 16) and torch.equal(x, want)
    # most of the whole image, squeezed: the corners reach near the image's edges, unlike a 30-px centre crop
    # of a 40-px-wide image (red 5/39 .. 34/39)
    assert h * w >= 0.9 * 30 * 40 - 40 and x[0, :, 0].mean() < 5 / 39 and x[0, :, -1].mean() > 34 / 39


def test_crops_are_a_function_of_item_and_pass_never_of_the_global_rng_or_workers(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        TF.to_pil_image(_ramp(20 + 2 * i, 30)).save(p)
        paths.append((p, i % 2))
    data = TrainCrops(ImageFiles(paths, 12, whole=True), 12)
    data.begin_pass(1)
    torch.manual_seed(0)
    a = torch.stack([data[i][0] for i in range(6)])
    torch.manual_seed(1)  # the global generator plays no part
    assert torch.equal(torch.stack([data[i][0] for i in range(6)]), a)
    x, _, _ = next(iter_batches(data, 6, loading=Loading(workers=2)))
    assert torch.equal(x, a)  # the same in worker processes
    data.begin_pass(2)
    b = torch.stack([data[i][0] for i in range(6)])
    assert not torch.equal(a, b)  # another pass, other crops


def test_bad_crop_settings_are_refused_in_words():
    base = TensorImages(torch.rand(1, 3, 8, 8), [0])
    for scale in ((0.0, 1.0), (0.9, 1.2), (1.0, 0.9), "ab", (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="scale must"):
            TrainCrops(base, 8, scale=scale)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        TrainCrops(base, 0)
    with pytest.raises(ValueError, match="expected a whole image"):
        TrainCrops(_Flat(), 4)[0]
    with pytest.raises(ValueError, match="train_crop must"):
        mtil.mtil_stream("nowhere", order=["eurosat"], train_crop=[0.5])


class _Flat:
    targets = torch.tensor([0])

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.rand(8, 8), 0


class _Passes(TensorImages):
    """Records the seed of every pass the loop begins."""

    def __init__(self, *a):
        super().__init__(*a)
        self.seeds = []

    def begin_pass(self, seed):
        self.seeds.append(seed)


def _stream(seed_data=0):
    g = torch.Generator().manual_seed(seed_data)
    space = LabelSpace(["a", "b"])
    train = _Passes(torch.rand(8, 3, 16, 16, generator=g), [0, 1] * 4, 16)
    return TaskStream([Task("t0", space, train=train, test=TensorImages(torch.rand(4, 3, 16, 16), [0, 1] * 2, 16))])


def test_the_task_loop_begins_every_pass_with_a_seed_of_the_run_seed_task_and_pass():
    s1, s2, s3 = _stream(), _stream(), _stream()
    run(make_tiny_clip(), Finetune(epochs=3, batch_size=4), s1, seed=0, progress=False)
    run(make_tiny_clip(), Finetune(epochs=3, batch_size=4), s2, seed=0, progress=False)
    run(make_tiny_clip(), Finetune(epochs=3, batch_size=4), s3, seed=1, progress=False)
    a, b, c = (s.tasks[0].train.seeds for s in (s1, s2, s3))
    assert len(a) == 3 and len(set(a)) == 3  # one per pass, each its own
    assert a == b and a != c  # a repeat (or a resume) draws the same crops; another seed others


def test_mtil_and_xtail_train_on_crops_of_the_whole_image_and_evaluate_on_the_eval_view(tmp_path):
    write_eurosat(tmp_path)
    s = mtil.mtil_stream(tmp_path, order=["eurosat"], image_size=8)
    eu = s.tasks[0]
    assert isinstance(eu.train, TrainCrops) and eu.train.scale == (0.9, 1.0) and eu.train.size == 8
    x, _ = eu.train[0]
    assert x.shape == (3, 8, 8)
    assert eu.train.base[0][0].shape == (3, 8, 8)  # the PNGs are 8x8: whole, not resized
    assert not isinstance(eu.test, TrainCrops) and len(eu.train.targets) == 40
    plain = mtil.mtil_stream(tmp_path, order=["eurosat"], image_size=4, train_crop=None).tasks[0]
    assert not isinstance(plain.train, TrainCrops) and plain.train[0][0].shape == (3, 4, 4)
    assert torch.equal(plain.train.targets, eu.train.targets)
    few = mtil.xtail_stream(tmp_path, order=["eurosat"], shots=2, image_size=8, splits="torchvision").tasks[0]
    assert isinstance(few.train, TrainCrops) and len(few.train) == 20


def test_xtail_coop_training_images_are_read_whole(tmp_path):
    write_coop_split(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", ["Annual Crop Land", "Forest"])
    eu = mtil.xtail_stream(tmp_path, order=["eurosat"], shots=None, image_size=4).tasks[0]
    assert isinstance(eu.train, TrainCrops) and eu.train.base.whole and not eu.test.whole
    assert eu.train[0][0].shape == (3, 4, 4) and eu.test[0][0].shape == (3, 4, 4)


def test_a_resume_refuses_switching_the_training_crops(tmp_path):
    from ctta.loop.checkpoint import _task_changes, stream_identity

    def stream(crop):
        train = TensorImages(torch.rand(4, 3, 20, 20), [0, 1, 0, 1])
        train = TrainCrops(train, 16, scale=crop) if crop else TensorImages(train.images, train.targets, 16)
        test = TensorImages(torch.zeros(2, 3, 16, 16), [0, 1])
        return TaskStream([Task("t0", LabelSpace(["a", "b"]), train=train, test=test)])

    plain, crops, other = (stream_identity(stream(c)) for c in (None, (0.9, 1.0), (0.5, 1.0)))
    assert plain[0][2] == stream_identity(stream(None))[0][2] and len(plain[0][2]) == 2  # as before crops existed
    assert _task_changes(plain, crops) == [
        "task t0: training augmentation none -> random resized crops to 16 px, scale 0.9-1, ratio 0.75-1.333"]
    assert _task_changes(crops, other) and "scale 0.5-1" in _task_changes(crops, other)[0]
