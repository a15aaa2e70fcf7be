"""The composed fine-tuning part (`ctta.finetuning.FineTuning`) and what the strategies holding it inherit from it:
schedule values at given steps (hand-computed), WiSE-FT interpolation on hand-made tensors, optimizer reset per task
on and off, a mid-task state round trip that continues the same schedule, and refusals of bad settings."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from ctta.finetuning import FineTuning
from ctta.optim import lr_schedule
from ctta.strategies.finetune import Finetune
from ctta.strategies.lora_ft import LoRA
from ctta.strategies.lwf import LwF
from ctta.strategies.rank_lora import RankSelectiveLoRA
from ctta.strategies.vr_lwf import VRLwF
from tests.conftest import make_tiny_clip

# lr factors after 0..6 scheduler steps, warm-up 2 and 6 steps in all: warm-up (s+1)/2 for s < 2, then cosine over
# the remaining 4 steps, 0.5·(1 + cos(π·(s−2)/4)); constant: the same warm-up, then 1
COSINE = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0]
CONSTANT = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def lrs_over(schedule: str, steps: int = 7, total: int = 6) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = lr_schedule(opt, schedule, total, warmup=2)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule,factors", [("cosine", COSINE), ("constant", CONSTANT)])
def test_schedule_values_at_given_steps(schedule, factors):
    assert lrs_over(schedule) == pytest.approx([0.1 * f for f in factors], abs=1e-12)


def batch(n=8):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % 2


@pytest.mark.parametrize("schedule,factors", [("cosine", COSINE), ("constant", CONSTANT)])
def test_strategy_runs_the_schedule_it_is_given(schedule, factors, tiny_stream):
    s = Finetune("visual.proj", lr=0.1, warmup=2, schedule=schedule, iterations=6, batch_size=8)
    s.setup(make_tiny_clip())
    space, _ = tiny_stream.train_space(0)
    s.begin_task(tiny_stream.tasks[0], space)
    images, labels = batch()
    seen = []
    for _ in range(6):
        seen.append(s.optimizer.param_groups[0]["lr"])
        s.learn(images, labels, space)
    seen.append(s.optimizer.param_groups[0]["lr"])
    assert s.skipped_steps == 0 and seen == pytest.approx([0.1 * f for f in factors], abs=1e-12)


def test_wise_interpolation_on_hand_made_tensors():
    model = make_tiny_clip()
    model.freeze()
    proj = model.net.visual.proj
    with torch.no_grad():
        proj.fill_(1.0)  # the anchor: every entry 1
    tuning = FineTuning("visual.proj", lr=1e-3, wise_alpha=0.25)
    tuning.attach(model)
    assert list(tuning.anchor) == ["visual.proj"] and tuning.trainable == [proj]
    other = model.net.visual.conv1.weight.detach().clone()  # not trainable: never touched
    with torch.no_grad():
        proj.fill_(5.0)
        proj[0, 0] = -3.0
    tuning.end_task(model)  # θ ← 0.75·1 + 0.25·θ
    expected = torch.full_like(proj, 0.75 + 0.25 * 5.0)
    expected[0, 0] = 0.75 + 0.25 * -3.0  # 0.0
    assert torch.equal(proj.detach(), expected)
    assert torch.equal(model.net.visual.conv1.weight, other)
    assert torch.equal(tuning.anchor["visual.proj"], torch.ones_like(proj))  # the anchor is only read
    # without wise_alpha: no anchor, end_task changes nothing
    off = FineTuning("visual.proj", lr=1e-3)
    off.attach(model)
    before = proj.detach().clone()
    off.end_task(model)
    assert off.anchor is None and torch.equal(proj.detach(), before)


def test_wise_anchor_state_round_trip_and_refusals():
    model = make_tiny_clip()
    model.freeze()
    a = FineTuning("visual.proj", lr=1e-3, wise_alpha=0.5)
    a.attach(model)
    state = copy.deepcopy(a.state_dict())
    with torch.no_grad():
        model.net.visual.proj.add_(1.0)  # a later attach would snapshot these moved weights...
    b = FineTuning("visual.proj", lr=1e-3, wise_alpha=0.5)
    b.attach(model)
    b.load_state_dict(state)  # ...but a checkpoint brings the original anchor
    assert torch.equal(b.anchor["visual.proj"], a.anchor["visual.proj"])
    c = FineTuning("visual.", lr=1e-3, wise_alpha=0.5)
    c.attach(make_tiny_clip())
    kept = {k: v.clone() for k, v in c.anchor.items()}
    with pytest.raises(ValueError, match="does not match"):
        c.load_state_dict(state)
    assert all(torch.equal(kept[k], v) for k, v in c.anchor.items())  # a refused load changed nothing
    with pytest.raises(ValueError, match="wise_alpha"):
        FineTuning("visual.proj", lr=1e-3).load_state_dict(state)


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_reset_per_task(reset, tiny_stream):
    s = Finetune("visual.proj", lr=0.1, warmup=0, iterations=2, batch_size=8, reset_optimizer_per_task=reset)
    s.setup(make_tiny_clip())
    images, labels = batch()
    space0, _ = tiny_stream.train_space(0)
    s.begin_task(tiny_stream.tasks[0], space0)
    first = s.optimizer
    for _ in range(2):
        s.learn(images, labels, space0)
    moments = first.state[s.tuning.trainable[0]]["exp_avg"].clone()
    assert first.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ran down to 0
    s.end_task(tiny_stream.tasks[0], space0)
    space1, _ = tiny_stream.train_space(1)
    s.begin_task(tiny_stream.tasks[1], space1)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the schedule restarts at lr either way
    state = s.optimizer.state.get(s.tuning.trainable[0], {})
    if reset:
        assert s.optimizer is not first and state == {}
    else:
        assert s.optimizer is first and torch.equal(state["exp_avg"], moments) and int(state["step"]) == 2
    s.learn(images, labels, space1)
    assert int(s.optimizer.state[s.tuning.trainable[0]]["step"]) == (1 if reset else 3)


def test_mid_task_state_continues_the_same_schedule(tiny_stream):
    """A strategy set up afresh and loaded mid-task continues the saved schedule (its length travels in the
    scheduler's state), so its weights follow the uninterrupted run's exactly."""
    make = lambda: Finetune("visual.", lr=0.05, warmup=1, iterations=5, batch_size=8)  # noqa: E731
    images, labels = batch()
    space, _ = tiny_stream.train_space(0)
    a_model, a = make_tiny_clip(), make()
    a.setup(a_model)
    a.begin_task(tiny_stream.tasks[0], space)
    for _ in range(2):
        a.learn(images, labels, space)
    b_model, b = make_tiny_clip(), make()
    b.setup(b_model)
    b_model.net.load_state_dict(copy.deepcopy(a_model.net.state_dict()))
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(3):
        a.learn(images, labels, space)
        b.learn(images, labels, space)
        assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    assert a.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    for (n, p), q in zip(a_model.net.named_parameters(), b_model.net.parameters()):
        assert torch.equal(p, q), n


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="schedule"):
        Finetune(schedule="linear")
    with pytest.raises(ValueError, match="warmup"):
        LwF(warmup=-1)
    with pytest.raises(ValueError, match="lr"):
        VRLwF(lr=0.0)
    with pytest.raises(ValueError, match="alpha"):
        LwF(wise_alpha=1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        Finetune(label_smoothing=-0.1)
    with pytest.raises(ValueError, match="selected no parameters"):
        Finetune("no_such_prefix.").setup(make_tiny_clip())


@pytest.mark.parametrize("cls", [Finetune, LwF, VRLwF, LoRA, RankSelectiveLoRA])
def test_epochs_zero_without_iterations_is_refused(cls):
    # epochs=0 would train nothing and report zero-shot results under the strategy's name
    with pytest.raises(ValueError, match="epochs"):
        cls(epochs=0, iterations=None)
    cls(epochs=0, iterations=3)  # a fixed number of steps does not need epochs


@pytest.mark.parametrize("cls", [Finetune, LwF, VRLwF])
def test_learn_refuses_labels_that_do_not_index_the_space(cls):
    """-100 is cross-entropy's ignore index: without the check a batch of them gave a NaN loss and a mixed one
    trained on part of the batch without a word."""
    from ctta import LabelSpace
    space = LabelSpace(["a", "b", "c"])
    s = cls(lr=1e-3, iterations=1)
    s.setup(make_tiny_clip())
    x = torch.rand(4, 3, 16, 16)
    for bad, match in [(torch.tensor([0, 1, -100, -100]), r"\[-100, 1\]"), (torch.tensor([0, 1, 2, 3]), r"\[0, 3\]"),
                       (torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer"), (torch.tensor([0, 1]), r"shape \[4\]")]:
        with pytest.raises((ValueError, TypeError), match=match):
            s.learn(x, bad, space)
    assert s.steps == 0


def test_a_skipped_step_leaves_the_batchnorm_running_statistics():
    """On a BatchNorm tower, full fine-tuning folds each batch into the running statistics during the forward; when
    the loss is non-finite the step is skipped, and the statistics must be as they were too."""
    from ctta import LabelSpace
    from tests._resnet import RESNET_SIZE, make_resnet_clip
    clip = make_resnet_clip()
    space = LabelSpace(["a", "b"])
    s = Finetune(lr=1e-3, iterations=2)
    s.setup(clip)
    x, y = torch.rand(4, 3, RESNET_SIZE, RESNET_SIZE), torch.tensor([0, 1, 0, 1])
    before = {k: v.clone() for k, v in clip.net.state_dict().items()}
    s.tuning.class_logits = lambda *a: torch.full((4, 2), float("nan"))  # a head that overflowed
    s.learn(x, y, space)
    assert s.skipped_steps == 1
    after = clip.net.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    del s.tuning.class_logits
    s.learn(x, y, space)  # a finite step does fold the batch in
    assert not torch.equal(clip.net.visual.bn1.running_mean, before["visual.bn1.running_mean"])
