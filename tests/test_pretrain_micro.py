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
    out_images, texts, positives = P.caption_batch(images, f, g, 0.0, None)
    g.set_state(state)
    ref_texts, ref_mentions = W.describe(f, g)
    assert texts == ref_texts and out_images is images
    assert torch.equal(positives, W.matches(ref_mentions, f).T)
    assert positives.diagonal().all()  # every caption is true of its own image


def test_solo_captions_name_exactly_one_factor():
    f, images, g = _batch(1, n=400)
    _, texts, positives = P.caption_batch(images, f, g, 0.0, None, solo_frac=1.0)
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
    out, texts, positives = P.caption_batch(images, f, g, 1.0, None)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert not any(f" {c} " in f" {t} " for t in texts for c in W.COLOURS)
    assert positives.diagonal().all()


@pytest.mark.filterwarnings("ignore")
def test_two_bf16_steps_write_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "micro.safetensors"
    subprocess.run([sys.executable, str(ROOT / "scripts/pretrain_micro.py"), "--steps", "2", "--batch", "16",
                    "--precision", "bf16", "--solo-frac", "0.3", "--threads", "1", "--eval-n", "10",
                    "--eval-every", "1000", "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    meta = json.loads(out.with_suffix("").with_suffix(".meta.json").read_text())
    assert meta["steps"] == 2 and meta["precision"] == "bf16" and meta["solo_frac"] == 0.3
    assert set(meta["zeroshot"]) and all(math.isfinite(v) for v in meta["zeroshot"].values())
    from ctta import Clip
    model = Clip.from_pretrained("micro-clip", str(out))
    assert model.provenance()["checkpoint_sha256"]
