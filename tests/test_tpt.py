"""TPT: losses on hand-computed values, prompt learner exactness, views, episodic/online/reset schedules."""
from __future__ import annotations

import math

import pytest
import torch

from ctta import LabelSpace
from ctta.adapters.prompts import PromptLearner
from ctta.losses import atfd, entropy, marginal_entropy, select_confident
from ctta.online import wrap
from ctta.strategies.tpt import TPT
from ctta.views import crop_params, eval_view, random_resized_crops, tpt_views

SPACE = LabelSpace([f"class {i}" for i in range(6)])


def _h(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def _images(n: int = 2, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tpt(model, **kw) -> TPT:
    s = TPT(**kw)
    s.setup(model)
    return s


# ----------------------------------------------------------------------------------------- losses
ROWS = [[1 / 3, 1 / 3, 1 / 3], [0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]


def test_selection_and_marginal_entropy_by_hand():
    logits = torch.tensor(ROWS).log() + torch.tensor([[0.3], [-1.0], [2.0], [0.0]])  # shifts leave softmax as is
    assert torch.allclose(entropy(logits), torch.tensor([_h(r) for r in ROWS]), atol=1e-6)
    # entropies: 1.0986, 0.6390, 0.8018, 1.0397 -> the two most confident rows are 1 then 2
    sel = select_confident(logits, 0.5)
    assert sel.tolist() == [1, 2]
    expected = _h([0.45, 0.15, 0.40])  # entropy of the mean of rows 1 and 2, by hand: 1.010413
    assert abs(expected - 1.010413) < 1e-6
    got = marginal_entropy(logits[sel])
    assert abs(float(got) - expected) < 1e-5
    assert abs(float(got) - (_h(ROWS[1]) + _h(ROWS[2])) / 2) > 0.2  # not the mean of per-view entropies


def test_selection_keeps_ten_percent_of_64_and_original_competes():
    logits = torch.zeros(64, 5)
    logits[0, 0] = 20.0  # the original view is the most confident
    logits[10:20, 1] = torch.linspace(5.0, 14.0, 10)
    sel = select_confident(logits, 0.1)
    assert sel.tolist() == [0, 19, 18, 17, 16, 15]  # int(64 * 0.1) = 6, lowest entropy first


def test_marginal_entropy_of_a_zero_probability_class_is_finite():
    logits = torch.tensor([[0.0, 0.0, -float("inf")], [1.0, 0.0, -float("inf")]])
    out = marginal_entropy(logits)
    assert torch.isfinite(out)
    p = [(0.5 + math.e / (1 + math.e)) / 2, (0.5 + 1 / (1 + math.e)) / 2]
    assert abs(float(out) - _h(p)) < 1e-5


def test_atfd_by_hand():
    assert abs(float(atfd(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))) - math.sqrt(0.5)) < 1e-6
    assert float(atfd(torch.tensor([[1.0, 1.0], [2.0, 2.0]]))) < 1e-6  # same direction: no dispersion


# ----------------------------------------------------------------------------------------- prompt learner
def test_prompt_learner_init_is_the_phrase_and_trim_is_exact(tiny_clip):
    p = PromptLearner(tiny_clip, "a photo of a")
    assert p.n_ctx == 4 and p.ctx.shape == (4, 32)
    with torch.no_grad():
        texts = tiny_clip.encode_text([f"a photo of a class {i}." for i in range(6)], trim=False)
        assert torch.allclose(p(SPACE), texts, atol=1e-5)
        p.ctx.add_(0.3 * torch.randn_like(p.ctx))  # a tuned (non-word) context
        full, trimmed = p(SPACE, trim=False), p(SPACE)
    assert p._frozen(SPACE.classnames, True)[1].shape[1] + 1 + 4 < 16  # really shorter than the context
    assert torch.allclose(full, trimmed, atol=1e-5)
    assert not torch.allclose(full, texts, atol=1e-3)


def test_chunked_checkpointed_gradient_equals_plain(tiny_clip):
    a = PromptLearner(tiny_clip, "a photo of a", chunk_size=None)
    b = PromptLearner(tiny_clip, "a photo of a", chunk_size=2)  # 3 checkpointed chunks
    head = torch.randn(6, 32)
    grads = []
    for p in (a, b):
        (p(SPACE) * head).sum().backward()
        grads.append(p.ctx.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)  # summation order only


def test_class_specific_context_and_errors(tiny_clip):
    p = PromptLearner(tiny_clip, "a photo of a", class_specific=True, n_classes=6)
    assert p.ctx.shape == (6, 4, 32)
    with torch.no_grad():
        p.ctx[2].add_(torch.randn(4, 32))  # only class 2's prompt changes (a constant shift would not: LayerNorm)
        base = PromptLearner(tiny_clip, "a photo of a")(SPACE)
        out = p(SPACE)
    changed = (out - base).abs().amax(1) > 1e-4
    assert changed.tolist() == [False, False, True, False, False, False]
    with pytest.raises(ValueError, match="class-specific"):
        p(LabelSpace(["x", "y"]))
    with pytest.raises(ValueError, match="exceed the text context"):
        PromptLearner(tiny_clip, "a photo of a")(LabelSpace(["very " * 20 + "long"]))


# ----------------------------------------------------------------------------------------- views
def test_views_shape_range_seed():
    x = _images(3)
    v = tpt_views(x, 16, 63, generator=torch.Generator().manual_seed(1))
    assert v.shape == (3, 64, 3, 16, 16) and v.min() >= 0 and v.max() <= 1
    assert torch.equal(v[:, 0], x)  # view 0 is the image itself at model resolution
    assert torch.equal(v, tpt_views(x, 16, 63, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(v, tpt_views(x, 16, 63, generator=torch.Generator().manual_seed(2)))
    big = _images(2, size=40)
    vb = tpt_views(big, 16, 5, augmix_views=True, generator=torch.Generator().manual_seed(1))
    assert vb.shape == (2, 6, 3, 16, 16) and vb.min() >= 0 and vb.max() <= 1
    assert torch.allclose(vb[:, 0], eval_view(big, 16))
    assert torch.equal(vb, tpt_views(big, 16, 5, augmix_views=True, generator=torch.Generator().manual_seed(1)))


def test_augmix_ops_by_hand():
    """TPT's AugMix ops at severity 1 (azshue/TPT data/augmix_ops.py), on levels and signs chosen here."""
    import math

    from ctta.views import _affine_inverse_maps, _apply_ops
    m = _affine_inverse_maps(["translate_x", "shear_y", "rotate"], [0.95, 0.5, 0.7], [-1.0, -1.0, 1.0], 32,
                             torch.device("cpu"))
    assert m[0].tolist() == [[1, 0, -1], [0, 1, 0], [0, 0, 1]]  # int(0.95 · 32 / 30) = 1 pixel, sign −
    assert m[1, 1, 0].item() == pytest.approx(-0.015) and m[1, 0, 1] == 0  # 0.5 · 0.3 / 10, sign −
    t, c = math.radians(2), 15.5  # int(0.7 · 3) = 2 degrees about the centre
    torch.testing.assert_close(m[2], torch.tensor([[math.cos(t), -math.sin(t), c - math.cos(t) * c + math.sin(t) * c],
                                                   [math.sin(t), math.cos(t), c - math.sin(t) * c - math.cos(t) * c],
                                                   [0, 0, 1]]))
    x = torch.full((3, 3, 32, 32), 0.5)
    x[:, :, 3, 3] = 0.99
    out = _apply_ops(x, ["translate_x", "solarize", None], [0.95, 0.5, 0.0], [-1.0, 1.0, 1.0])
    # PIL's inverse map: output x reads input x − 1, so the bright pixel moves one to the right
    assert out[0, :, 3, 4].tolist() == pytest.approx([0.99] * 3, abs=1e-5)
    assert out[0, :, 3, 3].tolist() == pytest.approx([0.5] * 3, abs=1e-5)
    # solarize at level 0.5: threshold (256 − int(12.8)) / 255 = 244 / 255; 0.99 inverts, 0.5 stays
    assert out[1, :, 3, 3].tolist() == pytest.approx([0.01] * 3) and out[1, :, 0, 0].tolist() == [0.5] * 3
    assert torch.equal(out[2], x[2])  # no op: unchanged


def test_augmix_warp_is_kornias_warp_affine_of_the_inverse_maps():
    """`_warp` samples the output→input maps directly; kornia's warp_affine takes the input→output map."""
    import kornia

    from ctta.views import _GEOMETRIC, _affine_inverse_maps, _warp
    ops = sorted(_GEOMETRIC) * 4
    levels = torch.linspace(0.5, 1.0, len(ops)).tolist()  # at 64 px every op moves pixels from level 0.47 on
    signs = [(-1.0) ** k for k in range(len(ops))]
    inv = _affine_inverse_maps(ops, levels, signs, 64, torch.device("cpu"))
    x = torch.rand(len(ops), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = kornia.geometry.transform.warp_affine(x, torch.linalg.inv(inv)[:, :2], (64, 64), mode="bilinear",
                                                padding_mode="zeros")
    torch.testing.assert_close(_warp(x, inv), ref, atol=2e-5, rtol=0)
    assert (_warp(x, inv) - x).abs().amax(dim=(1, 2, 3)).min() > 0.01  # every map moves the image


def test_crop_geometry(monkeypatch):
    p = crop_params(2000, 30, 40, torch.Generator().manual_seed(0))
    top, left, h, w = p.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 30).all() and (left + w <= 40).all()
    area = h * w / (30 * 40)
    assert area.min() > 0.06 and area.max() <= 1.0 and area.mean() > 0.35  # U(0.08, 1) area, rounded
    # a full-image box is the identity, and a flipped one the mirror image; a quarter box the top-left quarter
    import ctta.views as V
    x = _images(1)
    monkeypatch.setattr(V, "crop_params", lambda n, *a, **k: torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(n, 1))
    out = random_resized_crops(x, 16, 16, torch.Generator().manual_seed(0))[0]
    same = [(o - x[0]).abs().max() < 1e-5 for o in out]
    mirrored = [(o - x[0].flip(-1)).abs().max() < 1e-5 for o in out]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    monkeypatch.setattr(V, "crop_params", lambda n, *a, **k: torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(n, 1))
    q = random_resized_crops(x, 1, 8, flip=False)[0, 0]
    assert torch.allclose(q, x[0, :, :8, :8], atol=1e-5)


# ----------------------------------------------------------------------------------------- the strategy
def test_one_step_matches_a_hand_written_tpt_step(tiny_clip):
    s = _tpt(tiny_clip)
    assert s.optimizer.defaults["lr"] == 5e-3 and s.optimizer.defaults["weight_decay"] == 0.01
    x = _images(1)
    g = torch.Generator().set_state(s.generator.get_state())
    out = s.adapt(x, SPACE)
    # the same step written out: 64 views, 6 most confident, entropy of their mean probability, AdamW
    views = tpt_views(x, 16, 63, generator=g)[0]
    with torch.no_grad():
        f = tiny_clip.encode_image(views)
    p = PromptLearner(tiny_clip, "a photo of a")
    opt = torch.optim.AdamW([p.ctx], lr=5e-3)
    logits = tiny_clip.logit_scale * f @ p(SPACE).t()
    probs = logits.softmax(-1)
    ent = -(probs * probs.log()).sum(-1)
    sel = ent.argsort()[:6]
    pbar = probs[sel].mean(0)
    (-(pbar * pbar.log()).sum()).backward()
    opt.step()
    assert torch.allclose(s.prompts.ctx, p.ctx, atol=1e-6)
    assert not torch.allclose(p.ctx, PromptLearner(tiny_clip, "a photo of a").ctx)
    with torch.no_grad():
        expected = tiny_clip.logit_scale * f[:1] @ p(SPACE).t()
    assert torch.allclose(out, expected, atol=1e-4)  # prediction on view 0 with the tuned prompt


def test_episodic_isolation(tiny_clip):
    ad = wrap(tiny_clip, TPT(ctx_init="a photo of a", n_views=15), SPACE)  # TPT's default policy: episodic
    s = ad.strategy
    x, y = _images(2, seed=1), _images(1, seed=2)
    p0 = s.predict(x, SPACE)
    before = s.state_dict()
    assert torch.equal(s.predict(x, SPACE), p0) and torch.equal(s.state_dict()["ctx"], before["ctx"])  # pure
    out = ad(y, position=0).logits
    assert torch.equal(s.predict(x, SPACE), p0)  # episodic: back to the initial prompt after each sample
    ad(x, position=1)
    assert torch.allclose(ad(y, position=0).logits, out, atol=1e-6)  # same views for y after other samples
    assert not torch.allclose(out, s.predict(y, SPACE), atol=1e-4)  # ...and the tuning did something


def test_online_mode_carries_state_and_reset_restores(tiny_clip):
    ad = wrap(tiny_clip, TPT(ctx_init="a photo of a", n_views=15), SPACE, reset="never")
    s = ad.strategy
    x, y = _images(2, seed=1), _images(1, seed=2)
    p0 = s.predict(x, SPACE)
    out = ad(y, position=0).logits
    ad(x, position=1)
    assert not torch.allclose(s.predict(x, SPACE), p0, atol=1e-4)
    assert len(s.optimizer.state) == 1 and ad.samples == 3
    ad.reset()
    first = s.predict(x, SPACE)
    assert torch.equal(first, p0) and len(s.optimizer.state) == 0
    assert torch.allclose(ad(y, position=0).logits, out, atol=1e-6)  # restored context AND AdamW state
    ad.reset()
    ad.reset()  # the anchor was not aliased: resets stay identical
    assert torch.equal(s.predict(x, SPACE), first)


def test_reset_every_k(tiny_clip):
    ad = wrap(tiny_clip, TPT(n_views=7), SPACE, reset=2)
    anchor = ad.strategy.prompts.ctx.detach().clone()
    first = ad(_images(3))  # 3 samples adapted on in one call, online within it
    assert not first.reset and not torch.equal(ad.strategy.prompts.ctx, anchor)
    second = ad(_images(1, seed=5))  # 3 >= 2 samples since the last reset: starts from the anchor
    assert second.reset and ad.resets == 1 and len(ad.strategy.optimizer.state) == 1


def test_non_finite_loss_leaves_prompt_unchanged(tiny_clip, monkeypatch):
    s = _tpt(tiny_clip, n_views=7)
    anchor = s.prompts.ctx.detach().clone()
    monkeypatch.setattr(s, "loss", lambda logits, text, sel: marginal_entropy(logits[sel]) * float("nan"))
    out = s.adapt(_images(2), SPACE)
    assert torch.isfinite(out).all() and s.skipped_steps == 2 and s.steps == 0
    assert torch.equal(s.prompts.ctx, anchor) and len(s.optimizer.state) == 0


def test_multi_step_reuses_selection_and_ctpt_term(tiny_clip, monkeypatch):
    import ctta.strategies.tpt as mod
    picks = []
    monkeypatch.setattr(mod, "select_confident", lambda z, p: picks.append(1) or select_confident(z, p))
    s = _tpt(tiny_clip, tta_steps=3, n_views=15)
    s.adapt(_images(2), SPACE)
    assert len(picks) == 2 and s.steps == 6
    c = _tpt(tiny_clip, ctpt_lambda=50.0)
    z, t = torch.randn(10, 6), torch.randn(6, 32)
    sel = torch.tensor([0, 3])
    assert torch.allclose(c.loss(z, t, sel), marginal_entropy(z[sel]) - 50.0 * atfd(t))
    assert torch.allclose(_tpt(tiny_clip).loss(z, t, sel), marginal_entropy(z[sel]))


def test_bad_arguments(tiny_clip):
    for kw in ({"tta_steps": 0}, {"selection_p": 0.0}, {"n_views": -1}):
        with pytest.raises(ValueError):
            TPT(**kw)
    with pytest.raises(RuntimeError, match="setup"):
        TPT().predict(_images(1), SPACE)
