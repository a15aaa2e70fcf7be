"""BoostAdapter: the boosting-sample filter, the boosted (non-persistent) cache copy with capacity 3 + δ, the FIFO
negative cache, the prediction by hand, pure predict, state round-trip."""
from __future__ import annotations

import math

import pytest
import torch

from ctta import LabelSpace
from ctta.strategies import BoostAdapter
from ctta.strategies._cache import ClassCache
from ctta.strategies._dual_cache import DualCache
from ctta.strategies.boost_adapter import boosted_items, boosting_samples
from tests._tta_stub import StubClip, images_for, label_space_check, no_change, round_trip_check, wrap_check

SPACE3 = LabelSpace(["a", "b", "c"])
SPACE6 = LabelSpace([f"class {i}" for i in range(6)])


def _h(p: list[float]) -> float:
    return -sum(q * math.log(q) for q in p if q > 0)


def test_boosting_samples_are_the_ten_percent_most_confident_views_with_own_labels():
    feats = torch.arange(20.0)[:, None].repeat(1, 2)
    logits = torch.zeros(20, 3)
    logits[5] = torch.tensor([4.0, 0.0, 0.0])
    logits[12] = torch.tensor([0.0, 3.0, 0.0])
    logits[7] = torch.tensor([0.0, 0.0, 2.0])  # third most confident: not among int(20·0.1) = 2
    f, h, y = boosting_samples(feats, logits)
    assert f[:, 0].tolist() == [5.0, 12.0] and y.tolist() == [0, 1]
    e4, e3 = math.exp(4), math.exp(3)
    assert h.tolist() == pytest.approx([_h([e4 / (e4 + 2), 1 / (e4 + 2), 1 / (e4 + 2)]),
                                        _h([1 / (e3 + 2), e3 / (e3 + 2), 1 / (e3 + 2)])], abs=1e-6)
    assert boosting_samples(feats[:9], logits[:9])[0].shape[0] == 0  # int(9·0.1) = 0: no boosting (one view: none)


def test_boosted_copy_capacity_three_plus_delta_pushes_history_out():
    pos = ClassCache(3, 3, 1)
    for key, h in ((1.0, 0.2), (2.0, 0.5), (3.0, 0.9)):
        pos.insert(0, torch.tensor([key]), h)
    pos.insert(1, torch.tensor([4.0]), 0.4)
    before = pos.state_dict()
    keys, ent, cls = torch.tensor([[10.0], [11.0], [12.0]]), torch.tensor([0.3, 0.6, 0.1]), torch.tensor([0, 0, 2])
    k, c = boosted_items(pos, keys, ent, cls, capacity=4)  # δ = 1
    # untouched class 1 as stored; class 0: the 4 lowest of 0.2, 0.5, 0.9 (history) and 0.3, 0.6 (boosting)
    assert k[:, 0].tolist() == [4.0, 1.0, 10.0, 2.0, 11.0, 12.0] and c.tolist() == [1, 0, 0, 0, 0, 2]
    k, c = boosted_items(pos, keys, ent, cls, capacity=3)  # δ = 0: the boosting sample 0.3 evicts 0.9, 0.6 stays out
    assert k[:, 0].tolist() == [4.0, 1.0, 10.0, 2.0, 12.0] and c.tolist() == [1, 0, 0, 0, 2]
    assert all(torch.equal(before[n], v) for n, v in pos.state_dict().items())  # the history is not touched


def test_negative_cache_is_fifo_unlike_tda():
    ba = BoostAdapter()
    tda_cfg = type(ba.cfg)(neg_policy="entropy")
    f, p = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.3, 0.1])
    fifo, tda = DualCache(3, 2, ba.cfg), DualCache(3, 2, tda_cfg)
    for h in (0.5, 0.6, 0.7):  # all inside the band: H / log2(3) in (0.2, 0.5)
        fifo.update(f, h, p, 0)
        tda.update(f, h, p, 0)
    assert fifo.neg.entropy[0].tolist() == pytest.approx([0.6, 0.7])  # the two most recent
    assert tda.neg.entropy[0].tolist() == pytest.approx([0.5, 0.6])   # the two lowest entropies
    assert fifo.pos.entropy[0].tolist() == pytest.approx([0.5, 0.6, 0.7])  # positive: TDA's rule in both


def test_prediction_by_hand_and_boosting_not_persisted():
    model = StubClip(torch.eye(3))
    s = BoostAdapter(n_views=19, query="view0", delta=0)  # 20 identical views (constant image): 2 boosting samples
    s.setup(model)
    a = [1.0, 0.2, 0.0]
    out = s.adapt(images_for([a]), SPACE3)
    z = 100 * torch.nn.functional.normalize(torch.tensor(a), dim=0)
    # historical item + 2 boosting samples, all with affinity 1 and class 0, fit in 3 + 0: z + 3·α·exp(0) on class 0
    assert out[0].tolist() == pytest.approx((z + torch.tensor([6.0, 0.0, 0.0])).tolist(), abs=1e-3)
    assert s.cache.pos.count.tolist() == [1, 0, 0] and len(s.cache.neg) == 0  # only the historical entry stays
    one = BoostAdapter(n_views=19, query="view0", delta=0, pos_capacity=1)
    one.setup(model)
    out = one.adapt(images_for([a]), SPACE3)  # capacity 1 + 0: one item is read
    assert out[0].tolist() == pytest.approx((z + torch.tensor([2.0, 0.0, 0.0])).tolist(), abs=1e-3)
    two = BoostAdapter(n_views=19, query="view0", delta=1, pos_capacity=1)
    two.setup(model)
    assert two.adapt(images_for([a]), SPACE3)[0].tolist() == pytest.approx(
        (z + torch.tensor([4.0, 0.0, 0.0])).tolist(), abs=1e-3)  # 1 + δ = 2 items


def test_predict_is_pure(tiny_clip):
    s = BoostAdapter(n_views=11)
    s.setup(tiny_clip)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    s.adapt(x[:2], SPACE6)
    with no_change(s):
        p1 = s.predict(x, SPACE6)
    assert torch.equal(p1, s.predict(x, SPACE6))


def test_state_round_trip_mid_stream(tiny_clip):
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    round_trip_check(lambda: BoostAdapter(n_views=11), tiny_clip, SPACE6, x[:3], x[3:])
    round_trip_check(lambda: BoostAdapter(n_views=11, query="view0", delta=2), tiny_clip, SPACE6, x[:3], x[3:])


def test_label_space_and_arguments():
    s = BoostAdapter(n_views=0)
    s.setup(StubClip(torch.eye(3)))
    s.adapt(images_for([[1.0, 0.0, 0.0]]), LabelSpace(["a", "b"]))
    with pytest.raises(ValueError, match="2-class label space"):
        s.adapt(images_for([[1.0, 0.0, 0.0]]), SPACE3)
    for kw in ({"query": "mean"}, {"delta": -1}, {"boost_p": 1.5}, {"neg_capacity": 0}):
        with pytest.raises(ValueError):
            BoostAdapter(**kw)


def test_through_wrap_with_every_reset_policy():
    wrap_check(lambda: BoostAdapter(n_views=11), SPACE6)


def test_label_spaces():
    def make() -> BoostAdapter:
        s = BoostAdapter(n_views=3, query="view0", delta=0)
        s.setup(StubClip(torch.eye(3)))
        return s
    label_space_check(make)
