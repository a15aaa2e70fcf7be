"""The micro-CLIP pre-training recipe (scripts/pretrain_micro.py): its loss on hand-computed values, the caption
mixes it draws, and a two-step bf16 run whose checkpoint loads through ``Clip.from_pretrained``."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streams import synthetic as W

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import pretrain_micro as P  # noqa: E402


def test_multi_positive_loss_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    pos = torch.tensor([[True, True], [False, True]])  # caption 1 is true of both images
    loss = P.multi_positive_loss(img, txt, torch.tensor(2.0), pos)
    # logits = 2 * img @ txt.T = [[2, 1.2], [0, 1.6]]
    lse0, lse1 = math.log(math.exp(2) + math.exp(1.2)), math.log(1 + math.exp(1.6))
    i2t = (0.5 * (lse0 - 2) + 0.5 * (lse0 - 1.2) + (lse1 - 1.6)) / 2
    c0, c1 = math.log(math.exp(2) + 1), math.log(math.exp(1.2) + math.exp(1.6))
    t2i = ((c0 - 2) + 0.5 * (c1 - 1.2) + 0.5 * (c1 - 1.6)) / 2
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def _batch(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    f = P.make_batch(n, g, hard_frac=0.5, group=16)
    return f, W.render(f), g


def test_caption_batch_without_extras_is_describe_and_matches():
    f, images, g = _batch()
    state = g.get_state()
    out_images, texts, positives, mentions = P.caption_batch(images, f, g, 0.0, None)
    g.set_state(state)
    ref_texts, ref_mentions = W.describe(f, g)
    assert texts == ref_texts and out_images is images
    assert torch.equal(positives, W.matches(ref_mentions, f).T) and torch.equal(mentions, ref_mentions)
    assert positives.diagonal().all()  # every caption is true of its own image


def test_solo_captions_name_exactly_one_factor():
    f, images, g = _batch(1, n=400)
    _, texts, positives, _ = P.caption_batch(images, f, g, 0.0, None, solo_frac=1.0)
    assert positives.diagonal().all()
    assert sum(" background" in t for t in texts) > 40  # ~1/5 of 400 name only the background
    for t in texts:
        named = ["background" in t, any(f" {c} " in f" {t} " for c in W.COLOURS)]
        named += [any(t.endswith(s) or f" {s} " in t for s in W.SHAPES)]
        named += [any(f" {s} " in f" {t} " for s in W.SIZES)]
        named += [("outline" in t) or ("filled" in t)]
        assert sum(map(bool, named)) == 1, t
    # a background-only caption is true of every image with that background, and of no other
    j = next(i for i, t in enumerate(texts) if "striped background" in t)
    assert torch.equal(positives[:, j], f.background == W.BACKGROUNDS.index("stripes"))


def test_grey_images_are_never_matched_by_colour_captions():
    f, images, g = _batch(2)
    out, texts, positives, _ = P.caption_batch(images, f, g, 1.0, None)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert not any(f" {c} " in f" {t} " for t in texts for c in W.COLOURS)
    assert positives.diagonal().all()


def test_shape_groups_differ_only_in_shape():
    g = torch.Generator().manual_seed(3)
    f = P.shape_group(16, g)
    # every captioned factor but shape, and the background's tones and pattern, are one value in the group
    for name in ("colour", "size", "background", "style", "bg_colours", "bg_angle", "bg_period", "bg_noise"):
        v = getattr(f, name)
        assert torch.equal(v, v[:1].expand_as(v)), name
    # shapes: all 8 seen shapes of the colour, each twice (16 = 2 x 8), never a held-out combo
    colour = W.COLOURS[int(f.colour[0])]
    seen = [i for i, s in enumerate(W.SHAPES) if (colour, s) not in W.HELD_OUT]
    assert sorted(f.shape.tolist()) == sorted(seen * 2)
    # so a caption naming anything but the shape is true of all of them or of none
    texts, mentions = W.describe(f, g, [0.0, 1.0, 1.0, 1.0, 1.0])
    assert W.matches(mentions, f).all()
    # and the batch carries the requested share of such groups first
    b = P.make_batch(128, torch.Generator().manual_seed(4), hard_frac=0.5, group=16, shape_frac=0.25)
    assert len(b) == 128
    for k in range(2):
        grp = b[slice(16 * k, 16 * k + 16)]
        assert len(set(grp.shape.tolist())) == 8 and len(set(grp.colour.tolist())) == 1
    with pytest.raises(ValueError, match="> 1"):
        P.make_batch(64, g, hard_frac=0.8, group=16, shape_frac=0.5)


def test_augment_keeps_range_and_crops_only_size_free_captions():
    f, images, g = _batch(5, n=256)
    _, _, positives, mentions = P.caption_batch(images, f, g, 0.0, None)
    out, cropped = P.augment(images, mentions, g, 1.0, (0.25, 1.0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    names_size = mentions[:, W.MENTIONED.index("size")] >= 0
    assert torch.equal(cropped, ~names_size)  # crop_frac 1: exactly the size-free captions' images
    # uncropped images are the original or its mirror image, pixel for pixel
    for i in (~cropped).nonzero().flatten().tolist():
        assert torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(-1))
    assert sum(not torch.equal(out[i], images[i]) for i in (~cropped).nonzero().flatten().tolist()) > 0
    # no flip, no crop: unchanged; nothing drawn for crops
    same, none = P.augment(images, mentions, g, 0.0, (0.25, 1.0), flip=False)
    assert same is images and not none.any()


def test_degrade_is_off_by_default_and_stays_below_its_maxima():
    images = torch.full((64, 3, 8, 8), 0.5)
    images[:, :, 4, 4] = 0.9
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert P.degrade(images, g, 0.0, 0.04, 0.3) is images and torch.equal(g.get_state(), state)  # nothing drawn
    # noise only: each picked image's noise has σ ≤ 0.04 (the flat part away from the bright pixel)
    out = P.degrade(images, torch.Generator().manual_seed(1), 1.0, 0.04, 0.0)
    sd = (out[:, :, :2, :] - 0.5).flatten(1).std(1)
    assert sd.max() < 0.04 * 1.35 and 0.01 < sd.mean() < 0.03  # σ ~ U(0, 0.04): mean 0.02
    assert torch.equal(out, P.degrade(images, torch.Generator().manual_seed(1), 1.0, 0.04, 0.0))  # seeded
    # blur only: the bright pixel spreads to its neighbours by the 3x3 Gaussian of each image's σ ≤ 0.3
    out = P.degrade(images, torch.Generator().manual_seed(2), 1.0, 0.0, 0.3)
    assert out.min() >= 0 and out.max() <= 1 and (out[:, 0, 4, 4] <= 0.9).all() and (out[:, 0, 4, 4] < 0.899).any()
    w = math.exp(-1 / (2 * 0.3 ** 2))  # largest neighbour weight before normalisation, at σ = 0.3
    assert (out[:, 0, 4, 5] - 0.5).max() <= 0.4 * w / (1 + 4 * w + 4 * w * w) + 1e-6
    # a share: about half the images picked, the others untouched
    out = P.degrade(images, torch.Generator().manual_seed(3), 0.5, 0.04, 0.3)
    touched = (out != images).flatten(1).any(1)
    assert 16 < int(touched.sum()) < 48
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/pretrain_micro.py"), "--degrade-frac", "1.5"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--degrade-frac must lie in [0, 1]" in bad.stderr and "Traceback" not in bad.stderr


def test_loss_drops_invalid_pairs_exactly():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    pos = torch.tensor([[True, False], [False, True]])
    valid = torch.tensor([[True, False], [True, True]])  # pair (image 0, text 1) unknown: out of both softmaxes
    loss = P.multi_positive_loss(img, txt, torch.tensor(2.0), pos, valid)
    # logits [[2, -inf], [0, 1.6]]: i2t row 0 = 0; row 1 = lse(0, 1.6) - 1.6; t2i col 0 = lse(2, 0) - 2; col 1 = 0
    i2t = (0 + math.log(1 + math.exp(1.6)) - 1.6) / 2
    t2i = (math.log(math.exp(2) + 1) - 2 + 0) / 2
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="valid"):
        P.multi_positive_loss(img, txt, torch.tensor(2.0), pos, torch.tensor([[False, True], [True, True]]))


def test_class_contrast_loss_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])  # image 2 has no same-class partner: it is a negative only
    # anchor 0: logits to (1, 2) = 2·(0.6, 0) ; anchor 1: logits to (0, 2) = 2·(0.6, 0.8); positive is the 0.6 one
    a0 = -(1.2 - math.log(math.exp(1.2) + 1))
    a1 = -(1.2 - math.log(math.exp(1.2) + math.exp(1.6)))
    assert P.class_contrast_loss(x, y, 2.0).item() == pytest.approx((a0 + a1) / 2, rel=1e-6)
    # no pair of one class: zero, and still differentiable
    z = x.clone().requires_grad_()
    loss = P.class_contrast_loss(z, torch.tensor([0, 1, 2]), 2.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.filterwarnings("ignore")
def test_two_stage_bf16_run_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "micro.safetensors"
    args = ["--base-steps", "1", "--steps", "2", "--batch", "32", "--shape-frac", "0.5", "--group", "8", "--flip", "1",
            "--crop-frac", "0.5", "--combo-frac", "0.25", "--hard-frac", "0.0", "--class-weight", "1.0",
            "--precision", "bf16", "--solo-frac", "0.3", "--threads", "1", "--eval-n", "10", "--eval-every", "2",
            "--eval-rep", "1", "--degrade-frac", "0.5", "--save-every-min", "1e-6", "--out", str(out)]
    r = subprocess.run([sys.executable, str(ROOT / "scripts/pretrain_micro.py"), *args], check=True,
                       capture_output=True, cwd=tmp_path, text=True)
    assert "eval step 2:" in r.stdout and "nn_clean" in r.stdout  # stage 2's periodic check with NN figures
    meta = json.loads(out.with_suffix("").with_suffix(".meta.json").read_text())
    assert meta["steps"] == 2 and meta["precision"] == "bf16" and meta["solo_frac"] == 0.3
    assert meta["base_stage"]["steps"] == 1 and meta["base_stage"]["shape_frac"] == 0.0 and meta["shape_frac"] == 0.5
    assert meta["class_weight"] == 1.0 and meta["base_stage"]["class_weight"] == 0.0
    assert meta["degrade_frac"] == 0.5 and meta["base_stage"]["degrade_frac"] == 0.0
    assert meta["degrade_max"] == [0.04, 0.3]
    assert set(meta["zeroshot"]) and all(math.isfinite(v) for v in meta["zeroshot"].values())
    from ctta import Clip
    model = Clip.from_pretrained("micro-clip", str(out))
    assert model.provenance()["checkpoint_sha256"]
    # interim checkpoints (one per step here) went beside --out, never over it or its meta, and were removed
    assert "interim" not in meta and sorted(p.name for p in tmp_path.iterdir()) == ["micro.meta.json",
                                                                                 "micro.safetensors"]


def test_interim_checkpoints_never_share_a_file_with_the_output():
    """--out defaults to the shipped micro-CLIP: a run stopped after its first interim save used to replace it."""
    out = ROOT / "ctta/assets/micro-clip.safetensors"
    interim = P.interim_path(out)
    assert interim.name == "micro-clip-interim.safetensors" and interim.parent == out.parent
    meta = lambda p: p.with_suffix("").with_suffix(".meta.json")  # noqa: E731 (the rule `save` names meta files by)
    assert meta(interim).name == "micro-clip-interim.meta.json" != meta(out).name
    r = subprocess.run([sys.executable, str(ROOT / "scripts/pretrain_micro.py"), "--steps", "-1"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--steps must be >= 0" in r.stderr


# ---- the representation report (scripts/representation.py)
import representation as R  # noqa: E402


def _factors(colour, shape, style):
    g = torch.Generator().manual_seed(0)
    f = W.sample_factors(len(colour), g)
    f.colour, f.shape, f.style = torch.tensor(colour), torch.tensor(shape), torch.tensor(style)
    return f


def test_nn_rates_and_pair_cosines_hand_computed():
    # images 0, 1: class (0, 0) in two styles; image 2: (0, 1) in style 0; image 3: (1, 0)
    f = _factors([0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0])
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.8, 0.0, 0.6],
                                                    [0.0, 0.0, 1.0]]), dim=1)
    # cosines: (0,1) .6  (0,2) .8  (0,3) 0  (1,2) .48  (1,3) 0  (2,3) .6
    # nearest: 0 -> 2, 1 -> 0, 2 -> 0, 3 -> 2 ; same class only for 1 -> 0
    r = R.nn_rates(x, f)
    assert r["nn_same_class"] == 25.0 and r["nn_same_colour"] == 75.0 and r["nn_same_shape"] == 25.0
    c = R.pair_cosines(x, f)
    assert c["cos_same_class"] == pytest.approx(0.6)                  # the pair (0, 1)
    assert c["cos_same_colour_other_shape"] == pytest.approx((0.8 + 0.48) / 2)  # (0, 2), (1, 2)
    assert c["cos_same_class_other_style"] == pytest.approx(0.6)
    assert c["cos_same_colour_style_other_shape"] == pytest.approx(0.8)  # (0, 2) only: 1 has style 1


def test_class_balanced_factors_and_crop_coverage():
    f = R.class_balanced_factors(2)
    assert len(f) == 200 and torch.equal(torch.bincount(f.combo_index(), minlength=100), torch.full((100,), 2))
    assert set(f.style.tolist()) <= {0, 1}
    mask = R.object_mask(f)
    assert mask.shape == (200, 32, 32) and mask.min() >= 0 and mask.max() <= 1
    # a filled circle's mask mass is its area: pi (r·16 px)^2 with r = size radius x scale
    i = next(k for k in range(200) if f.shape[k] == 0 and f.style[k] == 0)
    r = (0.45, 0.60, 0.78)[int(f.size[i])] * float(f.scale[i]) * 0.9 * 16
    assert float(mask[i].sum()) == pytest.approx(math.pi * r * r, rel=0.05)
    full = R.crop_coverage(f, views_per_image=2, scale=(1.0, 1.0))  # whole-image crops hold all of every object
    assert full["crop_holds_object"] == 100.0 and full["crop_object_share"] == pytest.approx(100.0, abs=0.01)
    tpt = R.crop_coverage(f, views_per_image=8)
    assert 0 < tpt["crop_holds_object"] < 100 and 0 < tpt["crop_object_share"] < 100
