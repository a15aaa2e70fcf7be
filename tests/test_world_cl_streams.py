"""The continual-learning world streams of issue #18: the shifted class-incremental stream (B0 / Bx, textured style),
the world MTIL (own label spaces and templates, ZSCL's orders, Transfer / Average / Last), their configs, and the
zero-shot retention baseline of every method those configs run."""
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ctta import AccuracyMatrix, ImageTensorDataset, LabelSpace, Task, ZeroShotRetention, run
from ctta.hooks import ZeroShotPredictor, evaluate
from ctta.stream import class_order
from streams import synthetic as W
from streams import world
from streams import world_mtil as M
from tests.conftest import TINY_CONFIG, make_dataset, make_tiny_clip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("zeroshot", "finetune", "lwf", "vr_lwf", "wise_ft", "rapf", "lora", "codyra")


# ------------------------------------------------------------------------------------------------ shifted CIL
def test_shifted_b0_stream_is_the_100_classes_in_the_textured_style():
    s = world.cil_stream(10, styles=["textured"], train_per_class=1, test_per_class=2, seed=3)
    assert s.name == "world-cil10-textured" and s.scope == "seen"
    assert [len(t.space) for t in s] == [10] * 10
    order = class_order(100, 1993)  # the seed-1993 class order: task k holds order[10k : 10k + 10]
    combos = world.combo_classes()
    assert [n for t in s for n in t.space.classnames] == [" ".join(combos[i]) for i in order]
    # the pixels are the textured rendering of each class (and not the pre-training styles' rendering)
    textured = world.render_per_class(combos, 2, 3000 + 23, styles=("textured",))
    plain = world.render_per_class(combos, 2, 3000 + 23)
    task0 = s.tasks[0].test  # its images in combo-index order: the 2 images of each of its classes
    first = min(order[:10])
    assert task0.targets[0] == order[:10].index(first)
    assert torch.equal(task0.base.images[task0.indices[0]], textured.images[2 * first])
    assert not torch.equal(textured.images[2 * first], plain.images[2 * first])


def test_the_shifted_domain_is_a_fixed_corruption_of_train_and_test():
    from streams.corruptions import corrupt
    s = world.cil_stream(10, styles=["textured"], corruption="colour_shift", severity=4, train_per_class=1,
                         test_per_class=2, seed=3)
    assert s.name == "world-cil10-textured-colour_shift4"
    clean = world.render_per_class(world.combo_classes(), 2, 3000 + 23, styles=("textured",))
    # colour_shift is a global transform (no noise): the stream's test pixels are exactly the corrupted clean ones
    expect = W.to_uint8(corrupt(clean.images.float().div(255), "colour_shift", 4))
    task0 = s.tasks[0].test
    assert torch.equal(task0.base.images, expect)
    again = world.cil_stream(10, styles=["textured"], corruption="colour_shift", severity=4, train_per_class=1,
                             test_per_class=2, seed=3)
    assert torch.equal(again.tasks[0].train.base.images, s.tasks[0].train.base.images)
    for bad, match in ((("fog", 3), "unknown corruptions"), (("colour_shift", 6), "severity must be an int in 1..5")):
        t = time.perf_counter()
        with pytest.raises(ValueError, match=match):
            world.cil_stream(10, corruption=bad[0], severity=bad[1])
        assert time.perf_counter() - t < 1.0


def test_noise_corruption_depends_on_the_seed_only():
    data = world.render_per_class(world.combo_classes()[:3], 4, 7)
    a = world.corrupt_all(data, "gaussian_noise", 2, seed=5, chunk=5)
    b = world.corrupt_all(data, "gaussian_noise", 2, seed=5, chunk=5)
    c = world.corrupt_all(data, "gaussian_noise", 2, seed=6, chunk=5)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert torch.equal(a.targets, data.targets)


def test_bx_stream_has_a_base_task_then_equal_increments():
    s = world.cil_stream(6, initial=50, styles=["textured"], train_per_class=1, test_per_class=1)
    assert s.name == "world-cil6-b50-textured"
    assert [len(t.space) for t in s] == [50, 10, 10, 10, 10, 10]
    names = [n for t in s for n in t.space.classnames]
    assert len(set(names)) == 100
    assert [len(t.test) for t in s] == [50, 10, 10, 10, 10, 10]


