"""World shift streams sized for stream methods (issue #17 item 3): per-domain lengths, label spaces, orderings,
severities, seeding, and the stream configs that build them."""
from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from streams import synthetic as W
from streams.world import SHIFT_CHUNK, render_labels, shift_space, shift_tasks

from tests.test_configs import CONFIGS

TWO = ["gaussian_noise", "contrast"]


def _same(a, b) -> bool:
    return (a.name == b.name and [t.name for t in a.tasks] == [t.name for t in b.tasks]
            and all(torch.equal(x.test.images, y.test.images) and torch.equal(x.test.targets, y.test.targets)
                    for x, y in zip(a.tasks, b.tasks)))


def test_lengths_per_class_and_per_domain_in_each_label_space():
    s = shift_tasks(TWO, 3, per_class=3, setting="continual")
    assert [len(t.test) for t in s.tasks] == [300, 300] and len(s.tasks[0].space) == 100
    s = shift_tasks(TWO, 3, per_class=None, per_domain=40, labels="shape")
    assert [len(t.test) for t in s.tasks] == [40, 40] and len(s.tasks[0].space) == 10
    for t in s.tasks:  # balanced: 4 of each shape in every domain
        assert Counter(t.test.targets.tolist()) == {c: 4 for c in range(10)}
    with pytest.raises(ValueError, match="multiple of the 100 classes"):
        shift_tasks(TWO, 3, per_class=None, per_domain=150)
    with pytest.raises(ValueError, match="not both"):
        shift_tasks(TWO, 3, per_class=2, per_domain=200)
    with pytest.raises(ValueError, match="per_class must be a positive int"):
        shift_tasks(TWO, 3, per_class=0)


def test_long_stream_config_has_2000_per_corruption_by_default():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        long = compose("run", overrides=["stream=world_shift_long"]).stream
        shape = compose("run", overrides=["stream=world_shift_long_shape"]).stream
    assert len(long.corruptions) == 10 and long.per_class * 100 == 2000 and long.labels == "combo"
    assert shape.labels == "shape" and shape.per_class * 10 == 2000 and shape.setting == long.setting
    s = instantiate(long, corruptions=["jpeg"], seed=0)  # one domain of the real length (0.5 s)
    assert [len(t.test) for t in s.tasks] == [2000] and s.tasks[0].test.images.dtype == torch.uint8
    assert Counter(s.tasks[0].test.targets.tolist()) == {c: 20 for c in range(100)}


def test_label_spaces_name_the_classes_as_the_micro_clip_was_trained():
    assert list(shift_space("combo").classnames[:2]) == ["red circle", "red square"] and len(shift_space()) == 100
    shape, colour = shift_space("shape"), shift_space("colour")
    assert list(shape.classnames) == list(W.SHAPES) and list(shape.templates) == ["a {}."]
    assert list(colour.classnames) == list(W.COLOURS) and list(colour.templates) == ["a {} shape."]
    with pytest.raises(ValueError, match="unknown shift label space"):
        shift_tasks(TWO, 3, labels="size")


def test_colour_labels_are_the_rendered_colour():
    # Rendered with the same factors but the colour label fixed: an image of class "red" is reddest in the mean
    # of its brightest pixels (the object; backgrounds are dark greys), "blue" bluest.
    data = render_labels("colour", 8, seed=5)
    x, y = data.images.float() / 255, data.targets
    bright = x.flatten(2).topk(40, dim=2).values.mean(2)  # [N, 3] mean of the 40 brightest values per channel
    red, blue = bright[y == W.COLOURS.index("red")], bright[y == W.COLOURS.index("blue")]
    assert (red[:, 0] > red[:, 2]).all() and (blue[:, 2] > blue[:, 0]).all()


def test_orderings():
    kw = dict(per_class=1, seed=3)
    reset = shift_tasks(TWO, 3, setting="reset", **kw)
    cont = shift_tasks(TWO, 3, setting="continual", **kw)
    assert [t.boundary for t in reset.tasks] == [True, True] and [t.boundary for t in cont.tasks] == [False, False]
    assert [t.name for t in cont.tasks] == ["gaussian_noise-3", "contrast-3"]  # domain blocks in the given order
    assert all(torch.equal(a.test.images, b.test.images) for a, b in zip(reset.tasks, cont.tasks))
    assert _same(shift_tasks(TWO, 3, setting="episodic", **kw), reset)  # the literature's name for reset
    # each domain: the same clean images, in its own order
    a, b = (t.test.targets for t in cont.tasks)
    assert sorted(a.tolist()) == sorted(b.tolist()) == [c for c in range(100)] and not torch.equal(a, b)
    # mixed: one task holding every domain's samples, shuffled across domains
    mixed = shift_tasks(TWO, 3, setting="mixed", **kw)
    assert [t.name for t in mixed.tasks] == ["mixed"] and len(mixed.tasks[0].test) == 200
    pool = torch.cat([t.test.images for t in cont.tasks])
    m = mixed.tasks[0].test.images
    assert sorted(map(bytes, m.flatten(1).numpy())) == sorted(map(bytes, pool.flatten(1).numpy()))
    first = {bytes(v) for v in cont.tasks[0].test.images.flatten(1).numpy()}
    half = [bytes(v) in first for v in m.flatten(1).numpy()]
    assert 0 < sum(half[:100]) < 100  # the first half is not one domain
    # label-correlated: each domain sorted by class; gradual: 1 -> s -> 1, hidden, unique names
    lc = shift_tasks(TWO, 3, setting="label_correlated", per_class=2)
    assert all(torch.equal(t.test.targets, torch.arange(100).repeat_interleave(2)) for t in lc.tasks)
    gr = shift_tasks(["jpeg"], 3, setting="gradual", **kw)
    assert [t.name for t in gr.tasks] == ["jpeg-1", "jpeg-2", "jpeg-3", "jpeg-2-down", "jpeg-1-down"]
    assert not any(t.boundary for t in gr.tasks)
    with pytest.raises(ValueError, match="unknown shift setting"):
        shift_tasks(TWO, 3, setting="shuffled")


