"""CoDyRA (RankSelectiveLoRA) and the fixed-rank LoRA baseline: proximal step, κ schedule and loss on hand-computed
values; pruning + merging after each task; structure stable across tasks so that runs resume exactly."""
from __future__ import annotations

import math

import pytest
import torch

from ctta import AccuracyMatrix, run
from ctta.adapters.inject import lora_modules, merge_and_remove
from ctta.adapters.lora import LoRAAttention
from ctta.hooks import StrategySummary
from ctta.losses import seen_masked_clip_loss
from ctta.finetuning import class_prompts
from ctta.strategies.lora_ft import LoRA
from ctta.strategies.rank_lora import RankSelectiveLoRA, kappa_schedule, soft_threshold_
from tests.conftest import make_tiny_clip


def test_soft_threshold_hand_values():
    w = torch.tensor([0.5, -0.5, 0.003, -0.004, 0.007, -0.009, 0.0])
    soft = w.clone()
    soft_threshold_([soft], 0.005)
    assert torch.allclose(soft, torch.tensor([0.495, -0.495, 0.0, 0.0, 0.002, -0.004, 0.0]), atol=1e-7)
    ref = w.clone()  # the reference's sequential masks zero everything below 2κ (0.007 -> 0.002 -> 0)
    soft_threshold_([ref], 0.005, reference=True)
    assert torch.allclose(ref, torch.tensor([0.495, -0.495, 0.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-7)


def test_kappa_schedule_hand_values():
    # total 10, dense 5, interval (10-5)//5 = 1, levels [0, .25, .5, .75, 1]: index advances at i = 5, 6, 7, 8, 9
    # (clamped at 4); thresholding only after steps i > 5
    assert kappa_schedule(10, 1.0, n_kappa=5) == [0, 0, 0, 0, 0, 0, 0.5, 0.75, 1.0, 1.0]
    k = kappa_schedule(500, 0.005)  # reference defaults: interval 5, first κ after step 251, κ_max from step 490
    step = 0.005 / 49
    assert k[:251] == [0.0] * 251
    assert k[251] == pytest.approx(step) and k[254] == pytest.approx(step) and k[255] == pytest.approx(2 * step)
    assert k[489] == pytest.approx(48 * step) and k[490:] == [pytest.approx(0.005)] * 10
    assert sum(k) == pytest.approx(0.6499, abs=1e-4)  # methods.md: cumulative shrinkage ≈ 0.6–0.65
    # sparse phase (10) shorter than n_kappa (50): ramp compressed to linspace(0, 1, 10), advancing every step
    assert kappa_schedule(20, 1.0)[10:] == [0.0] + [pytest.approx(i / 9) for i in range(2, 10)] + [1.0]
    with pytest.raises(ValueError):
        kappa_schedule(0, 0.005)


def test_loss_hand_value():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    seen = torch.tensor([[1.0, 0.0]])
    cur = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    l1 = math.log(1 + math.exp(-1))
    # image->text: each row [-inf, ·, ·] → log(1+e^-1); text->image: rows seen 0, cur0 l1, cur1 l1 → mean 2/3·l1
    assert float(seen_masked_clip_loss(f, seen, cur, y, 1.0)) == pytest.approx(l1 + 2 / 3 * l1, rel=1e-6)
    assert float(seen_masked_clip_loss(f, seen, cur, y, 1.0, text_to_image=False)) == pytest.approx(l1, rel=1e-6)
    # without seen classes the text->image mean runs over 2 rows only
    assert float(seen_masked_clip_loss(f, seen[:0], cur, y, 1.0)) == pytest.approx(2 * l1, rel=1e-6)
    with pytest.raises(ValueError, match="current classes"):
        seen_masked_clip_loss(f, seen, cur, torch.tensor([0, 2]), 1.0)


def _base_targets(clip):
    return {k: v.clone() for k, v in clip.net.state_dict().items()}


def _structure(clip):
    return [(k, tuple(v.shape)) for k, v in clip.net.state_dict().items()]


def test_rank_selective_lora_prunes_merges_and_reinjects(tiny_stream):
    clip = make_tiny_clip()
    W0 = _base_targets(clip)
    n_base = sum(p.numel() for p in clip.parameters())
    s = RankSelectiveLoRA(rank=4, iterations=20, batch_size=16, kappa_max=0.3)
    s.setup(clip)
    structure = _structure(clip)
    space, offset = tiny_stream.train_space(0)
    task = tiny_stream.tasks[0]
    s.begin_task(task, space)
    assert s._kappas == kappa_schedule(20, 0.3)
    images, labels = task.train.get_batch(torch.arange(16))
    gates = s.task_lora.gates()
    assert len(gates) == len(s.loras) > 0
    for i in range(20):
        before = [g.detach().clone() for g in gates]
        stats = s.learn(images, labels + offset, space)
        assert stats["kappa"] == s._kappas[i]
        if stats["kappa"] > 0:  # every gate moved towards 0 by the prox step (or is 0)
            assert all(bool((g.detach().abs() <= b.abs() + 0.05).all()) for g, b in zip(gates, before))
    zeros = sum(int((g == 0).sum()) for g in gates)
    assert zeros > 0  # Σκ = 0.3·(~5.4) shrinkage over the sparse phase zeroes some N(0,1) gates
    s.end_task(task, space)
    stats = s.summary()["tasks"][0]
    assert sum(stats["effective_rank"].values()) == 4 * len(gates) - zeros
    # merged: the base weights moved by exactly Σ ΔW, and a fresh full-rank LoRA is in place
    drift = sum(float((v - W0[k]).square().sum()) for k, v in merge_and_remove_copy(clip).items())
    assert stats["drift"] == pytest.approx(drift ** 0.5, rel=1e-4) and stats["drift"] > 0
    assert all(lora.rank == 4 and float(lora.lora_B.detach().abs().sum()) == 0 for lora in s.loras)
    assert _structure(clip) == structure  # what the runner saves after end_task loads into a fresh setup
    merge_and_remove(clip)
    assert sum(p.numel() for p in clip.parameters()) == n_base


def merge_and_remove_copy(clip):
    """The model's state with the (fresh, zero) LoRA merged away, keyed like the base model."""
    import copy
    c = copy.deepcopy(clip)
    merge_and_remove(c)
    return c.net.state_dict()


def test_seen_features_and_current_block(tiny_stream):
    clip = make_tiny_clip()
    s = RankSelectiveLoRA(rank=2, iterations=2, batch_size=8)
    s.setup(clip)
    space, _ = tiny_stream.train_space(1)
    s.begin_task(tiny_stream.tasks[1], space)
    assert s.task_lora.block == slice(2, 4)
    with torch.no_grad():
        expected = clip.encode_text(class_prompts(tiny_stream.tasks[0].space))
    assert torch.allclose(s.task_lora.seen, expected, atol=1e-6)
    # labels outside the current block are a clear error, not a silent mis-indexing
    with pytest.raises(ValueError, match="current classes"):
        s.learn(tiny_stream.tasks[1].train.get_batch(torch.arange(4))[0], torch.tensor([0, 1, 2, 3]), space)


@pytest.mark.parametrize("cls", [RankSelectiveLoRA, LoRA])
def test_resumed_run_equals_uninterrupted(cls, tiny_stream, tmp_path):
    make = lambda: cls(rank=2, iterations=4, batch_size=16)  # noqa: E731

    class StopAfterFirstTask:
        armed = True

        def on_task_start(self, ctx):
            if ctx.task_index == 1 and self.armed:
                raise KeyboardInterrupt

    full = run(make_tiny_clip(), make(), tiny_stream, [AccuracyMatrix(), StrategySummary()], seed=3, progress=False)
    stopper = StopAfterFirstTask()
    with pytest.raises(KeyboardInterrupt):
        run(make_tiny_clip(), make(), tiny_stream, [AccuracyMatrix(), StrategySummary(), stopper],
            out_dir=tmp_path, seed=3, progress=False)
    stopper.armed = False
    resumed = run(make_tiny_clip(), make(), tiny_stream, [AccuracyMatrix(), StrategySummary(), stopper],
                  out_dir=tmp_path, seed=3, progress=False)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert [t["drift"] for t in resumed["strategy"]["tasks"]] == pytest.approx(
        [t["drift"] for t in full["strategy"]["tasks"]], rel=1e-6)


def test_fixed_rank_lora_keeps_every_rank(tiny_stream):
    clip = make_tiny_clip()
    res = run(clip, LoRA(rank=3, iterations=3, batch_size=16, towers=("visual",), targets=("q", "fc")),
              tiny_stream, [StrategySummary()], progress=False)
    tasks = res["strategy"]["tasks"]
    assert len(tasks) == 3 and all(t["mean_effective_rank"] == 3 for t in tasks)
    assert tasks[-1]["drift"] >= tasks[0]["drift"] > 0
    assert [m.name for m in lora_modules(clip)] == ["visual.0.q", "visual.0.fc", "visual.1.q", "visual.1.fc"]
    assert all(m.gate is None for m in lora_modules(clip))
    assert isinstance(clip.net.visual.transformer.resblocks[0].attn, LoRAAttention)