def test_default_stream_keeps_its_name_and_split():
    s = world.cil_stream(5, train_per_class=1, test_per_class=1)
    assert s.name == "world-cil5" and [len(t.space) for t in s] == [20] * 5


@pytest.mark.parametrize("n_tasks, initial, match", [
    (4, 50, r"50 classes after a base task of 50 do not split into 3 equal tasks; choose n_tasks - 1 among \[1, 2, 5"),
    (1, 50, "n_tasks .* must be at least 2, got 1"),
    (6, 100, r"initial .* between 0 \(B0\) and 99, got 100"),
    (6, -10, r"initial .* between 0 \(B0\) and 99, got -10"),
    (6, "50", r"initial .* got '50'"),
    (3, 0, r"do not split into 3 equal tasks"),
])
def test_bad_splits_are_refused_before_rendering(n_tasks, initial, match):
    t = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        world.cil_stream(n_tasks, initial=initial, styles=["textured"])
    assert time.perf_counter() - t < 1.0


def test_a_style_string_is_refused():
    with pytest.raises(TypeError, match="not the string 'textured'"):
        world.cil_stream(10, styles="textured", train_per_class=1, test_per_class=1)


# ------------------------------------------------------------------------------------------------ world MTIL
def test_orders_are_zscls():
    names = sorted(M.BY_NAME)
    assert M.world_order("I") == names  # Order I: alphabetical, as ZSCL's
    assert M.order_ii(11) == [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]  # ZSCL results.ipynb
    assert M.order_ii(6) == [5, 0, 1, 3, 4, 2]  # by hand: drop 9, 6, 7, 8, 10
    assert len(names) == 6 and M.world_order("II") == [names[i] for i in (5, 0, 1, 3, 4, 2)]
    assert M.world_order(["shapes", "styles"]) == ["shapes", "styles"]
    for bad, match in (("III", "unknown order 'III'"), (["shapes", "nope"], r"unknown world datasets \['nope'\]"),
                       (["shapes", "shapes"], "listed twice"), ([], "empty")):
        with pytest.raises(ValueError, match=match):
            M.world_order(bad)


@pytest.fixture(scope="module")
def mtil_small():
    return M.mtil_stream("I", train_per_class=2, test_per_class=2, seed=4)


def test_mtil_tasks_have_their_own_label_spaces_and_templates(mtil_small):
    s = mtil_small
    assert s.scope == "own" and s.name == "world-mtil-I" and 5 <= len(s) <= 8
    assert [t.name for t in s] == sorted(M.BY_NAME)
    temps = [t.space.class_templates[0] for t in s]
    assert len(set(temps)) >= 4  # datasets speak in their own templates
    for t in s:
        c = len(t.space)
        assert t.train.targets.tolist() == sorted(list(range(c)) * 2)  # balanced, class-sorted
        assert len(t.test) == 2 * c
        assert s.space_for(len(s) - 1, s.tasks.index(t)) == (t.space, 0)  # each dataset among its own classes


def test_a_dataset_has_the_same_pixels_in_both_orders(mtil_small):
    ii = M.mtil_stream("II", train_per_class=2, test_per_class=2, seed=4)
    for t in ii:
        same = next(u for u in mtil_small if u.name == t.name)
        assert torch.equal(t.test.images, same.test.images) and torch.equal(t.train.images, same.train.images)


def test_factor_labels_mean_the_factor():
    # size labels: a large object covers more of the image than a small one (checked on the pixels; the object is
    # brighter than the dark background, textured fill included: its darkest is 0.35 x the colour)
    d = M.BY_NAME["sizes_textured"]
    data = M.render_dataset(d, 40, seed=9)
    bright = (data.images.float().div(255).amax(1) > 0.5).float().mean((1, 2))
    cover = [bright[data.targets == k].mean().item() for k in range(3)]
    assert d.classnames == ("small", "medium", "large") and cover[0] < cover[1] < cover[2]
    # combo labels: the i-th class of combos_textured is the i-th held-out pair
    c = M.BY_NAME["combos_textured"]
    assert c.classnames == tuple(f"{a} {b}" for a, b in sorted(W.HELD_OUT))
    bg = M.WorldDataset("bg", "background", ("plain", "gradient", "striped", "noisy"), ("a {} background.",))
    assert M._values(bg) == W.BACKGROUNDS  # "striped" names the "stripes" factor


