"""DMN-ZS: the memory write (pseudo-label from the confident views, original view stored, replace the highest
entropy), the read with the text slot, the probability-space mixture, the labelled oracle search, pure predict,
state round-trip — on hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from ctta import LabelSpace
from ctta.strategies import DMN
from ctta.strategies._cache import ClassCache
from ctta.strategies.dmn import ORACLE_GRID, oracle_mix_weight
from tests._tta_stub import StubClip, images_for, label_space_check, no_change, round_trip_check, wrap_check

SPACE2 = LabelSpace(["a", "b"])
SPACE3 = LabelSpace(["a", "b", "c"])
SPACE6 = LabelSpace([f"class {i}" for i in range(6)])


def _h8(p: list[float]) -> float:  # the stored entropy, official eps 1e-8
    return -sum(q * math.log(q + 1e-8) for q in p)


def _dmn(head: torch.Tensor, **kw) -> DMN:
    s = DMN(**kw)
    s.setup(StubClip(head))
    return s


def test_pseudo_label_from_three_confident_views():
    s = _dmn(torch.eye(3))
    logits = torch.zeros(32, 3)  # 29 uniform views and three confident ones: int(32 · 0.1) = 3
    logits[4] = torch.tensor([3.0, 0.0, 0.0])
    logits[9] = torch.tensor([0.0, 4.0, 0.0])
    logits[20] = torch.tensor([5.0, 0.0, 0.0])
    y, h = s.pseudo_label(logits)
    e3, e4, e5 = math.exp(3), math.exp(4), math.exp(5)
    pbar = [(e3 / (e3 + 2) + 1 / (e4 + 2) + e5 / (e5 + 2)) / 3, (1 / (e3 + 2) + e4 / (e4 + 2) + 1 / (e5 + 2)) / 3]
    pbar.append(1 - sum(pbar))
    assert y == 0 and h == pytest.approx(_h8(pbar), abs=1e-5)


def test_memory_write_keeps_the_lowest_entropies():
    mem = ClassCache(3, 2, 1)  # memory size 2
    key = lambda v: torch.tensor([v])  # noqa: E731
    for v, p in ((1.0, [0.5, 0.5, 0.0]), (2.0, [0.9, 0.05, 0.05]), (3.0, [0.4, 0.3, 0.3]), (4.0, [0.6, 0.2, 0.2]),
                 (5.0, [0.8, 0.1, 0.1])):
        mem.insert(0, key(v), _h8(p))  # h: 0.693, 0.394, 1.089 (rejected: full, above the max), 0.950 (rejected),
    # 0.639 (< max 0.693: replaces item 1)
    assert sorted(mem.keys[0, :, 0].tolist()) == [2.0, 5.0] and mem.count.tolist() == [2, 0, 0]


def test_memory_read_with_text_slot_by_hand():
    s = _dmn(torch.eye(2), logit_scale=10.0)
    mem = ClassCache(2, 50, 2)
    mem.insert(0, torch.tensor([0.6, 0.8]), 0.1)  # class 0: one memory slot; class 1: empty (text slot only)
    f0 = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    p_mem = s.read(f0, torch.eye(2), mem)
    r = 1 / math.sqrt(2)
    w_m, w_t = math.exp(-5.5 * (1 - 1.4 * r)), math.exp(-5.5 * (1 - r))  # memory slot and text slot weights
    a = [w_m * 0.6 + w_t, w_m * 0.8]
    s0 = (a[0] + a[1]) * r / math.hypot(*a)  # f0 · normalize(a); class 1: f0 · [0, 1] = r
    assert s0 == pytest.approx(0.999976, abs=1e-6)
    expected0 = 1 / (1 + math.exp(10 * (r - s0)))
    assert p_mem.tolist() == pytest.approx([expected0, 1 - expected0], abs=1e-5)


def test_write_before_read_and_mixture_end_to_end():
    s = _dmn(torch.eye(3), n_views=9, logit_scale=10.0)  # constant image: all 10 views equal; a scale that does not
    out = s.adapt(images_for([[1.0, 0.8, 0.0]]), SPACE3)  # saturate the softmax, so that the memory term shows
    f0 = torch.nn.functional.normalize(torch.tensor([1.0, 0.8, 0.0]), dim=0)
    p_text = (10 * f0).softmax(-1)
    # written before the read: class 0's memory holds f0 itself (weight exp(0) = 1) next to its text slot;
    # classes 1 and 2 have only their text slot
    agg0 = f0 + math.exp(-5.5 * (1 - float(f0[0]))) * torch.tensor([1.0, 0, 0])
    m = torch.stack([torch.nn.functional.normalize(agg0, dim=0), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 1.0])])
    p_mem = (10 * m @ f0).softmax(-1)
    assert float(p_mem[0]) == pytest.approx(0.9738, abs=1e-3)  # text slot alone would give 0.826
    assert torch.allclose(out[0].exp(), (p_text + p_mem) / 2, atol=1e-5)  # β₂ = 1: the normalised mixture
    assert s.memory.count.tolist() == [1, 0, 0]
    assert torch.allclose(s.last_components[1][0], p_mem, atol=1e-5)
    w = _dmn(torch.eye(3), n_views=9, logit_scale=10.0, mix_weight=3.0)
    assert torch.allclose(w.adapt(images_for([[1.0, 0.8, 0.0]]), SPACE3)[0].exp(), (p_text + 3 * p_mem) / 4,
                          atol=1e-5)


def test_oracle_search_is_post_hoc_and_labelled():
    p_text = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.1, 0.9]])
    p_mem = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([1, 1, 1])
    # β₂ ≤ 0.1: the text wins (1/3 right); 0.3 ≤ β₂ < 0.8: rows 1-2 flip to 1, row 3 stays 1 (3/3); 1 and up: row 3
    # flips to 0 (2/3). The first best in grid order:
    assert oracle_mix_weight(p_text, p_mem, labels) == (0.3, 100.0)
    assert ORACLE_GRID[0] == 0.001 and ORACLE_GRID[-1] == 1000 and len(ORACLE_GRID) == 13
    assert DMN().mix_weight == 1.0  # the strategy itself uses a fixed weight


def test_predict_is_pure_and_draws_no_views(tiny_clip):
    s = DMN(n_views=7)
    s.setup(tiny_clip)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    s.adapt(x[:2], SPACE6)
    with no_change(s):
        p = s.predict(x, SPACE6)
    assert torch.equal(p, s.predict(x, SPACE6))
    fresh = DMN(n_views=7)
    fresh.setup(tiny_clip)
    assert not torch.allclose(fresh.predict(x, SPACE6), p)


def test_state_round_trip_and_label_space(tiny_clip):
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    round_trip_check(lambda: DMN(n_views=7, memory_size=2), tiny_clip, SPACE6, x[:3], x[3:])
    label_space_check(lambda: _dmn(torch.eye(3), n_views=0))
    for kw in ({"memory_size": 0}, {"selection_p": 0.0}, {"mix_weight": -1.0}):
        with pytest.raises(ValueError):
            DMN(**kw)


def test_through_wrap_with_every_reset_policy():
    wrap_check(lambda: DMN(n_views=5), SPACE6)
