"""Input rules stated and enforced (issue #15, Deliver 8): image values and PIL modes, stream sizes, unsupported
text towers, and a real-data experiment that checks its dataset before loading weights."""
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from ctta import Clip
from tests.conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- text towers
def _bidirectional_config():
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["text_cfg"]["no_causal_mask"] = True  # MobileCLIP's text tower
    return cfg


def test_text_tower_without_causal_mask_is_refused_by_name_from_the_config():
    with pytest.raises(NotImplementedError, match=r"'tiny-bidir' is not supported.*no causal mask"):
        Clip.from_config(_bidirectional_config(), name="tiny-bidir")


def test_text_tower_without_causal_mask_is_refused_when_wrapping_a_built_network():
    open_clip.factory._MODEL_CONFIGS["tiny-bidir2"] = _bidirectional_config()
    net = open_clip.create_model("tiny-bidir2", pretrained=None)
    assert net.attn_mask is None  # CLIP keeps the text tower on itself
    with pytest.raises(NotImplementedError, match="no causal mask"):
        Clip(net, open_clip.get_tokenizer("tiny-bidir2"), mean=(0.5,) * 3, std=(0.5,) * 3,
             source={"arch": "tiny-bidir2"})


def test_mobileclip_configs_are_refused_before_any_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(NotImplementedError, match=r"'MobileCLIP-S1' is not supported.*no causal mask"):
        Clip.from_pretrained("MobileCLIP-S1", "datacompdr")


def test_causal_text_towers_still_build(tiny_clip):
    assert tiny_clip.encode_text(["a dog."]).shape == (1, 32)


# --------------------------------------------------------------------------------------- image values
from PIL import Image  # noqa: E402

from ctta.data import check_images, pil_to_rgb  # noqa: E402
from streams.images import load_image, to_float_image  # noqa: E402


@pytest.mark.parametrize("x, match", [
    (torch.rand(2, 3, 16, 16) * 255, r"looks like 0-255: divide by 255"),
    (torch.rand(2, 3, 16, 16) * 60000, r"looks like 16-bit: divide by 65535"),
    ((torch.rand(2, 3, 16, 16) - 0.48) / 0.27, r"looks normalised"),
    (torch.full((1, 3, 16, 16), 1.01), r"values span \[1\.01, 1\.01\]"),
    (torch.full((1, 3, 16, 16), float("nan")), "non-finite"),
    (torch.full((1, 3, 16, 16), float("inf")), "non-finite"),
    (torch.zeros(0, 3, 16, 16), "empty batch"),
    (torch.zeros(1, 3, 0, 16), "zero size"),
    (torch.zeros(3, 16, 16), r"rank 3 .*images\[None\]"),
    (torch.zeros(1, 4, 16, 16), "3 channels"),
])
def test_float_images_outside_the_rules_are_refused_with_how_to_fix(tiny_clip, x, match):
    with pytest.raises(ValueError, match=match):
        check_images(x)
    with pytest.raises(ValueError, match=match):
        tiny_clip.encode_image(x)  # the model applies the same rules


@pytest.mark.parametrize("dtype, hint", [(torch.uint8, "/ 255"), (torch.int16, "65535"), (torch.int32, "65535"),
                                         (torch.bool, r"images\.float\(\)")])
def test_integer_images_are_refused_with_a_hint(dtype, hint):
    with pytest.raises(TypeError, match=f"must be a float tensor.*{hint}"):
        check_images(torch.zeros(1, 3, 4, 4, dtype=dtype))


def test_resampling_overshoot_within_tolerance_passes():
    x = torch.rand(1, 3, 8, 8)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -5e-4, 1 + 5e-4
    assert check_images(x) is x


# --------------------------------------------------------------------------------------- PIL modes
def _grey(x):
    return torch.full((3, 2, 3), float(x))


@pytest.mark.parametrize("mode, value, want", [
    ("1", 1, 1.0), ("L", 51, 0.2), ("P", 0, 0.0), ("RGB", (255, 0, 51), None),
    ("I;16", 32768, 32768 / 65535), ("I;16B", 13107, 0.2), ("I;16L", 65535, 1.0),
    ("I", 40000, 40000 / 65535), ("I", 128, 128 / 255),
    ("F", 0.25, 0.25), ("F", 127.5, 0.5),
])
def test_pil_modes_are_scaled_by_their_bit_depth_not_clipped(mode, value, want):
    im = Image.new(mode, (3, 2), value)
    x = pil_to_rgb(im)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    if want is None:  # RGB
        assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    else:
        assert torch.allclose(x, _grey(want), atol=1e-6), (mode, value, x[:, 0, 0])