def test_severities_one_to_five_and_lists():
    s = shift_tasks(["contrast"], [1, 5], per_class=1, setting="continual")
    assert [t.name for t in s.tasks] == ["contrast-1", "contrast-5"]
    clean = render_labels("combo", 1, 41)  # seed 0's clean images; one per class, so clean image c has label c
    err = [float((t.test.images.float() - clean.images[t.test.targets].float()).abs().mean()) for t in s.tasks]
    assert 0 < err[0] < err[1]  # severity 5 moves the pixels further than severity 1
    for bad in (0, 6, True, [], [3, 3], 2.5):
        with pytest.raises(ValueError, match="severit"):
            shift_tasks(["contrast"], bad, per_class=1)
    with pytest.raises(ValueError, match="listed twice"):
        shift_tasks(["contrast", "contrast"], 3, per_class=1)
    with pytest.raises(ValueError, match="unknown corruptions"):
        shift_tasks(["fog"], 3, per_class=1)


def test_seeded_and_reproducible_and_chunked_like_the_unchunked_code():
    a = shift_tasks(TWO, 3, per_class=2, seed=1, setting="continual")
    assert _same(a, shift_tasks(TWO, 3, per_class=2, seed=1, setting="continual"))
    b = shift_tasks(TWO, 3, per_class=2, seed=2, setting="continual")
    assert not torch.equal(a.tasks[0].test.targets, b.tasks[0].test.targets)
    assert not torch.equal(a.tasks[0].test.images, b.tasks[0].test.images)
    # corruption in chunks: the first chunk is the unchunked result, later chunks have their own noise
    whole = shift_tasks(["gaussian_noise"], 3, per_class=3, seed=1, chunk=10_000).tasks[0].test
    parts = shift_tasks(["gaussian_noise"], 3, per_class=3, seed=1, chunk=100).tasks[0].test
    assert torch.equal(whole.targets, parts.targets) and torch.equal(whole.images[:100], parts.images[:100])
    assert not torch.equal(whole.images[100:], parts.images[100:])
    assert SHIFT_CHUNK >= 200  # the short streams of earlier experiments (<= 200 per domain) kept their pixels


# ------------------------------------------------------------------------------- world_tta experiment configs
FAMILY = ("zeroshot", "tpt", "ctpt", "zero", "tda", "tda_1view", "dmn", "dpe", "boost_adapter", "tent")


@pytest.mark.parametrize("method", FAMILY)
def test_world_tta_experiments_compose_to_their_own_folder(method):
    from tests.test_scripts import _resolved
    cfg = _resolved([f"experiment=world_tta/{method}", "seed=2", "stream.severity=5"])
    assert cfg["name"] == "world_tta" and cfg["method"] == method
    assert cfg["out_dir"] == f"runs/world_tta/reset/severity5/{method}/seed2"
    assert cfg["stream"]["seed"] == 2 and cfg["stream"]["labels"] == "combo"
    assert cfg["stream"]["per_class"] * 100 == 2000
    # batch 1 (the cache family's official protocol), but TENT at its reference's batch 64: a ResNet's BatchNorms
    # need a batch of images for their statistics
    assert len(cfg["stream"]["corruptions"]) == 10 and cfg["samples"]["batch_size"] == (64 if method == "tent" else 1)
    assert cfg["samples"]["reset"] is None  # each strategy's default: episodic TPT/C-TPT/ZERO, online the rest
    if method in ("tda", "tda_1view", "dmn", "dpe", "boost_adapter", "zero"):
        assert cfg["strategy"]["logit_scale"] == 100.0  # the official 100·cos
    if method == "tda_1view":
        assert cfg["strategy"]["n_views"] == 0 and not cfg["strategy"]["augmix"]
    if method == "ctpt":
        assert cfg["strategy"]["ctpt_lambda"] == 20.0 and cfg["strategy"]["augmix"]
    if method in ("tpt", "ctpt"):
        assert cfg["strategy"]["ctx_init"] == "a"  # untuned prompt = the world's zero-shot prompt "a {}."
    if method == "zeroshot":
        assert cfg["strategy"]["cache"] is False


def test_world_tta_sweep_runs_and_report_tabulates_it(tmp_path):
    from tests.test_scripts import _script
    # under -m, Hydra checks the fixed overrides against the defaults (stream=world_cil) first: ++ for these keys
    tiny = ["++stream.per_class=1", "++stream.corruptions=[contrast,jpeg]", "++hooks.latency.warmup=1",
            "progress=false", "threads=1", "seed=0,1"]
    _script("run.py", "-m", "experiment=world_tta/zeroshot,world_tta/tda_1view", *tiny, cwd=tmp_path)
    for method in ("zeroshot", "tda_1view"):
        for seed in (0, 1):
            assert (tmp_path / f"runs/world_tta/reset/severity3/{method}/seed{seed}/results.json").is_file()
    r = _script("report.py", "runs/world_tta", cwd=tmp_path)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| world_tta |")]
    assert [row.split(" | ")[1:4] for row in rows] == [["world-shift-reset", "zeroshot", "n=2"],
                                                       ["world-shift-reset", "tda_1view", "n=2"]]
    # online accuracy (mean over the corruptions), ECE, p50, p95 with intervals, samples/s: nothing missing
    assert all(row.count(" ± ") >= 4 and "–" not in row for row in rows)
