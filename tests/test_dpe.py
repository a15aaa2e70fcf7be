"""DPE: visual prototypes from the cache, the InfoNCE alignment, one residual step (fresh AdamW, eps 1e-3) against
the loss written out, the prediction with the residuals, the textual prototype evolution (running mean, not
re-normalised, gated at 0.1), pure predict, state round-trip."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ctta import LabelSpace
from ctta.losses import info_nce
from ctta.strategies import DPE
from ctta.strategies._cache import ClassCache
from ctta.strategies.dpe import class_prototypes
from tests._tta_stub import StubClip, images_for, label_space_check, no_change, round_trip_check, wrap_check

SPACE3 = LabelSpace(["a", "b", "c"])
SPACE6 = LabelSpace([f"class {i}" for i in range(6)])
HEAD = torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.4, 1.0]])


def _dpe(**kw) -> DPE:
    s = DPE(n_views=0, **kw)
    s.setup(StubClip(HEAD))
    return s


def test_class_prototypes_are_cache_means():
    c = ClassCache(3, 3, 2)
    c.insert(2, torch.tensor([1.0, 0.0]), 0.1)
    c.insert(2, torch.tensor([0.0, 1.0]), 0.2)
    c.insert(0, torch.tensor([2.0, 2.0]), 0.3)
    protos, present = class_prototypes(c)
    assert present.tolist() == [0, 2] and protos.tolist() == [[2.0, 2.0], [0.5, 0.5]]  # not normalised


def test_info_nce_by_hand():
    q, k = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # normalised rows; logits q·kᵀ / 0.5 = [[2, 1.2], [0, 1.6]]; cross-entropy against the diagonal, mean
    expected = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))
                - math.log(math.exp(1.6) / (1 + math.exp(1.6)))) / 2
    assert float(info_nce(q, k, 0.5)) == pytest.approx(expected, abs=1e-6)
    assert float(info_nce(q[:1], k[:1], 0.01)) == 0.0  # one cached class: no alignment signal
    with pytest.raises(ValueError):
        info_nce(q, k[:1])


def test_one_residual_step_matches_the_loss_written_out():
    s = _dpe(logit_scale=10.0, alpha=6.0, beta=5.0, lr_text=6e-4, lr_image=3e-4, align=0.5)
    text = HEAD.clone()
    cache = ClassCache(3, 3, 3)
    other = F.normalize(torch.tensor([0.2, 1.0, 0.1]), dim=0)
    cache.insert(1, other, 0.05)  # a second cached class, so that the alignment term is not zero
    f = F.normalize(torch.tensor([1.0, 0.5, 0.2]), dim=0)
    r_t, r_v, protos, present = s.residual_step(f[None], text, cache)
    # the loss written out, with the same zero residuals
    rt = torch.zeros(3, 3, requires_grad=True)
    rv = torch.zeros(2, 3, requires_grad=True)
    t = F.normalize(text + rt, dim=-1)
    z = 10 * t @ f
    assert int(z.argmax()) == 0  # pseudo-label 0: class 0 joins the cache, classes [0, 1] present
    v = F.normalize(torch.stack([f, other]) + rv, dim=-1)
    final = torch.cat([z[:2] + 6.0 * torch.exp(-5.0 * (1 - v @ f)), z[2:]])  # onto the cached classes 0 and 1
    p = final.softmax(-1)
    loss = -(p * p.log()).sum()
    sims = F.normalize(v, dim=-1) @ t[:2].t() / 0.01
    loss = loss + 0.5 * (-(sims.diag() - sims.logsumexp(-1))).mean()
    g_t, g_v = torch.autograd.grad(loss, [rt, rv])
    # a fresh AdamW's first step on a zero parameter: −lr·g/(|g| + 1e-3) (weight decay times zero vanishes)
    assert torch.allclose(r_t, -6e-4 * g_t / (g_t.abs() + 1e-3), atol=1e-8)
    assert torch.allclose(r_v, -3e-4 * g_v / (g_v.abs() + 1e-3), atol=1e-8)  # row 0: g ≈ 0 at v = f
    assert r_t.abs().max() > 1e-4 and r_v.abs().max() > 1e-5  # the step did something
    assert present.tolist() == [0, 1] and torch.allclose(protos, torch.stack([f, other]))
    assert cache.count.tolist() == [1, 1, 0] and s.optimizer is None  # no optimizer state survives the sample
    h = -(z.softmax(-1) * z.log_softmax(-1)).sum().detach()
    assert float(cache.entropy[0, 0]) == pytest.approx(float(h) / math.log2(3), abs=1e-6)  # log2-normalised


def test_prediction_uses_the_stepped_residuals():
    s = _dpe(logit_scale=10.0)
    f = F.normalize(torch.tensor([1.0, 0.5, 0.2]), dim=0)
    cache = ClassCache(3, 3, 3)
    text = HEAD.clone()
    r_t, r_v, protos, present = s.residual_step(f[None], text, ClassCache.from_state(cache.state_dict()))
    s2 = _dpe(logit_scale=10.0)
    out, _ = s2._sample(f[None], text, cache)
    t_star = F.normalize(text + r_t, dim=-1)
    v = F.normalize(protos + r_v, dim=-1)
    expected = 10 * t_star @ f
    expected[present] += 6.0 * torch.exp(-5.0 * (1 - v @ f))
    assert torch.allclose(out, expected, atol=1e-5)


def test_textual_prototype_evolution_running_mean():
    s = _dpe()
    cache = ClassCache(3, 3, 3)
    cache.insert(0, torch.tensor([1.0, 0.0, 0.0]), 0.0)
    r = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    s.residual_step = lambda feats, text, c: (r, torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]]),
                                              torch.tensor([0]))
    t0 = HEAD.clone()
    f = torch.tensor([[1.0, 0.0, 0.0]])  # 100·cos margins and the cache term make the prediction confident
    _, t1 = s._sample(f, t0, cache)
    star1 = F.normalize(t0 + r, dim=-1)
    assert s.n_avg == 1 and torch.allclose(t1, t0 / 2 + star1 / 2)  # the initial head counts as one member
    assert not torch.allclose(t1.norm(dim=-1), torch.ones(3))  # not re-normalised
    _, t2 = s._sample(f, t1, cache)
    assert s.n_avg == 2 and torch.allclose(t2, t1 * 2 / 3 + F.normalize(t1 + r, dim=-1) / 3)
    unsure = _dpe(text_threshold=0.0)  # a gate no prediction passes (H >= 0): no evolution
    unsure.residual_step = s.residual_step
    _, t = unsure._sample(f, t0, cache)
    assert unsure.n_avg == 0 and torch.equal(t, t0)


def test_adapt_end_to_end_and_pure_predict():
    s = _dpe()
    out = s.adapt(images_for([[1.0, 0.2, 0.0], [0.1, 1.0, 0.2]]), SPACE3)
    assert out.shape == (2, 3) and out.argmax(-1).tolist() == [0, 1]
    assert s.cache.count.tolist() == [1, 1, 0] and s.n_avg == 2 and s.steps == 2
    with no_change(s):
        p = s.predict(images_for([[1.0, 0.2, 0.0]]), SPACE3)
    protos, present = class_prototypes(s.cache)
    f = F.normalize(torch.tensor([1.0, 0.2, 0.0]), dim=0)
    expected = 100 * F.normalize(s.text, dim=-1) @ f
    expected[present] += 6.0 * torch.exp(-5.0 * (1 - F.normalize(protos, dim=-1) @ f))
    assert torch.allclose(p[0], expected, atol=1e-4)


def test_state_round_trip_mid_stream(tiny_clip):
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    round_trip_check(lambda: DPE(n_views=7), tiny_clip, SPACE6, x[:3], x[3:])
    round_trip_check(lambda: DPE(n_views=7, final_query="confident", text_threshold=1.0), tiny_clip, SPACE6, x[:3],
                     x[3:])


def test_label_space_and_arguments():
    label_space_check(_dpe)
    for kw in ({"final_query": "mean"}, {"shot_capacity": 0}, {"lr_text": -1.0}, {"entropy_norm": "x"}):
        with pytest.raises(ValueError):
            DPE(**kw)


def test_through_wrap_with_every_reset_policy():
    wrap_check(lambda: DPE(n_views=5), SPACE6)


def test_non_finite_features_leave_the_prototypes_untouched():
    s = _dpe()
    model = s.model
    s.adapt(images_for([[1.0, 0.2, 0.0]]), SPACE3)
    before = (s.text.clone(), s.n_avg, s.cache.count.clone(), s.steps)
    encode = model.encode_image
    model.encode_image = lambda x: encode(x) * float("nan")
    s.adapt(images_for([[1.0, 0.2, 0.0]]), SPACE3)
    assert torch.equal(s.text, before[0]) and s.n_avg == before[1] and torch.equal(s.cache.count, before[2])
    assert s.steps == before[3] and s.skipped_steps == 1
