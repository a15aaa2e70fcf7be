"""ZERO: the vote marginal of the confident views at zero temperature, the greedy tie-break and its fallback, the
soft fp16-like temperature switch, pure predict, state round-trip, seeding."""
from __future__ import annotations

import math

import pytest
import torch

from ctta import LabelSpace
from ctta.strategies import ZERO
from ctta.strategies.zero import zero_vote
from tests._tta_stub import StubClip, images_for, no_change, round_trip_check, wrap_check

SPACE3 = LabelSpace(["a", "b", "c"])
SPACE6 = LabelSpace([f"class {i}" for i in range(6)])
FLAT = [0.200, 0.201, 0.200]  # an unconfident view (0.1 logit margin at scale 100), argmax 1


def test_vote_of_the_confident_views_by_hand():
    cos = torch.tensor([FLAT] * 10)
    cos[1] = torch.tensor([0.204, 0.200, 0.10])  # weakly for class 0: p ≈ (0.60, 0.40, 0), H ≈ 0.67
    cos[4] = torch.tensor([0.100, 0.300, 0.10])  # strongly for class 1
    cos[7] = torch.tensor([0.204, 0.200, 0.10])  # weakly for class 0
    # int(10 · 0.3) = 3 views vote (the flat ones, H ≈ 1.10, do not): two for class 0, one for class 1
    assert zero_vote(cos).tolist() == [2.0, 1.0, 0.0]
    # TPT's marginal (mean probability) of the same three views picks class 1: (0.40·2 + 1)/3 > (0.60·2)/3
    assert int((100 * cos[[1, 4, 7]]).softmax(-1).mean(0).argmax()) == 1
    # γ = 0.5 keeps 5 views: the 3 above and the 2 first flat ones (equal entropy: stable, views 0 and 2), class 1
    assert zero_vote(cos, gamma=0.5).tolist() == [2.0, 3.0, 0.0]


def test_greedy_tie_break_walks_views_from_k_in_original_order():
    cos = torch.tensor([[0.200, 0.201, 0.150]] * 10)  # argmax 1, H ≈ 0.71
    cos[5] = torch.tensor([0.30, 0.10, 0.10])    # confident, class 0
    cos[8] = torch.tensor([0.10, 0.30, 0.10])    # confident, class 1
    cos[2] = torch.tensor([0.10, 0.10, 0.15])    # view k = 2: argmax 2, not tied -> skipped
    cos[3] = torch.tensor([0.201, 0.200, 0.10])  # view 3: argmax 0, tied -> wins
    cos[9] = torch.tensor([0.25, 0.20, 0.10])    # class 0 and the most confident discarded view (H ≈ 0.04)
    # k = int(10 · 0.2) = 2 votes, one each for classes 0 and 1: a tie; views 0 and 1 (< k) are never consulted
    assert zero_vote(cos, gamma=0.2).tolist() == [2.0, 1.0, 0.0]
    cos[3] = torch.tensor(FLAT)  # view 3 now votes for class 1: the first tied argmax in view order from k on;
    # walking the discarded views by entropy instead would reach view 9 (class 0) first
    assert zero_vote(cos, gamma=0.2).tolist() == [1.0, 2.0, 0.0]


def test_tie_break_fallback_is_argmax_of_view_k_over_tied_classes():
    cos = torch.tensor([[0.10, 0.10, 0.15]] * 5)  # later views vote for class 2, which is not tied
    cos[0] = torch.tensor([0.30, 0.10, 0.00])
    cos[1] = torch.tensor([0.10, 0.30, 0.00])
    cos[2] = torch.tensor([0.00, 0.20, 0.21])  # view k = 2: among the tied {0, 1}, class 1 has the larger cosine
    assert zero_vote(cos, gamma=0.4).tolist() == [1.0, 2.0, 0.0]
    assert zero_vote(cos[:2], gamma=1.0).tolist() == [2.0, 1.0, 0.0]  # k = V: no view left, lowest tied class


def test_soft_vote_temperature_switch():
    cos = torch.tensor([[0.3000, 0.2995, 0.1], [0.3, 0.1, 0.1], [0.1, 0.3, 0.1]])
    eps16 = 9.765625e-4  # finfo(fp16).eps, the official "zero" temperature under autocast
    soft = zero_vote(cos, gamma=1.0, vote_temperature=eps16)
    e = math.exp(-0.0005 / eps16)
    assert soft[:2].tolist() == pytest.approx([1 + 1 / (1 + e), 1 + e / (1 + e)], abs=1e-4)
    assert zero_vote(cos, gamma=1.0).tolist() == [2.0, 1.0, 0.0]  # hard votes: 2 for class 0, 1 for class 1


def test_strategy_votes_and_is_pure(tiny_clip):
    model = StubClip(torch.eye(3))
    s = ZERO(n_views=9)  # 10 identical views of a constant image: int(10 · 0.3) = 3 votes
    s.setup(model)
    assert s.adapt(images_for([[0.1, 1.0, 0.0]]), SPACE3).tolist() == [[0.0, 3.0, 0.0]]
    t = ZERO(n_views=7)
    t.setup(tiny_clip)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with no_change(t):
        assert torch.equal(t.predict(x, SPACE6), t.predict(x, SPACE6))
    assert t.default_reset == "episodic" and t.sample_episodes


def test_state_round_trip_and_reseed(tiny_clip):
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    round_trip_check(lambda: ZERO(n_views=15), tiny_clip, SPACE6, x[:2], x[2:])
    s = ZERO(n_views=15)
    s.setup(tiny_clip)
    s.reseed(7)
    a = s.adapt(x, SPACE6)
    s.reseed(7)
    assert torch.equal(s.adapt(x, SPACE6), a)


def test_bad_arguments():
    for kw in ({"gamma": 0.0}, {"gamma": 1.5}, {"n_views": -1}, {"vote_temperature": -1.0}):
        with pytest.raises(ValueError):
            ZERO(**kw)


def test_through_wrap_with_every_reset_policy():
    wrap_check(lambda: ZERO(n_views=5), SPACE6)
