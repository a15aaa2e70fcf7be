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
    killed = safe_torch_load(tmp_path / "b" / "checkpoint.pt")
    assert killed["next_task"] == 2 and len(killed["results"]["timing"]["train_s"]) == 2
    model = make_tiny_clip()
    resumed = run(model, strategy(), tiny_stream, _hooks(tiny_stream) + [Killer(at=99)], out_dir=tmp_path / "b",
                  seed=3, progress=False)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert resumed["retention"] == full["retention"]
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["results"]["metrics"] == b["results"]["metrics"] and b["finished"]
    # seconds per task: the resumed run keeps the two tasks it did not run again and adds the rest
    n = len(tiny_stream)
    for doc, res in ((a, full), (b, resumed)):
        t = doc["results"]["timing"]
        assert len(t["train_s"]) == len(t["evaluate_s"]) == n and min(t["train_s"] + t["evaluate_s"]) >= 0
        assert t["wall_s"] == pytest.approx(sum(t["train_s"]) + sum(t["evaluate_s"]), abs=0.01)
        assert t["train_s"][0] > 0 and res["timing"] == t  # Finetune trains every task
    assert b["results"]["timing"]["train_s"][:2] == killed["results"]["timing"]["train_s"]


def test_resume_refuses_a_different_run(tmp_path, tiny_stream):
    run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix()], out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different run"):
        run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix()], out_dir=tmp_path, seed=5,
            progress=False)


def test_resume_refuses_another_class_order_training_set_or_model(tmp_path):
    """A resume used to accept a stream with another class order or other training images (the fingerprint held
    task names and test sizes only), mixing two runs in one results file, and another model ended in a traceback."""
    from ctta import LabelSpace, class_incremental
    from ctta.loop.checkpoint import RunMismatch
    from tests.conftest import make_dataset
    space = LabelSpace([f"class {i}" for i in range(6)])

    def stream(order_seed=1, n_train=60):
        return class_incremental(space, make_dataset(n_train, 6, seed=1), make_dataset(30, 6, seed=2), increment=2,
                                 seed=order_seed)

    run(make_tiny_clip(), ZeroShot(), stream(), [AccuracyMatrix()], out_dir=tmp_path, progress=False)
    for other, match in ((stream(order_seed=7), "task cil/t0: other classes"),
                         (stream(n_train=66), "task cil/t0: training set of 20 -> 22 images")):
        with pytest.raises(RunMismatch, match=match):
            run(make_tiny_clip(), ZeroShot(), other, [AccuracyMatrix()], out_dir=tmp_path, progress=False)
    from ctta import Clip
    from tests.conftest import TINY_CONFIG
    other_model = Clip.from_config(TINY_CONFIG, name="tiny-other")  # another architecture name
    with pytest.raises(RunMismatch, match="model"):
        run(other_model, ZeroShot(), stream(), [AccuracyMatrix()], out_dir=tmp_path, progress=False)


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


def test_code_revision_is_read_once_and_names_uncommitted_code(tmp_path, monkeypatch):
    import subprocess

    import ctta.io as io
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "one"]):
        subprocess.run(git + cmd, cwd=repo, check=True)
    monkeypatch.setattr(io, "__file__", str(repo / "pkg" / "io.py"))  # read the revision of this checkout
    monkeypatch.setattr(io, "_REVISION", {})
    first = io.code_revision()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert first == {"git_commit": head, "git_dirty": False}
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    subprocess.run(git + ["commit", "-qam", "two"], cwd=repo, check=True)  # committed while the run goes on
    assert io.code_revision() == first and io.provenance()["git_commit"] == head  # pinned at the first call
    (repo / "pkg" / "mod.py").write_text("x = 3\n")
    monkeypatch.setattr(io, "_REVISION", {})
    assert io.code_revision()["git_dirty"] is True  # a run of uncommitted code says so
    monkeypatch.setattr(io, "__file__", str(tmp_path / "elsewhere" / "io.py"))
    monkeypatch.setattr(io, "_REVISION", {})
    assert io.code_revision() == {"git_commit": None, "git_dirty": None}  # not a checkout (an installed wheel)


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


class Negated(ZeroShot):
    """A strategy whose predictions differ from zero-shot from the moment it is set up (as RAPF's adapter does)."""

    def setup(self, model):
        super().setup(model)
        self.touched = True

    def predict(self, images, space):
        return -super().predict(images, space)