def test_mtil_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="train_per_class must be a positive int, got 0"):
        M.mtil_stream(train_per_class=0)
    with pytest.raises(ValueError, match="Order II is defined for 2 to 11"):
        M.order_ii(12)


def test_zero_shot_on_world_mtil_scores_transfer_average_last_by_hand(mtil_small):
    """A frozen model's rows are all its zero-shot row z, so (ZSCL's formulas) Transfer = mean(z[1:]) (each column's
    entries above the diagonal are z[j]) and Average = Last = mean(z)."""
    from ctta import Clip
    from ctta.strategies import ZeroShot
    torch.manual_seed(0)  # a tiny random CLIP for the world's 32x32 images
    tiny32 = Clip.from_config({**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 32}},
                              name="tiny-32")
    res = run(tiny32, ZeroShot(), mtil_small, [AccuracyMatrix()], progress=False)
    R = res["accuracy_matrix"]
    z = R[0]
    assert all(row == pytest.approx(z) for row in R)
    m = res["metrics"]
    assert m["transfer"] == pytest.approx(sum(z[1:]) / (len(z) - 1))
    assert m["average"] == pytest.approx(sum(z) / len(z)) and m["last"] == pytest.approx(sum(z) / len(z))


# ------------------------------------------------------------------------------------------------ configs
def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("run", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("stream, expect", [("world_cil_shifted", [10] * 10),
                                            ("world_cil_shifted_b50", [50, 10, 10, 10, 10, 10]),
                                            ("world_mtil", None), ("world_mtil_ii", None)])
def test_stream_configs_build_the_streams(stream, expect):
    cfg = _compose([f"stream={stream}", "stream.train_per_class=1", "stream.test_per_class=1"])
    s = instantiate(cfg.stream)
    if expect is not None:
        assert [len(t.space) for t in s] == expect and s.name.endswith("-textured-colour_shift4")
    else:
        assert s.name == f"world-mtil-{'II' if stream.endswith('ii') else 'I'}"
        assert [t.name for t in s] == M.world_order("II" if stream.endswith("ii") else "I")


@pytest.mark.parametrize("family", ["world_cl_shifted", "world_mtil"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_measures_retention_against_the_untouched_model(family, method, tiny_stream):
    """Item 5 of issue #18 for every method the experiment configs run: the retention baseline is the untouched
    model's zero-shot accuracy, measured before the strategy exists, whatever the strategy's own ``predict`` does
    at set-up (RAPF's untrained adapter, a LoRA's gates...). A tiny random CLIP and a tiny stream; schedule cut to 2
    steps (RAPF: 1 epoch)."""
    cfg = _compose([f"experiment={family}/{method}"])
    assert cfg.method == method and cfg.name == family
    short = {"iterations": 2} if "iterations" in cfg.strategy else {}
    if "epochs" in cfg.strategy and not short:
        short = {"epochs": 1, **({"milestones": []} if "milestones" in cfg.strategy else {})}
    if "cache" in cfg.strategy:
        short["cache"] = False

    def make():
        return instantiate(cfg.strategy, **short, **({"batch_size": 8} if "batch_size" in cfg.strategy else {}))

    # the control's labels are the untouched model's own zero-shot predictions: its baseline is exactly 1.0, and any
    # other predictor (a strategy after set-up, a trained model) scores below it
    space, data = LabelSpace([f"class {i}" for i in range(6)]), make_dataset(60, 6, seed=5)
    zs = make_tiny_clip().zero_shot(data.images, space).argmax(-1)
    control = Task("six-way", space, ImageTensorDataset(data.images, zs))
    assert evaluate(ZeroShotPredictor(make_tiny_clip()), control.test, space)["accuracy"] == 1.0
    if method == "rapf":  # the test has power: at set-up RAPF predicts through its untrained adapter, not zero-shot
        probe = make()
        probe.setup(make_tiny_clip())
        assert evaluate(probe, control.test, space)["accuracy"] < 0.9
    strategy = make()
    hook = ZeroShotRetention([control])
    res = run(make_tiny_clip(), strategy, tiny_stream, [hook], progress=False)
    assert hook.acc0[control.name] == 1.0 and res["retention"]["tasks"][control.name]["acc0"] == 1.0
    assert len(hook.history[control.name]) == len(tiny_stream)
