"""The task-stream runner: resume equivalence, the non-finite guard, hook dispatch, results files."""
import json

import pytest
import torch

from ctta import AccuracyMatrix, JsonResults, Strategy, ZeroShotRetention, run
from ctta.io import safe_torch_load
from ctta.strategies import Finetune, ZeroShot
from tests.conftest import make_tiny_clip


class Killer:
    """A hook that simulates a crash at the start of a given task."""

    def __init__(self, at: int):
        self.at = at

    def on_task_start(self, ctx):
        if ctx.task_index == self.at:
            raise KeyboardInterrupt("simulated kill")


def _hooks(stream):
    return [AccuracyMatrix(), ZeroShotRetention([stream.tasks[0]]), JsonResults()]


def test_resume_ends_with_the_results_of_an_uninterrupted_run(tmp_path, tiny_stream):
    def strategy():
        return Finetune(lr=1e-3, epochs=2, batch_size=8)

    full = run(make_tiny_clip(), strategy(), tiny_stream, _hooks(tiny_stream), out_dir=tmp_path / "a",
               seed=3, progress=False)
    hooks = _hooks(tiny_stream) + [Killer(at=2)]
    with pytest.raises(KeyboardInterrupt):
        run(make_tiny_clip(), strategy(), tiny_stream, hooks, out_dir=tmp_path / "b", seed=3, progress=False)
    assert safe_torch_load(tmp_path / "b" / "checkpoint.pt")["next_task"] == 2
    model = make_tiny_clip()
    resumed = run(model, strategy(), tiny_stream, _hooks(tiny_stream) + [Killer(at=99)], out_dir=tmp_path / "b",
                  seed=3, progress=False)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["retention"] == full["retention"]
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["results"]["metrics"] == b["results"]["metrics"] and b["finished"]


def test_resume_refuses_a_different_run(tmp_path, tiny_stream):
    run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix()], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different run"):
        run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix()], out_dir=tmp_path, seed=5,
            progress=False)


def test_results_file_has_provenance_and_plot(tmp_path, tiny_stream):
    run(make_tiny_clip(), ZeroShot(), tiny_stream, _hooks(tiny_stream), out_dir=tmp_path, seed=1,
        config={"note": "x"}, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    prov = doc["provenance"]
    assert prov["packages"]["torch"] and prov["packages"]["open_clip_torch"]
    assert prov["model"]["arch"] == "tiny-test" and prov["seed"] == 1 and prov["config"] == {"note": "x"}
    assert prov["device"].startswith("cpu")
    assert (tmp_path / "results.png").stat().st_size > 1000
    R = doc["results"]["accuracy_matrix"]
    assert len(R) == 3 and all(len(r) == 3 for r in R)
    # zero-shot: nothing trains, so every row is identical on tasks evaluated in the same space
    assert doc["results"]["metrics"]["forgetting"] >= 0


def test_hooks_are_dispatched_in_order_with_all_five_events(tiny_stream):
    seen = []

    class Spy:
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda ctx: seen.append((name, ctx.task_index))
            raise AttributeError(name)

    run(make_tiny_clip(), Finetune(epochs=1, batch_size=16), tiny_stream, [Spy()], progress=False)
    events = [e for e, _ in seen]
    assert events[0] == "on_run_start" and events[-1] == "on_run_end"
    assert events.count("on_task_start") == 3 and events.count("on_task_end") == 3
    assert events.count("on_batch_end") == 3 * 2  # 20 training images per task, batch 16


def test_iterations_override_epochs(tiny_stream):
    s = Finetune(iterations=5, batch_size=8)
    run(make_tiny_clip(), s, tiny_stream, progress=False)
    assert s.steps == 15


class NaNStrategy(Strategy):
    """Trains the visual tower but its loss is NaN on every other step."""

    def setup(self, model):
        super().setup(model)
        self.optimizer = torch.optim.AdamW(model.unfreeze("visual."), lr=1e-2)
        self.calls = 0

    def learn(self, images, labels, space):
        m = self.model
        logits = m.logits(m.encode_image(images), m.text_head(space))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        self.calls += 1
        if self.calls % 2 == 0:
            loss = loss * float("nan")
        self.step(loss)
        return {}


def test_non_finite_loss_never_corrupts_the_model(tiny_stream):
    model = make_tiny_clip()
    s = NaNStrategy(batch_size=8)
    run(model, s, tiny_stream, progress=False)
    assert s.skipped_steps == s.calls // 2 and s.steps == s.calls - s.skipped_steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # a NaN step alone leaves parameters and optimizer state exactly as they were
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    opt_before = s.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    x = torch.rand(4, 3, 16, 16)
    loss = model.encode_image(x).sum() * float("inf")
    assert not s.step(loss)
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
    assert torch.equal(s.optimizer.state_dict()["state"][0]["exp_avg"], opt_before)


def test_finetune_learns_the_tiny_stream(tiny_stream):
    res = run(make_tiny_clip(), Finetune(lr=1e-3, epochs=15, batch_size=10), tiny_stream, [AccuracyMatrix()],
              progress=False)
    zs = run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix()], progress=False)
    # each task is learned while it is current (diagonal well above zero-shot's)
    R, R0 = res["accuracy_matrix"], zs["accuracy_matrix"]
    assert sum(R[i][i] for i in range(3)) > sum(R0[i][i] for i in range(3)) + 0.3
