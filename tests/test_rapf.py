"""RAPF (methods.md §3): fusion, sampler, hard pairs, statistics, replay schedule, lifecycle."""
import math

import pytest
import torch
import torch.nn.functional as F

from ctta import AccuracyMatrix, run
from ctta.cache import encode_raw
from ctta.strategies.rapf import (
    RAPF,
    class_statistics,
    fuse_weights,
    hard_pairs,
    hinge_loss,
    sample_features,
    shrink_covariance,
)
from tests.conftest import make_tiny_clip

W_OLD = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
W_NEW = torch.tensor([[2.0, 0.4], [0.2, 1.8]])
# by hand, b = 0.3: U = I, dP = [[0, .4], [.2, .8]], M = min(1, dP/.8 + .3) = [[.3, .8], [.55, 1]],
# W = M*W_new + (1-M)*W_old = [[2, .32], [.11, 1.8]]
FUSED = torch.tensor([[2.0, 0.32], [0.11, 1.8]])


def rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]])


def test_fusion_matches_hand_computation():
    assert torch.allclose(fuse_weights(W_OLD, W_NEW, 0.3), FUSED, atol=1e-6)


def test_fusion_works_in_the_old_left_singular_basis():
    R = rotation(0.7)  # W_old = R diag(2, 1): U = R, so P_old = diag(2, 1) and P_new = R^T W_new
    assert torch.allclose(fuse_weights(R @ W_OLD, R @ W_NEW, 0.3), R @ FUSED, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    wo, wn = torch.randn(5, 5, generator=g), torch.randn(5, 5, generator=g)
    Q = torch.linalg.qr(torch.randn(5, 5, generator=g))[0]
    assert torch.allclose(fuse_weights(Q @ wo, Q @ wn, 0.6), Q @ fuse_weights(wo, wn, 0.6), atol=1e-5)
    assert torch.allclose(fuse_weights(wo, wn, 1.0), wn, atol=1e-5)  # b = 1 keeps the new weight
    assert torch.equal(fuse_weights(wo, wo.clone(), 0.5), wo)  # nothing changed: no 0/0
    # b = 0: the coordinate with the largest change keeps its new value, an unchanged one keeps the old
    fused = fuse_weights(W_OLD, W_NEW, 0.0)
    assert fused[1, 1] == pytest.approx(1.8) and fused[0, 0] == pytest.approx(2.0)
    assert fused[0, 1] == pytest.approx(0.5 * 0.4)
    with pytest.raises(ValueError, match="one shape"):
        fuse_weights(wo, wn[:4], 0.5)


def test_shrinkage_matches_hand_computation():
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 3.0]])
    # mean diagonal 2; mean of the non-zero off-diagonal entries (.5, .5, .25, .25) = .375
    expected = torch.tensor([[4.0, 0.875, 0.375], [0.875, 3.0, 0.625], [0.375, 0.625, 5.0]])
    assert torch.allclose(shrink_covariance(cov), expected)


def test_sampler_reproduces_the_stored_mean_and_covariance():
    mean = torch.tensor([1.0, -2.0, 0.5])
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    for target in (cov, shrink_covariance(cov)):
        x = sample_features(mean, torch.linalg.cholesky(target), 200_000, torch.Generator().manual_seed(0))
        assert torch.allclose(x.mean(0), mean, atol=0.02)
        assert torch.allclose(torch.cov(x.T), target, atol=0.03)


def test_class_statistics_unbiased_covariance_plus_ridge():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])
    mean, cov = class_statistics(x, ridge=1e-4)
    assert torch.allclose(mean.float(), torch.tensor([2.0, 3.0]))
    # deviations [-1,-1], [1,-1], [0,2]: sum of outer products [[2, 0], [0, 6]] / (n-1 = 2)
    assert torch.allclose(cov.float(), torch.tensor([[1.0001, 0.0], [0.0, 3.0001]]))
    _, single = class_statistics(x[:1], ridge=1e-4)
    assert torch.allclose(single.float(), 1e-4 * torch.eye(2))


