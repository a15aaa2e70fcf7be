"""TDA: cache admission, the negative cache's entropy band, the combination of logits, update-before-predict,
pure predict, state round-trip, label-space checks — on hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from ctta import LabelSpace
from ctta.strategies import TDA
from ctta.strategies._cache import ClassCache, affinity_logits, confident_query, normalized_entropy
from ctta.strategies._dual_cache import DualCache
from tests._tta_stub import StubClip, images_for, label_space_check, no_change, round_trip_check, wrap_check

SPACE3 = LabelSpace(["a", "b", "c"])
SPACE6 = LabelSpace([f"class {i}" for i in range(6)])


def _h(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def _stub_tda(**kw) -> tuple[TDA, StubClip]:
    model = StubClip(torch.eye(3))
    s = TDA(n_views=0, **kw)
    s.setup(model)
    return s, model


# ----------------------------------------------------------------------------------------- the shared cache
def test_positive_admission_capacity_replace_worst_sorted():
    c = ClassCache(3, 3, 2)
    key = lambda v: torch.tensor([v, 0.0])  # noqa: E731  (key's first coordinate names the item)
    for h, v in ((0.5, 1.0), (0.3, 2.0), (0.9, 3.0)):
        assert c.insert(1, key(v), h)  # room: appended
    assert c.count.tolist() == [0, 3, 0]
    assert c.entropy[1].tolist() == pytest.approx([0.3, 0.5, 0.9]) and c.keys[1, :, 0].tolist() == [2.0, 1.0, 3.0]
    assert c.insert(1, key(4.0), 0.7)  # full: replaces the worst (0.9)
    assert c.entropy[1].tolist() == pytest.approx([0.3, 0.5, 0.7]) and c.keys[1, :, 0].tolist() == [2.0, 1.0, 4.0]
    assert not c.insert(1, key(5.0), 0.7)  # equal to the worst: not strictly lower, rejected
    assert not c.insert(1, key(6.0), 0.8)
    assert c.insert(1, key(7.0), 0.1)  # best so far: worst dropped, goes first
    assert c.keys[1, :, 0].tolist() == [7.0, 2.0, 1.0] and c.count.tolist() == [0, 3, 0]
    assert c.insert(0, key(8.0), 2.0)  # other classes are independent
    keys, classes, ent, probs = c.items()
    assert classes.tolist() == [0, 1, 1, 1] and keys[:, 0].tolist() == [8.0, 7.0, 2.0, 1.0]
    assert probs.shape == (4, 0)


def test_items_follow_every_change_of_the_cache():
    c = ClassCache(2, 1, 1)
    c.insert(0, torch.tensor([1.0]), 0.5)
    first = c.items()
    assert c.items() is first  # unchanged cache: the same gather, not recomputed
    assert not c.insert(0, torch.tensor([2.0]), 0.9)  # rejected: nothing changed
    assert c.items() is first
    assert c.insert(0, torch.tensor([3.0]), 0.1)  # admitted: replaces the item
    assert c.items()[0][:, 0].tolist() == [3.0]
    c.keys[0, 0, 0] = 4.0  # a write from outside
    assert c.items()[0][:, 0].tolist() == [4.0]
    c.count = torch.tensor([0, 0])  # a replaced tensor
    assert len(c.items()[0]) == 0


def test_fifo_policy_drops_the_oldest():
    c = ClassCache(2, 2, 1, policy="fifo", with_probs=True)
    for v in (1.0, 2.0, 3.0):
        c.insert(0, torch.tensor([v]), 0.9 - v / 10, torch.tensor([v, 0.0]))
    assert c.keys[0, :, 0].tolist() == [2.0, 3.0] and c.probs[0, :, 0].tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="probability"):
        c.insert(0, torch.tensor([1.0]), 0.1)


def test_normalized_entropy_log2_quirk_and_switch():
    assert normalized_entropy(1.0, 8) == pytest.approx(1 / 3)  # nats / log2(8)
    assert normalized_entropy(1.0, 8, "ln") == pytest.approx(1 / math.log(8))
    with pytest.raises(ValueError, match="log2"):
        normalized_entropy(1.0, 8, "log10")


def test_confident_query_mean_of_ten_percent_not_renormalised():
    feats = torch.zeros(20, 2)
    feats[:, 1] = 1.0
    feats[5], feats[12] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    logits = torch.zeros(20, 3)
    logits[5] = torch.tensor([4.0, 0.0, 0.0])
    logits[12] = torch.tensor([0.0, 3.0, 0.0])
    f, z, h, p, pred = confident_query(feats, logits)  # int(20 * 0.1) = 2 views: 5 and 12
    assert f.tolist() == [0.5, 0.5]  # the mean, norm 0.707: not re-normalised
    assert z.tolist() == [2.0, 1.5, 0.0] and pred == 0
    e4, e3 = math.exp(4), math.exp(3)
    pbar = [(e4 / (e4 + 2) + 1 / (e3 + 2)) / 2, (1 / (e4 + 2) + e3 / (e3 + 2)) / 2, (1 / (e4 + 2) + 1 / (e3 + 2)) / 2]
    assert p.tolist() == pytest.approx(pbar, abs=1e-6)
    assert float(h) == pytest.approx(_h(pbar), abs=1e-5)  # entropy of the mean probability
    one = confident_query(feats[5:6], logits[5:6])
    assert one[0].tolist() == [1.0, 0.0] and one[4] == 0
    assert float(one[2]) == pytest.approx(_h([e4 / (e4 + 2), 1 / (e4 + 2), 1 / (e4 + 2)]), abs=1e-6)


# ----------------------------------------------------------------------------------------- the method
def test_negative_cache_entropy_band():
    s, _ = _stub_tda()
    cache = DualCache(3, 3, s.cfg)
    f, p = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.6, 0.3, 0.1])
    # band (0.2, 0.5) on H / log2(3): H in (0.31699, 0.79248) nats, strict
    for h, admitted in ((0.316, False), (0.318, True), (0.79, True), (0.793, False)):
        before = len(cache.neg)
        cache.update(f, torch.tensor(h), p, 2)
        assert (len(cache.neg) == before + 1) == admitted, h
    assert len(cache.pos) == 3  # the positive cache is always offered (capacity 3 of class 2)
    assert cache.neg.probs[2, 0].tolist() == pytest.approx([0.6, 0.3, 0.1])
    assert cache.neg.entropy[2].tolist() == pytest.approx([0.318, 0.79])  # stored in nats, sorted
    ln, _ = _stub_tda(entropy_norm="ln")  # H / ln(3): band (0.2197, 0.5493) nats
    cache = DualCache(3, 3, ln.cfg)
    cache.update(f, torch.tensor(0.30), p, 0)
    assert len(cache.neg) == 1  # 0.30 nats is outside the official log2 band, inside the ln one


def test_combination_of_logits_by_hand():
    s, _ = _stub_tda()
    cache = DualCache(3, 2, s.cfg)
    pos, neg = cache.pos, cache.neg
    pos.insert(0, torch.tensor([1.0, 0.0]), 0.1)   # affinity 1 with the query
    pos.insert(1, torch.tensor([0.6, 0.8]), 0.1)   # affinity 0.6
    neg.insert(2, torch.tensor([0.0, 1.0]), 0.5, torch.tensor([0.5, 0.48, 0.02]))  # affinity 0, mask [1, 1, 0]
    out = cache.read(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0, 3.0]))
    # z + 2·exp(−5(1 − A))·onehot − 0.117·exp(−1(1 − 0))·1[0.03 < p < 1]
    assert out.tolist() == pytest.approx([1 + 2 - 0.117 * math.exp(-1), 2 + 2 * math.exp(-2) - 0.117 * math.exp(-1),
                                          3.0], abs=1e-6)
    assert out.tolist() == pytest.approx([2.956958, 2.227629, 3.0], abs=1e-5)
    off, _ = _stub_tda(neg_enabled=False)
    cache.cfg = off.cfg
    assert cache.read(torch.tensor([1.0, 0.0]), torch.zeros(3)).tolist() == pytest.approx(
        [2.0, 2 * math.exp(-2), 0.0], abs=1e-6)
    assert affinity_logits(torch.ones(2), torch.zeros(0, 2), None, torch.zeros(0, dtype=torch.long), 2, 5, 3).tolist() \
        == [0.0, 0.0, 0.0]


def test_update_before_predict_end_to_end():
    s, model = _stub_tda()
    a, b = [1.0, 0.2, 0.0], [1.0, 0.99, 0.0]
    out = s.adapt(images_for([a, b]), SPACE3)
    fa, fb = torch.nn.functional.normalize(torch.tensor([a, b]), dim=-1)
    za, zb = 100 * fa, 100 * fb  # head = identity
    # sample a: confident (H ≈ 0), pseudo-label 0; the positive cache holds it before the prediction: + 2·exp(0)
    assert out[0].tolist() == pytest.approx((za + torch.tensor([2.0, 0, 0])).tolist(), abs=1e-4)
    # sample b: pseudo-label 0, H/log2(3) ≈ 0.40 in the band: both caches hold b (and a) when it is predicted
    pb = zb.softmax(-1)
    assert 0.2 < _h(pb.tolist()) / math.log2(3) < 0.5
    ab = float(fa @ fb)
    expected = zb.clone()
    expected[0] += 2 * (math.exp(-5 * (1 - ab)) + 1.0)
    expected -= 0.117 * 1.0 * ((pb > 0.03) & (pb < 1)).float()  # affinity of b with itself = 1
    assert out[1].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert s.cache.pos.count.tolist() == [2, 0, 0] and s.cache.neg.count.tolist() == [1, 0, 0]
    assert model.text_calls == 1  # one text head per call, never per sample


def test_predict_is_pure_and_reads_the_cache(tiny_clip):
    s = TDA(n_views=7)
    s.setup(tiny_clip)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    s.adapt(x[:2], SPACE6)
    with no_change(s):
        p1 = s.predict(x, SPACE6)
        p2 = s.predict(x, SPACE6)
    assert torch.equal(p1, p2)
    fresh = TDA(n_views=7)
    fresh.setup(tiny_clip)
    assert not torch.allclose(fresh.predict(x, SPACE6), p1)  # the cache changes the prediction


def test_state_round_trip_mid_stream(tiny_clip):
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    round_trip_check(lambda: TDA(n_views=5), tiny_clip, SPACE6, x[:3], x[3:])
    round_trip_check(lambda: TDA(n_views=0, augmix=False), tiny_clip, SPACE6, x[:3], x[3:])


def test_label_spaces():
    label_space_check(lambda: _stub_tda()[0])
    s, _ = _stub_tda()
    s.predict(images_for([[1.0, 0.0, 0.0]]), LabelSpace(["a", "b"]))  # predicting builds nothing
    assert s.cache is None and s.space is None


def test_bad_arguments():
    for kw in ({"pos_capacity": 0}, {"selection_p": 0.0}, {"entropy_norm": "log10"}, {"n_views": -1}):
        with pytest.raises(ValueError):
            TDA(**kw)
    with pytest.raises(RuntimeError, match="setup"):
        TDA().adapt(torch.rand(1, 3, 4, 4), SPACE3)


def test_through_wrap_with_every_reset_policy():
    wrap_check(lambda: TDA(n_views=5), SPACE6)


def test_non_finite_features_never_enter_the_caches():
    s, model = _stub_tda()
    good, bad = images_for([[1.0, 0.2, 0.0]]), images_for([[1.0, 0.2, 0.0]])
    encode = model.encode_image
    model.encode_image = lambda x: encode(x) * float("nan")
    s.adapt(bad, SPACE3)
    assert s.cache is None and s.skipped_steps == 1  # nothing built from a non-finite sample
    model.encode_image = encode
    s.adapt(good, SPACE3)
    model.encode_image = lambda x: encode(x) * float("nan")
    s.adapt(bad, SPACE3)
    assert s.cache.pos.count.tolist() == [1, 0, 0] and s.skipped_steps == 2
    assert torch.isfinite(s.cache.pos.keys).all() and torch.isfinite(s.cache.pos.entropy).all()