def test_retention_baseline_is_the_untouched_models_zero_shot(tiny_stream):
    from ctta import LabelSpace, Task
    from ctta.hooks import ZeroShotPredictor, evaluate
    from tests.conftest import make_dataset
    control = Task("six-way", LabelSpace([f"class {i}" for i in range(6)]), make_dataset(60, 6, seed=5))
    model = make_tiny_clip()
    expected = evaluate(ZeroShotPredictor(model), control.test, control.space)["accuracy"]
    seen = {}

    class Probe:  # on_run_start comes before the strategy is set up
        def on_run_start(self, ctx):
            seen["touched"] = getattr(ctx.strategy, "touched", False)

    neg = Negated(cache=False)
    neg.setup(make_tiny_clip())
    through_strategy = evaluate(neg, control.test, control.space)["accuracy"]
    assert through_strategy != pytest.approx(expected)  # the old baseline (through the strategy) would differ
    hook = ZeroShotRetention([control])
    run(model, Negated(cache=False), tiny_stream, [Probe(), hook], progress=False)
    assert not seen["touched"]
    assert hook.acc0[control.name] == pytest.approx(expected)
    assert hook.history[control.name][0] == pytest.approx(through_strategy)


def test_retention_compares_like_with_like_prompts_and_never_averages_nan(tiny_stream):
    """A strategy's own templates (ZeroShot's, RAPF's) used to apply to the controls after the run but not to the
    baseline, so a frozen model showed a retention change; and a control at 0 % before turned the mean ratio NaN."""
    from ctta import LabelSpace, Task
    from tests.conftest import make_dataset
    controls = [Task(f"c{k}", LabelSpace([f"class {i}" for i in range(6)]), make_dataset(60, 6, seed=5 + k))
                for k in range(2)]
    hook = ZeroShotRetention(controls)
    run(make_tiny_clip(), ZeroShot(templates=["a bad photo of a {}."], cache=False), tiny_stream, [hook],
        progress=False)
    for c in controls:  # nothing was trained: the same accuracy before and after
        assert hook.history[c.name][-1] == pytest.approx(hook.acc0[c.name])

    class Ctx:
        results: dict = {}
    hook.acc0, hook.history = {"c0": 0.0, "c1": 0.5}, {"c0": [0.1], "c1": [0.25]}
    hook._write(Ctx)
    r = Ctx.results["retention"]
    assert r["tasks"]["c0"]["ratio"] == [None] and r["mean_ratio"] == pytest.approx(0.5)
    assert r["mean_drop"] == pytest.approx((-0.1 + 0.25) / 2)


def test_rapf_retention_ratio_is_measured_against_zero_shot(tiny_stream):
    from ctta.hooks import ZeroShotPredictor, evaluate
    from ctta.strategies import RAPF
    hook = ZeroShotRetention([tiny_stream.tasks[0]])
    res = run(make_tiny_clip(), RAPF(epochs=1, batch_size=8, cache=False, replay_classes=1), tiny_stream, [hook],
              progress=False)
    acc0 = hook.acc0[tiny_stream.tasks[0].name]
    model = make_tiny_clip()
    assert acc0 == pytest.approx(evaluate(ZeroShotPredictor(model), tiny_stream.tasks[0].test,
                                          tiny_stream.tasks[0].space)["accuracy"])
    assert 0 <= res["retention"]["mean_ratio"] <= 1 / max(acc0, 1e-9)


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, tiny_stream):
    import os
    if os.geteuid() == 0:  # root ignores permission bits: block the folder with a file instead
        target = tmp_path / "file"
        target.write_text("x")
        out = target / "run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "run"
    trained = []

    class Spy(Finetune):
        def learn(self, *a, **k):
            trained.append(1)
            return super().learn(*a, **k)

    with pytest.raises(PermissionError, match="cannot write results to"):
        run(make_tiny_clip(), Spy(lr=1e-3, batch_size=8), tiny_stream, [JsonResults()], out_dir=out, progress=False)
    assert not trained


def test_a_finished_run_is_not_redone_and_a_foreign_one_names_the_differences(tmp_path, tiny_stream):
    run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix(), JsonResults()], out_dir=tmp_path, seed=1,
        progress=False)
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    calls = []

    class Count(AccuracyMatrix):
        def on_task_end(self, ctx):
            calls.append(1)
            super().on_task_end(ctx)

    again = run(make_tiny_clip(), ZeroShot(), tiny_stream, [Count(), JsonResults()], out_dir=tmp_path, seed=1,
                progress=False)
    assert not calls and again["accuracy_matrix"] and (tmp_path / "results.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"seed: 1 -> 2"):
        run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix(), JsonResults()], out_dir=tmp_path, seed=2,
            progress=False)
    with pytest.raises(ValueError, match=r"cache: True -> False"):
        run(make_tiny_clip(), ZeroShot(cache=False), tiny_stream, [AccuracyMatrix(), JsonResults()],
            out_dir=tmp_path, seed=1, progress=False)