def test_hard_pairs_by_euclidean_distance_of_normalised_text_features():
    e = torch.eye(3)
    old = torch.stack([e[0], 5 * e[1]])  # scale must not matter: features are normalised first
    new = torch.stack([3 * e[0], e[0] + e[1], e[2]])
    # distances: old0-new0 0, old0-new1 = old1-new1 = sqrt(2 - sqrt 2) = 0.765, to new2 sqrt 2 = 1.414
    assert hard_pairs(old, new, 0.8).tolist() == [[0, 0], [0, 1], [1, 1]]
    assert hard_pairs(old, new, 0.5).tolist() == [[0, 0]]
    assert hard_pairs(old, new, 1.5).shape == (6, 2)


def test_hinge_on_given_features():
    h = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    t_pos = torch.tensor([[1.0, 0.0]]).expand(3, 2)
    t_neg = torch.tensor([[0.0, 1.0]]).expand(3, 2)
    # relu(-<h,t_k> + <h,t_j> + 0.1): relu(-1 + 0 + .1) = 0, relu(-.6 + .8 + .1) = .3, relu(0 + 1 + .1) = 1.1
    assert hinge_loss(h, t_pos, t_neg).item() == pytest.approx((0 + 0.3 + 1.1) / 3)
    assert hinge_loss(h, t_pos, t_neg, margin=0.5).item() == pytest.approx((0 + 0.7 + 1.5) / 3)


def test_adapter_setup_frozen_encoders_default_init(tiny_clip):
    s = RAPF()
    s.setup(tiny_clip)
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    w = s.adapter.weight
    assert w.shape == (32, 32) and s.adapter.bias is None
    assert not torch.allclose(w, torch.eye(32)) and w.abs().max() <= 1 / math.sqrt(32)  # kaiming-uniform bound
    assert [p for g in s.optimizer.param_groups for p in g["params"]] == [w]


def test_schedule_milestones_in_epochs_become_steps(tiny_stream):
    s = RAPF(batch_size=8)  # 20 images per task -> 3 steps per epoch -> milestones (4, 10) = steps (12, 30)
    s.setup(make_tiny_clip())
    task = tiny_stream.tasks[0]
    space, _ = tiny_stream.train_space(0)
    s.begin_task(task, space)
    assert dict(s.scheduler.milestones) == {12: 1, 30: 1}
    x, y = task.train.get_batch(torch.arange(8))
    for _ in range(12):
        s.learn(x, y, space)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert isinstance(s.optimizer, torch.optim.Adam) and s.optimizer.param_groups[0]["weight_decay"] == 0


def test_statistics_fusion_replay_and_hinge_over_a_stream(tiny_stream):
    model = make_tiny_clip()
    s = RAPF(batch_size=8, epochs=2, beta=1.5, replay_classes=3, threshold=2.1, mix_bias=0.4)
    calls, weights = [], {}
    real_pseudo, real_end = s._pseudo, s.end_task

    def spy_pseudo(which, per):
        calls.append((s.tasks_done, s._batch, which.tolist(), per))
        return real_pseudo(which, per)

    def spy_end(task, space):
        weights[task.name] = (s._old_weight, s.adapter.weight.detach().clone())
        real_end(task, space)
        weights[task.name] += (s.adapter.weight.detach().clone(),)

    s._pseudo, s.end_task = spy_pseudo, spy_end
    run(model, s, tiny_stream, [AccuracyMatrix()])
    # statistics: frozen, pre-adapter, un-normalised features of each class's training images
    assert len(s.stats) == 6
    task = tiny_stream.tasks[1]
    x, y = task.train.get_batch(torch.arange(len(task.train)))
    feats = encode_raw(model, x[y == 0])
    mean, cov = class_statistics(feats)
    assert torch.allclose(s.stats[task.space.classnames[0]][0], mean.float(), atol=1e-5)
    assert s.stats[task.space.classnames[0]][1].dtype == torch.float64  # float32 rounding can break PD-ness
    assert torch.allclose(s.stats[task.space.classnames[0]][1], cov, atol=1e-5)
    # fusion: none after the first task, fuse(old, new, b) after the others
    names = [t.name for t in tiny_stream.tasks]
    old, new, final = weights[names[0]]
    assert old is None and torch.equal(new, final)
    old, new, final = weights[names[2]]
    assert torch.allclose(final, fuse_weights(old, new, 0.4), atol=1e-6) and not torch.allclose(final, new)
    # replay: none in task 0; then 3 old classes per batch, 10*beta = 15 each, cyclic over a per-epoch shuffle
    assert not [c for c in calls if c[0] == 0]
    replay = [c for c in calls if c[0] == 2 and c[3] == 15]
    assert len(replay) == 6 and all(len(c[2]) == 3 for c in replay)  # 2 epochs x 3 batches
    for epoch in (replay[:3], replay[3:]):  # 4 old classes, 3 per batch: order[0..3], order[0..3], order[0]
        drawn = [k for c in epoch for k in c[2]]
        assert len(set(drawn[:4])) == 4 and drawn[4:8] == drawn[:4] and drawn[8] == drawn[0]
    # hinge: 20*beta = 30 pseudo-features per hard pair (threshold 2.1 > 2 makes every old/new pair hard)
    hinge = [c for c in calls if c[0] == 2 and c[3] == 30]
    assert len(hinge) == 6 and sorted(hinge[0][2]) == sorted([0, 1, 2, 3] * 2)