def test_float_and_wide_int_images_outside_a_bit_depth_are_stretched_by_their_range():
    f = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32), mode="F")
    assert torch.allclose(pil_to_rgb(f)[0, 0], torch.tensor([0.0, 0.5, 1.0]))
    i = Image.fromarray(np.array([[0, 100000, 200000]], dtype=np.int32), mode="I")
    assert torch.allclose(pil_to_rgb(i)[1, 0], torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        pil_to_rgb(Image.fromarray(np.array([[np.nan, 0.0]], dtype=np.float32), mode="F"))


@pytest.mark.parametrize("mode, transparent, opaque", [
    ("LA", (0, 0), (0, 255)), ("RGBA", (0, 0, 0, 0), (0, 0, 0, 255)), ("PA", (0, 0), (0, 255)),
])
def test_alpha_is_composited_on_white(mode, transparent, opaque):
    im = Image.new(mode, (2, 1), transparent)
    im.putpixel((1, 0), opaque)
    x = pil_to_rgb(im)
    assert torch.allclose(x[:, 0, 0], torch.ones(3)) and torch.allclose(x[:, 0, 1], torch.zeros(3))
    half = pil_to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert torch.allclose(half[:, 0, 0], torch.full((3,), 1 - 128 / 255))


def test_palette_with_a_transparent_colour_is_composited_on_white():
    im = Image.new("P", (2, 1), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    x = pil_to_rgb(im)
    assert torch.allclose(x[:, 0, 0], torch.ones(3)) and torch.allclose(x[:, 0, 1], torch.tensor([1.0, 0, 0]))


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"])
def test_other_modes_convert_to_rgb_in_range(mode):
    x = pil_to_rgb(Image.new(mode, (4, 3)))
    assert x.shape == (3, 3, 4) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_zero_size_images_are_refused(tiny_clip):
    with pytest.raises(ValueError, match="size 0x0"):
        tiny_clip.preprocess(Image.new("RGB", (0, 0)))
    with pytest.raises(ValueError, match="size 5x0"):
        to_float_image(Image.new("L", (5, 0)))


def test_preprocess_and_file_loading_use_the_same_conversion(tiny_clip, tmp_path):
    a = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    Image.fromarray(a).save(tmp_path / "deep.png")  # uint16 -> mode I;16
    with Image.open(tmp_path / "deep.png") as im:  # 16-bit PNG: mode I;16 (or I in older Pillow)
        ref = torch.from_numpy(a / 65535.0).float()
        assert torch.allclose(pil_to_rgb(im)[0], ref, atol=1e-6)
        x = tiny_clip.preprocess(im)
    assert torch.allclose(load_image(tmp_path / "deep.png")[2], ref, atol=1e-6)
    assert x.shape == (3, 16, 16) and 0.02 < float(x.mean()) < 0.98  # not the near-white of clipping
    rgb = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8))
    assert torch.allclose(tiny_clip.preprocess(rgb), tiny_clip.preprocess(pil_to_rgb(rgb)))


# --------------------------------------------------------------------------------------- stream sizes
from ctta.stream import class_incremental, split_into_tasks, split_sizes  # noqa: E402
from streams import cifar, world  # noqa: E402
from tests.conftest import make_dataset  # noqa: E402


@pytest.mark.parametrize("n_tasks, match", [(0, "n_tasks must be between 1 and 100.*got 0"),
                                            (-2, "n_tasks must be between 1 and 100.*got -2"),
                                            (101, "n_tasks must be between 1 and 100.*got 101"),
                                            (3, r"do not split into 3 equal tasks; choose n_tasks among \[1, 2, 4, 5")])
def test_world_n_tasks_is_validated_before_rendering(n_tasks, match):
    t = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        world.cil_stream(n_tasks)
    assert time.perf_counter() - t < 1.0  # refused before any image is rendered


def test_n_tasks_must_be_a_whole_number():
    with pytest.raises(TypeError, match="n_tasks must be a whole number, got 2.5"):
        split_into_tasks(100, 2.5)
    assert split_into_tasks(100, 20) == 5 and split_into_tasks(100, 100) == 1


@pytest.mark.parametrize("increment, initial, match", [
    (0, 0, "increment must be at least 1 class per task, got 0"),
    (-5, 0, "increment must be at least 1"),
    (10, -1, r"initial must be between 0 \(B0\) and 100"),
    (10, 101, "initial must be between"),
    (7, 0, "100 classes do not split into tasks of 7"),
    (10, 45, "55 classes after the first task of 45 do not split into tasks of 10"),
])
def test_class_incremental_splits_are_validated_with_clear_messages(increment, initial, match):
    with pytest.raises(ValueError, match=match):
        split_sizes(100, increment, initial)


def test_class_incremental_and_cifar_refuse_a_bad_split_before_reading_data(tmp_path):
    from ctta import LabelSpace
    space = LabelSpace([f"c{i}" for i in range(6)])
    with pytest.raises(ValueError, match="increment must be at least 1"):
        class_incremental(space, make_dataset(12, 6), make_dataset(6, 6), increment=0)
    with pytest.raises(ValueError, match="increment must be at least 1"):  # not "dataset folder does not exist"
        cifar.cifar100_cil(tmp_path / "nothing-here", increment=0)
    assert split_sizes(100, 10, 50) == [50] + [10] * 5 and split_sizes(6, 2) == [2, 2, 2]


# --------------------------------------------------------------------------------------- run.py order
def test_real_data_experiment_checks_its_dataset_before_loading_weights(tmp_path):
    """No dataset and no network: the run fails in seconds naming the dataset and what to download, and never
    reaches the weights (before, it tried to download ViT-B/16's weights and never mentioned the data)."""
    empty = tmp_path / "data"
    empty.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), "experiment=zeroshot_cifar100",
                        f"data_root={empty}", f"out_dir={tmp_path / 'out'}", "threads=1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "CIFAR-100: missing file 'cifar-100-python/train'" in out and "cifar-100-python.tar.gz" in out, out[-2000:]
    assert "weights" not in out.lower() and "open_clip_pytorch_model" not in out and "QuickGELU" not in out
    assert took < 120, took  # imports dominate; no download retries
