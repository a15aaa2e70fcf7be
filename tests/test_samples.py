"""Sample streams: labels never reach adapt, boundary handling, online metric hooks, resume equivalence."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ctta import Clip, JsonResults, LabelSpace, Task, TaskStream
from ctta.io import safe_torch_load
from ctta.online_hooks import Latency, Memory, OnlineAccuracy
from ctta.loop.samples import CHECKPOINT, run_samples
from ctta.strategies.tent import Tent
from tests.conftest import TINY_CONFIG, make_dataset, make_tiny_clip

SPACE = LabelSpace([f"class {i}" for i in range(4)])


def stream(boundary: bool, n_tasks: int = 3, n: int = 12) -> TaskStream:
    tasks = [Task(f"domain{k}", SPACE, make_dataset(n, 4, seed=10 + k), boundary=boundary) for k in range(n_tasks)]
    return TaskStream(tasks, scope="own", name=f"toy-{'reset' if boundary else 'continual'}")


class Spy(Tent):
    """TENT that records what reaches it."""

    def __init__(self):
        super().__init__(lr=1e-2)
        self.adapt_args, self.begun, self.ended = [], [], []

    def adapt(self, *args, **kwargs):
        self.adapt_args.append((args, kwargs))
        return super().adapt(*args, **kwargs)

    def learn(self, *args, **kwargs):  # pragma: no cover - must never run
        raise AssertionError("learn() called on a sample stream")

    def begin_task(self, task, space):
        self.begun.append(task.name)

    def end_task(self, task, space):
        self.ended.append(task.name)


class Resets:
    """Reads how often the adapter (the one owner of reset) restored its anchor."""

    def on_run_end(self, ctx):
        self.count = ctx.adapter.resets


def test_labels_never_reach_adapt_and_batches_are_in_order():
    s = stream(boundary=False)
    spy = Spy()
    run_samples(make_tiny_clip(), spy, s, batch_size=5)
    assert [len(a[0][0]) for a in spy.adapt_args] == [5, 5, 2] * 3  # batch size honoured, per domain
    for args, kwargs in spy.adapt_args:
        assert not kwargs and len(args) == 2
        images, space = args
        assert images.is_floating_point() and images.shape[1:] == (3, 16, 16) and space == SPACE
    first = s.tasks[0].test.get_batch(torch.arange(5))[0]
    assert torch.equal(spy.adapt_args[0][0][0], first)


def test_run_dispatches_streams_without_training_data_to_the_sample_loop():
    from ctta import run
    spy = Spy()
    res = run(make_tiny_clip(), spy, stream(boundary=False), [OnlineAccuracy()], samples={"batch_size": 6})
    assert len(spy.adapt_args) == 6 and res["online"]["n"] == 36


def test_revealed_boundaries_reset_and_begin_hidden_ones_do_nothing():
    spy, r = Spy(), Resets()
    run_samples(make_tiny_clip(), spy, stream(boundary=True), [r], batch_size=4)
    assert spy.begun == spy.ended == ["domain0", "domain1", "domain2"] and r.count == 3
    spy, r = Spy(), Resets()
    run_samples(make_tiny_clip(), spy, stream(boundary=True), [r], batch_size=4, reset_on_shift=False)
    assert spy.begun == ["domain0", "domain1", "domain2"] and r.count == 0
    spy, r = Spy(), Resets()
    run_samples(make_tiny_clip(), spy, stream(boundary=False), [r], batch_size=4)
    assert spy.begun == spy.ended == [] and r.count == 0


def test_reset_at_shift_restores_the_anchor_for_strategies_without_reset():
    # with a reset at every revealed shift, each domain starts from the pristine model: domain k's first
    # prediction equals a fresh TENT's prediction on that batch
    s = stream(boundary=True)
    logged = []
    hook = SimpleNamespace(on_batch_end=lambda ctx: logged.append((ctx.task_position, ctx.logits.clone())))
    run_samples(make_tiny_clip(), Tent(lr=5e-2), s, [hook], batch_size=4)
    firsts = [lg for pos, lg in logged if pos == 4]
    for k, task in enumerate(s.tasks):
        fresh = Tent()
        fresh.setup(make_tiny_clip())
        assert torch.allclose(firsts[k], fresh.predict(task.test.get_batch(torch.arange(4))[0], SPACE), atol=1e-6)
    assert not torch.allclose(logged[1][1], logged[4][1])  # and it did adapt within a domain


def test_world_shift_stream_settings_reveal_or_hide_boundaries():
    from streams.world import shift_tasks
    cfg = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 32}}
    torch.manual_seed(0)
    clip = Clip.from_config(cfg, name="tiny-test-32")
    for setting, revealed in (("reset", True), ("continual", False)):
        s = shift_tasks(["gaussian_noise", "contrast"], 3, per_class=1, setting=setting)
        assert [t.boundary for t in s.tasks] == [revealed, revealed] and all(t.train is None for t in s.tasks)
        spy = Spy()
        res = run_samples(clip, spy, s, [OnlineAccuracy()], batch_size=50)
        assert len(spy.begun) == (2 if revealed else 0) and res["online"]["n"] == 200


# --------------------------------------------------------------------------------------------- metric hooks
def _batch(task: str, probs: list[list[float]], labels: list[int]):
    return SimpleNamespace(task=SimpleNamespace(name=task), logits=torch.tensor(probs).log(),
                           labels=torch.tensor(labels), results={})


def test_online_accuracy_and_ece_on_hand_computed_predictions():
    hook = OnlineAccuracy()
    # domain a: one confident correct prediction; domain b: confident wrong, then two correct ones
    a = _batch("a", [[0.92, 0.04, 0.02, 0.02]], [0])
    b = _batch("b", [[0.92, 0.04, 0.02, 0.02], [0.2, 0.62, 0.1, 0.08], [0.33, 0.32, 0.2, 0.15]], [1, 1, 0])
    for ctx in (a, b):
        hook.on_batch_end(ctx)
    hook.on_run_end(b)
    r = b.results["online"]
    assert r["per_domain"]["a"]["accuracy"] == 1.0 and r["per_domain"]["b"]["accuracy"] == pytest.approx(2 / 3)
    assert r["cumulative_accuracy"] == 0.75 and r["mean_domain_accuracy"] == pytest.approx(5 / 6)
    # 20 bins: {0.92, 0.92} acc 1/2 -> 2/4*0.42; {0.62} acc 1 -> 1/4*0.38; {0.33} acc 1 -> 1/4*0.67
    assert r["ece"] == pytest.approx(0.21 + 0.095 + 0.1675, abs=1e-6) and r["ece_bins"] == 20
    assert r["per_domain"]["a"]["ece"] == pytest.approx(0.08, abs=1e-6)
    assert r["per_domain"]["b"]["ece"] == pytest.approx((0.92 + 0.38 + 0.67) / 3, abs=1e-6)
    copy = OnlineAccuracy()
    copy.load_state_dict(hook.state_dict())
    assert copy.summary() == r


def test_online_accuracy_by_stretch_of_each_domain():
    hook = OnlineAccuracy(parts=4)
    right = [[0.9, 0.1], [0.1, 0.9]]
    # domain a, 8 samples: wrong, wrong | right, wrong | right, right | right, right (label 1 = right here)
    for k in (0, 0, 1, 0, 1, 1, 1, 1):
        hook.on_batch_end(_batch("a", [right[k]], [1]))
    # domain b, 3 samples into 4 stretches of sizes 1, 1, 1, 0: the empty last stretch has no accuracy
    ctx = _batch("b", [right[1], right[0], right[1]], [1, 1, 1])
    hook.on_batch_end(ctx)
    hook.on_run_end(ctx)
    per = ctx.results["online"]["per_domain"]
    assert per["a"]["accuracy_by_part"] == [0.0, 0.5, 1.0, 1.0] and per["a"]["accuracy"] == 0.625
    assert per["b"]["accuracy_by_part"] == [1.0, 0.0, 1.0, None] and ctx.results["online"]["parts"] == 4
    with pytest.raises(ValueError, match="parts"):
        OnlineAccuracy(parts=0)


def test_latency_percentiles_and_throughput():
    hook = Latency(warmup=1)
    for sec, n in ((5.0, 1), (0.001, 1), (0.002, 1), (0.008, 2)):  # the 5 s call is warm-up
        hook.on_batch_end(SimpleNamespace(seconds=sec, labels=torch.zeros(n)))
    r = hook.summary()  # per-sample ms: 1, 2, 4, 4
    assert r["p50_ms"] == pytest.approx(3.0) and r["p95_ms"] == pytest.approx(4.0)
    assert r["mean_ms"] == pytest.approx(2.75) and r["samples_per_s"] == pytest.approx(4 / 0.011)
    assert r["samples"] == 4 and r["calls"] == 3


def test_memory_trace_first_and_last_tenth():
    hook = Memory(every=2)
    hook.on_run_start(SimpleNamespace(model=SimpleNamespace(device=torch.device("cpu"))))
    for pos in range(1, 41):
        hook.on_batch_end(SimpleNamespace(position=pos, labels=torch.zeros(1)))
    r = hook.summary()
    assert r["rss"]["points"] == 20 and r["peak_rss_mb"] >= r["rss"]["max_mb"] > 0
    assert r["rss"]["growth_mb"] == pytest.approx(r["rss"]["last_10pct_mb"] - r["rss"]["first_10pct_mb"])


# --------------------------------------------------------------------------------------------- resume
class NoisyTent(Tent):
    """TENT on images with a little noise from the global torch RNG, so that resuming must restore the RNG."""

    def adapt(self, images, space):
        return super().adapt((images + 0.05 * torch.randn_like(images)).clamp(0, 1), space)


class Kill:
    def __init__(self, at: int | None):
        self.at = at

    def on_batch_end(self, ctx) -> None:
        if self.at is not None and ctx.position >= self.at:
            raise KeyboardInterrupt(f"killed at sample {ctx.position}")


def _run(out_dir, kill_at=None):
    hooks = [OnlineAccuracy(), Latency(), Kill(kill_at), JsonResults(plot=False)]
    model = make_tiny_clip()
    results = run_samples(model, NoisyTent(lr=5e-2), stream(boundary=True), hooks, batch_size=2, out_dir=out_dir,
                          checkpoint_every=5, seed=3)
    return results, model.trainable_state()


def test_killed_sample_stream_resumes_to_identical_metrics(tmp_path):
    full, full_state = _run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "killed", kill_at=23)  # checkpoints at 6, 12, 18; killed at 24, before its checkpoint
    ck = safe_torch_load(tmp_path / "killed" / CHECKPOINT)
    assert ck["position"] == 18 and (ck["task"], ck["offset"]) == (1, 6)  # resumes in the middle of domain1
    resumed, resumed_state = _run(tmp_path / "killed")
    assert resumed["online"] == full["online"]
    assert resumed["latency"]["samples"] == full["latency"]["samples"] == 36
    assert all(torch.equal(resumed_state[k], full_state[k]) for k in full_state)
    doc = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert doc["finished"] and doc["results"]["online"]["n"] == 36
    with pytest.raises(ValueError, match="different run"):
        run_samples(make_tiny_clip(), NoisyTent(), stream(boundary=True), [OnlineAccuracy(), Latency(), Kill(None),
                    JsonResults()], batch_size=4, out_dir=tmp_path / "killed")



def test_online_accuracy_curve_is_cumulative_accuracy_at_stream_positions():
    correct = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    c = OnlineAccuracy.curve(correct, points=3)  # every 3 samples, and the last one
    assert c["every"] == 3 and c["position"] == [3, 6, 7]
    assert c["cumulative_accuracy"] == pytest.approx([2 / 3, 3 / 6, 4 / 7])
    assert OnlineAccuracy.curve(correct, points=100)["position"] == [1, 2, 3, 4, 5, 6, 7]


def test_a_batch_smaller_than_the_strategy_needs_is_refused_before_any_sample(tmp_path):
    """TENT on a BatchNorm tower needs 2 images per call: samples.batch_size=1 used to fail mid-run."""
    from tests._resnet import RESNET_SIZE, make_resnet_clip
    data = [Task(f"d{k}", SPACE, make_dataset(6, 4, seed=k, size=RESNET_SIZE)) for k in range(2)]
    with pytest.raises(ValueError, match=r"samples.batch_size=1, but Tent needs 2 images per call"):
        run_samples(make_resnet_clip(), Tent(), TaskStream(data, scope="own", name="toy"), batch_size=1,
                    out_dir=tmp_path / "r")
    assert not (tmp_path / "r" / CHECKPOINT).exists()


def test_a_test_time_strategy_on_a_training_stream_is_refused_with_the_fix(tiny_stream):
    from ctta import Strategy
    from ctta.loop.tasks import run_tasks

    class OnlyAdapts(Strategy):  # no learn(), and learns left at its default (True)
        def adapt(self, images, space):
            return self.predict(images, space)

    with pytest.raises(ValueError, match="does not implement learn\\(\\).*learns = False"):
        run_tasks(make_tiny_clip(), OnlyAdapts(), tiny_stream)