def test_predict_is_pure_and_matches_the_formula(tiny_stream):
    model = make_tiny_clip()
    s = RAPF(batch_size=8, epochs=1, logit_scale=None)  # None: the model's exp(logit_scale)
    run(model, s, tiny_stream, [])
    space, _ = tiny_stream.train_space(2)
    x, _ = tiny_stream.tasks[2].test.get_batch(torch.arange(5))
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in s.state_dict().items()}
    out = s.predict(x, space)
    after = s.state_dict()
    assert torch.equal(before["adapter"]["weight"], after["adapter"]["weight"])
    assert torch.equal(before["means"], after["means"]) and before["steps"] == after["steps"]
    h = F.normalize(s.adapter(encode_raw(model, x)), dim=-1)
    assert torch.allclose(out, model.logit_scale * h @ model.text_head(space).T, atol=1e-4)
    fixed = RAPF()  # default: the reference's 100
    fixed.setup(model)
    fixed.adapter.load_state_dict(s.adapter.state_dict())
    assert torch.allclose(fixed.predict(x, space), 100 * h @ model.text_head(space).T, atol=1e-3)


def test_state_dict_round_trip(tiny_stream):
    model = make_tiny_clip()
    s = RAPF(batch_size=8, epochs=1)
    run(model, s, tiny_stream, [])
    t = RAPF(batch_size=8, epochs=1)
    t.setup(model)
    t.load_state_dict(s.state_dict())
    space, _ = tiny_stream.train_space(2)
    x, _ = tiny_stream.tasks[0].test.get_batch(torch.arange(4))
    assert torch.equal(t.predict(x, space), s.predict(x, space)) and t.tasks_done == 3 and len(t.stats) == 6


def test_bad_settings_and_missing_boundary_are_refused(tiny_clip, tiny_stream):
    with pytest.raises(ValueError, match="beta"):
        RAPF(beta=0)
    with pytest.raises(ValueError, match="mix_bias"):
        RAPF(mix_bias=1.5)
    s = RAPF()
    s.setup(tiny_clip)
    space, _ = tiny_stream.train_space(0)
    with pytest.raises(RuntimeError, match="boundaries"):
        s.learn(torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), space)


def test_auto_replay_visits_every_old_class_each_epoch(tiny_stream):
    s = RAPF(batch_size=8, epochs=2, replay_classes=None, threshold=0.0)  # 3 steps per epoch
    seen = []
    real = s._pseudo
    s._pseudo = lambda which, per: (seen.append((s.tasks_done, s._batch, which.tolist())), real(which, per))[1]
    run(make_tiny_clip(), s, tiny_stream, [])
    for task, n_old, k in ((1, 2, 1), (2, 4, 2)):  # k = ceil(old classes / steps per epoch)
        calls = [c for c in seen if c[0] == task]
        assert len(calls) == 6 and all(len(c[2]) == k for c in calls)
        for epoch in (calls[:3], calls[3:]):
            assert sorted({x for c in epoch for x in c[2]}) == list(range(n_old))
