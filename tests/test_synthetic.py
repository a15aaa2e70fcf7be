"""The built-in synthetic world (streams/synthetic.py) and the corruptions (streams/corruptions.py)."""
import pytest
import torch

from streams import synthetic as W
from streams.corruptions import CORRUPTIONS, corrupt


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_vocabularies_have_enough_distinct_values():
    assert len(set(W.SHAPES)) >= 10 and len(set(W.COLOURS)) >= 10
    assert W.BACKGROUNDS == ("plain", "gradient", "stripes", "noise")
    assert set(W.STYLES) == {"filled", "outline", "textured"} and len(W.SIZES) == 3


def test_same_seed_same_images_and_captions_other_seed_differs():
    a, b, c = (W.sample_factors(64, gen(s)) for s in (7, 7, 8))
    ia, ib, ic = W.render(a), W.render(b), W.render(c)
    assert torch.equal(ia, ib) and not torch.equal(ia, ic)
    assert W.caption(a, gen(1)) == W.caption(b, gen(1))


def test_render_shape_range_dtype():
    x = W.render(W.sample_factors(50, gen()))
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert W.render(W.sample_factors(0, gen())).shape == (0, 3, 32, 32)
    u = W.to_uint8(x)
    assert u.dtype == torch.uint8 and (u.float() / 255 - x).abs().max() <= 0.5 / 255 + 1e-6


def test_render_resolution_draws_the_same_scene_with_more_pixels():
    import torch.nn.functional as F
    f = W.sample_factors(60, gen(4))  # every style and background
    small, big = W.render(f), W.render(f, 128)
    assert big.shape == (60, 3, 128, 128) and big.min() >= 0 and big.max() <= 1
    assert torch.equal(W.render(f, W.RESOLUTION), small)
    # 4x4 averages of the 128-px render are the 32-px render up to anti-aliased edges; stripe, texture and outline
    # widths are defined on the scene's grid (drawing them at 128-px frequency gives a mean difference above 0.03)
    assert (F.avg_pool2d(big, 4) - small).abs().mean() < 0.01


@pytest.mark.parametrize("bad", [0, 4, 32.0, True, "64"])
def test_render_refuses_a_bad_resolution(bad):
    with pytest.raises(ValueError, match="resolution must be an int >= 8"):
        W.render(W.sample_factors(2, gen()), bad)


def test_object_is_visible_and_style_changes_pixels():
    f = W.sample_factors(40, gen(3), styles=["filled"])
    g = W.sample_factors(40, gen(3), styles=["outline"])
    bg_only = W.render(W.Factors(**{**f.__dict__, "center": f.center + 10.0}))  # object moved out of frame
    assert (W.render(f) - bg_only).abs().amax(dim=(1, 2, 3)).min() > 0.2      # every object shows
    assert not torch.equal(W.render(f), W.render(g))


def test_held_out_grid_is_balanced():
    assert len(W.HELD_OUT) == 20
    for c in W.COLOURS:
        assert sum(col == c for col, _ in W.HELD_OUT) == 2
    for s in W.SHAPES:
        assert sum(sh == s for _, sh in W.HELD_OUT) == 2


def test_excluded_combos_never_sampled_and_combos_restrict():
    f = W.sample_factors(3000, gen(), exclude_combos=W.HELD_OUT)
    pairs = {(W.COLOURS[c], W.SHAPES[s]) for c, s in zip(f.colour.tolist(), f.shape.tolist())}
    assert not pairs & W.HELD_OUT and len(pairs) == 80
    h = W.sample_factors(500, gen(), combos=W.HELD_OUT)
    assert {(W.COLOURS[c], W.SHAPES[s]) for c, s in zip(h.colour.tolist(), h.shape.tolist())} == W.HELD_OUT


def test_factor_restriction():
    f = W.sample_factors(300, gen(), shapes=["star", "ring"], colours=["red"], sizes=["large"],
                         backgrounds=["stripes"], styles=["outline"])
    assert set(f.shape.tolist()) == {W.SHAPES.index("star"), W.SHAPES.index("ring")}
    assert set(f.colour.tolist()) == {W.COLOURS.index("red")}
    assert set(f.size.tolist()) == {2} and set(f.background.tolist()) == {2} and set(f.style.tolist()) == {1}


def test_captions_name_the_right_factors():
    f = W.sample_factors(400, gen(5))
    texts, mentions = W.describe(f, gen(6))
    assert len(texts) == 400 and (mentions >= 0).any(1).all()
    for t, m, s, c, z, b, st in zip(texts, mentions.tolist(), f.shape.tolist(), f.colour.tolist(),
                                    f.size.tolist(), f.background.tolist(), f.style.tolist()):
        words = t.split()
        assert (W.SHAPES[s] in words) == (m[0] >= 0) and (W.COLOURS[c] in words) == (m[1] >= 0)
        assert (W.SIZES[z] in words) == (m[2] >= 0)
        assert (("background" in words) == (m[3] >= 0)) and (m[3] < 0 or m[3] == b)
        assert m[4] < 0 or m[4] == st
        assert not any(w in words for w in W.SHAPES if w != W.SHAPES[s])
    ok = W.matches(mentions, f)
    assert ok.diagonal().all()  # a caption is true of its own image


def test_phrase():
    assert W.phrase(W.SHAPES.index("star"), W.COLOURS.index("red"), 0, 2) == "a small red star on a striped background"
    assert W.phrase(W.SHAPES.index("star"), style=1) == "an outline of a star"
    assert W.phrase(colour=W.COLOURS.index("orange")) == "an orange shape"


@pytest.mark.parametrize("kwargs, err", [
    ({"shapes": ["blob"]}, ValueError), ({"colours": ["mauve"]}, ValueError), ({"styles": "filled"}, TypeError),
    ({"combos": [("red", "blob")]}, ValueError), ({"shapes": []}, ValueError),
    ({"combos": [("red", "star")], "colours": ["blue"]}, ValueError)])
def test_bad_arguments_raise_clear_errors(kwargs, err):
    with pytest.raises(err):
        W.sample_factors(4, gen(), **kwargs)


def test_negative_n_raises():
    with pytest.raises(ValueError, match="non-negative"):
        W.sample_factors(-1, gen())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_keep_shape_range_and_grow_with_severity(name):
    x = W.render(W.sample_factors(16, gen(2)))
    errs = []
    for s in range(1, 6):
        y = corrupt(x, name, s, gen(9))
        assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1
        assert torch.equal(y, corrupt(x, name, s, gen(9)))  # deterministic under a generator
        errs.append(((y - x) ** 2).mean().item())
    assert errs[0] > 0 and errs[-1] > errs[0]
    assert all(b >= a * 0.95 for a, b in zip(errs, errs[1:])), errs


def test_corrupt_bad_arguments():
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 3)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "contrast", 6)


def test_describe_mention_probabilities():
    from streams.synthetic import MENTIONED, SHAPES, describe, sample_factors
    g = torch.Generator().manual_seed(0)
    f = sample_factors(50, g)
    texts, mentions = describe(f, g, mention_p=(1.0, 0.0, 0.0, 0.0, 0.0))  # shape only
    assert (mentions[:, 0] == f.shape).all() and (mentions[:, 1:] == -1).all()
    assert all(SHAPES[int(s)] in t for s, t in zip(f.shape, texts))
    with pytest.raises(ValueError, match="5 probabilities"):
        describe(f, g, mention_p=(1.0, 0.5))
    assert len(MENTIONED) == 5