# ------------------------------------------------------------------ one read of the checkpoint per resume (#21)
def _run_folder(out):
    """scripts/runfolder.py's `RunFolder` (a script beside run.py, not a package module)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "runfolder.py"
    spec = importlib.util.spec_from_file_location("runfolder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class CheckOnly(module.RunFolder):
        def check_resume(self, *args, **kwargs):
            try:
                super().check_resume(*args, **kwargs)
            finally:  # these tests play only the check; run.py holds the lock until its run ends
                if self.lock is not None:
                    self.lock.release()

    return CheckOnly(out)


@pytest.fixture
def counted_reads(monkeypatch):
    """The paths `Checkpoint.read` hashes and unpickles, in order (a spy on its one file-reading call)."""
    from ctta.loop import checkpoint
    reads, real = [], checkpoint.safe_torch_load

    def spy(path, map_location="cpu"):
        reads.append(path)
        return real(path, map_location=map_location)

    monkeypatch.setattr(checkpoint, "safe_torch_load", spy)
    yield reads
    assert not checkpoint._held  # nothing is left held after a test


def test_a_resume_reads_its_checkpoint_once(tmp_path, tiny_stream, counted_reads, caplog):
    """run.py's early fingerprint check (`RunFolder.check_resume`) and the loop's resume share one read of the file,
    and the resumed run still ends with the uninterrupted run's results."""
    def strategy():
        return Finetune(lr=1e-3, epochs=1, batch_size=8)

    full = run(make_tiny_clip(), strategy(), tiny_stream, _hooks(tiny_stream), out_dir=tmp_path / "a", seed=3,
               progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(make_tiny_clip(), strategy(), tiny_stream, _hooks(tiny_stream) + [Killer(at=2)], out_dir=tmp_path / "b",
            seed=3, progress=False)
    assert not counted_reads  # fresh runs read nothing
    s = strategy()
    _run_folder(tmp_path / "b").check_resume(tiny_stream, s, 3, {})
    assert counted_reads == [tmp_path / "b" / "checkpoint.pt"]
    with caplog.at_level("INFO", logger="ctta"):
        resumed = run(make_tiny_clip(), s, tiny_stream, _hooks(tiny_stream) + [Killer(at=99)],
                      out_dir=tmp_path / "b", seed=3, progress=False)
    assert counted_reads == [tmp_path / "b" / "checkpoint.pt"]  # the loop took the state the check read
    assert "after task 2/3" in caplog.text
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"] and resumed["retention"] == full["retention"]


def test_a_checkpoint_changed_after_the_early_check_is_read_again(tmp_path, tiny_stream, counted_reads, caplog):
    """The held state is taken only for the same, unchanged file; a refused or abandoned one is not kept."""
    import os
    from ctta.loop import checkpoint
    run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix()], out_dir=tmp_path, seed=1, progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    s = ZeroShot()
    _run_folder(tmp_path).check_resume(tiny_stream, s, 1, {})
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten meanwhile (same bytes here)
    with caplog.at_level("INFO", logger="ctta"):
        again = run(make_tiny_clip(), s, tiny_stream, [AccuracyMatrix()], out_dir=tmp_path, seed=1, progress=False)
    assert counted_reads == [ckpt, ckpt] and again["accuracy_matrix"]
    assert "run already finished (3 tasks): nothing to do" in caplog.text
    # a foreign checkpoint is refused by the early check and not held
    with pytest.raises(checkpoint.RunMismatch, match=r"seed: 1 -> 2"):
        _run_folder(tmp_path).check_resume(tiny_stream, ZeroShot(), 2, {})
    assert not checkpoint._held
    # a set-up that fails after the check (before the loop) lets the held state go when the folder closes
    folder = _run_folder(tmp_path)
    folder.check_resume(tiny_stream, ZeroShot(), 1, {})
    assert ckpt in checkpoint._held
    folder.close()
    assert not checkpoint._held


def test_a_sample_stream_resume_reads_its_checkpoint_once(tmp_path, counted_reads):
    """The same for a sample stream: the early check uses the sample loop's fingerprint (batch size, reset policy),
    the loop takes its state (adapter, RNG) and ends with the uninterrupted run's metrics."""
    from ctta.loop.samples import CHECKPOINT, run_samples
    from ctta.online_hooks import OnlineAccuracy
    from tests.test_samples import Kill, NoisyTent, stream

    def go(out, kill_at=None, strategy=None):
        return run_samples(make_tiny_clip(), strategy or NoisyTent(lr=5e-2), stream(boundary=True),
                           [OnlineAccuracy(), Kill(kill_at)], batch_size=2, out_dir=out, checkpoint_every=5, seed=3)

    full = go(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "killed", kill_at=23)
    s = NoisyTent(lr=5e-2)
    _run_folder(tmp_path / "killed").check_resume(stream(boundary=True), s, 3, {"batch_size": 2})
    resumed = go(tmp_path / "killed", strategy=s)
    assert counted_reads == [tmp_path / "killed" / CHECKPOINT]
    assert resumed["online"] == full["online"]


