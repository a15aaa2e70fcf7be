"""The world's natural-shift test-time stream (`streams.world_style`): content, determinism, independence of the
style list, the optional corruption, and plain errors for bad arguments."""
import pytest
import torch

from streams import synthetic as W
from streams.world_style import style_shift_tasks


def test_one_shuffled_balanced_task_per_style():
    s = style_shift_tasks(per_class=2, seed=0)
    assert s.name == "world-style-reset" and [t.name for t in s.tasks] == ["textured"] and s.scope == "own"
    t = s.tasks[0]
    assert len(t.space) == 100 and len(t.test) == 200 and t.boundary
    y = t.test.targets
    assert torch.equal(torch.bincount(y, minlength=100), torch.full((100,), 2))  # balanced
    assert not torch.equal(y, torch.sort(y).values)  # shuffled, not class-sorted
    assert t.test.images.dtype == torch.uint8 and t.test.images.shape[1:] == (3, W.RESOLUTION, W.RESOLUTION)


def test_seeded_and_a_style_does_not_depend_on_the_list():
    a = style_shift_tasks(per_class=1, seed=3).tasks[0].test
    b = style_shift_tasks(["filled", "textured"], per_class=1, seed=3, setting="continual")
    assert torch.equal(a.images, b.tasks[1].test.images) and torch.equal(a.targets, b.tasks[1].test.targets)
    assert [t.boundary for t in b.tasks] == [False, False] and b.name == "world-style-continual"
    assert not torch.equal(b.tasks[0].test.images, b.tasks[1].test.images)  # filled is not textured
    assert not torch.equal(style_shift_tasks(per_class=1, seed=4).tasks[0].test.images, a.images)


def test_corruption_on_top_and_ten_class_labels():
    clean = style_shift_tasks(per_class=1, seed=0).tasks[0]
    hit = style_shift_tasks(per_class=1, seed=0, corruption="contrast", severity=5).tasks[0]
    assert hit.name == "textured+contrast-5" and torch.equal(hit.test.targets, clean.test.targets)
    # contrast pulls every pixel toward its image's mean: the spread within each image shrinks
    def spread(x):
        return x.float().flatten(1).std(1).mean()
    assert spread(hit.test.images) < 0.3 * spread(clean.test.images)
    shapes = style_shift_tasks(per_class=3, seed=0, labels="shape")
    assert len(shapes.tasks[0].space) == 10 and len(shapes.tasks[0].test) == 30 and shapes.name.endswith("-shape")


@pytest.mark.parametrize("kwargs, message", [
    ({"styles": ["watercolour"]}, "unknown styles"),
    ({"styles": ["textured", "textured"]}, "listed twice"),
    ({"styles": "textured"}, "non-empty list"),
    ({"styles": []}, "non-empty list"),
    ({"setting": "gradual"}, "unknown style-shift setting"),
    ({"corruption": "fog"}, "unknown corruption"),
    ({"severity": 0}, "severity must be"),
    ({"per_class": 0}, "per_class must be"),
    ({"labels": "size"}, "unknown shift label space"),
])
def test_bad_arguments_fail_plainly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        style_shift_tasks(**kwargs)