class _KillAtRunEnd:
    """A kill after the final checkpoint, before the end-of-run writes (placed before JsonResults)."""

    def __init__(self, armed: bool = True):
        self.armed = armed

    def on_run_end(self, ctx):
        if self.armed:
            raise KeyboardInterrupt("simulated kill before the final results")


@pytest.mark.parametrize("damage", ["kill", "truncate", "no_png"])
def test_a_finished_run_started_again_rewrites_final_results_a_kill_cut_short(tmp_path, tiny_stream, damage):
    def go(armed=False):
        return run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix(), _KillAtRunEnd(armed), JsonResults()],
                   out_dir=tmp_path, seed=1, progress=False)

    if damage == "kill":
        with pytest.raises(KeyboardInterrupt):
            go(armed=True)
        assert json.loads((tmp_path / "results.json").read_text())["finished"] is False
    else:
        go()
        if damage == "truncate":
            (tmp_path / "results.json").write_text('{"finished": tr')
        else:
            (tmp_path / "results.png").unlink()
    again = go()
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["finished"] is True and doc["results"]["accuracy_matrix"] == again["accuracy_matrix"]
    assert (tmp_path / "results.png").exists()
    before = (tmp_path / "results.json").stat().st_mtime_ns
    go()  # complete now: nothing is rewritten
    assert (tmp_path / "results.json").stat().st_mtime_ns == before


def test_a_finished_sample_run_started_again_rewrites_final_results(tmp_path):
    from ctta.loop.samples import run_samples
    from ctta.online_hooks import OnlineAccuracy
    from tests.test_samples import stream

    def go(armed=False):
        return run_samples(make_tiny_clip(), ZeroShot(), stream(boundary=True),
                           [OnlineAccuracy(), _KillAtRunEnd(armed), JsonResults()], out_dir=tmp_path, seed=3)

    with pytest.raises(KeyboardInterrupt):
        go(armed=True)
    assert json.loads((tmp_path / "results.json").read_text())["finished"] is False
    again = go()
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["finished"] is True and doc["results"]["online"] == again["online"]


def test_a_resume_with_other_retention_controls_or_reset_on_shift_is_refused(tmp_path, tiny_stream):
    """Both were accepted silently: the baseline of 50 control images was compared with accuracies on 200, and a
    sample stream resumed under another reset_on_shift."""
    from ctta.loop.checkpoint import RunMismatch
    from ctta.loop.samples import run_samples
    from ctta.online_hooks import OnlineAccuracy
    from tests.test_samples import Kill, NoisyTent, stream

    def go(n, killer):
        hooks = [AccuracyMatrix(), ZeroShotRetention(list(tiny_stream.tasks[:n])), killer, JsonResults()]
        return run(make_tiny_clip(), ZeroShot(), tiny_stream, hooks, out_dir=tmp_path / "t", seed=1, progress=False)

    with pytest.raises(KeyboardInterrupt):
        go(1, Killer(at=1))
    with pytest.raises(RunMismatch, match="hook ZeroShotRetention: the stream has 2 tasks, the saved run 1"):
        go(2, Killer(at=99))
    assert go(1, Killer(at=99))["retention"]  # the same controls resume

    def samples(shift, kill_at=None):
        return run_samples(make_tiny_clip(), NoisyTent(lr=5e-2), stream(boundary=True),
                           [OnlineAccuracy(), Kill(kill_at)], batch_size=2, out_dir=tmp_path / "s",
                           checkpoint_every=5, seed=3, reset_on_shift=shift)

    with pytest.raises(KeyboardInterrupt):
        samples(True, kill_at=23)
    with pytest.raises(RunMismatch, match="reset_on_shift"):
        samples(False)


@pytest.mark.parametrize("edit, match", [
    (lambda st: st.update(next_task=99), r"next_task=99 is outside this run \(0..3\)"),
    (lambda st: st.update(next_task=-2), r"next_task=-2 is outside this run"),
    (lambda st: st.pop("model"), "has no 'model' entry"),
    (lambda st: st.update(results=[1, 2]), "its 'results' entry is a list, not a dict"),
])
def test_a_hash_valid_checkpoint_with_bad_content_is_refused_in_words(tmp_path, tiny_stream, edit, match):
    """A file from a faulty writer passed its hash and was taken for a finished run (next_task=99) or ended in a
    traceback (a missing entry, a negative count)."""
    from ctta.files import CorruptFileError, atomic_torch_save
    run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix()], out_dir=tmp_path, seed=1, progress=False)
    state = safe_torch_load(tmp_path / "checkpoint.pt")
    edit(state)
    atomic_torch_save(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CorruptFileError, match=match):
        run(make_tiny_clip(), ZeroShot(), tiny_stream, [AccuracyMatrix()], out_dir=tmp_path, seed=1, progress=False)
