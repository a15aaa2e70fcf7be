"""The command line as a user meets it (issue #21): `scripts/run.py` in a subprocess on tiny settings, checked on what
it prints and leaves on disk, plus the pieces behind it (config validation, file permissions, plot axes).

Subprocess runs take ~5-20 s each on a loaded 2-core machine, most of it importing torch."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from streams.world import cil_stream

ROOT = Path(__file__).resolve().parents[1]
configcheck_spec = importlib.util.spec_from_file_location("configcheck", ROOT / "scripts" / "configcheck.py")
configcheck = importlib.util.module_from_spec(configcheck_spec)
configcheck_spec.loader.exec_module(configcheck)
TINY = ["stream.n_tasks=2", "stream.train_per_class=2", "stream.test_per_class=2", "hooks=minimal", "threads=1"]


class Run:
    def __init__(self, rc: int, stdout: str, stderr: str, first_line_s: float | None, wall_s: float):
        self.rc, self.stdout, self.stderr, self.first_line_s, self.wall_s = rc, stdout, stderr, first_line_s, wall_s

    @property
    def out(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str, cwd: Path = ROOT, umask: int = 0o022, timeout: int = 300) -> Run:
    """Run scripts/run.py; note when its first line of output arrives (stderr is unbuffered, stdout may not be)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run.py"), *args], cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(umask))
    lines: list[tuple[float, str]] = []

    def read_stderr() -> None:
        for line in p.stderr:
            lines.append((time.monotonic() - t0, line))

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = p.stdout.read()
    p.wait(timeout)
    reader.join()
    return Run(p.returncode, stdout, "".join(line for _, line in lines), lines[0][0] if lines else None,
               time.monotonic() - t0)


# ------------------------------------------------------------------------------------- a run, re-runs, resume
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Run]:
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run_cli(f"out_dir={out}", *TINY, "progress=true", umask=0o027)
    assert r.rc == 0, r.out[-3000:]
    return out, r


def test_progress_shows_within_seconds(finished):
    _, r = finished
    assert r.first_line_s is not None and r.first_line_s < 5.0, (r.first_line_s, r.stderr[:500])
    first = r.stderr.splitlines()[0]
    assert first.startswith("ctta: zeroshot on world_cil_shifted") and "setting up" in first
    assert "stream world-cil2-textured-colour_shift4: 2 tasks, 200 test images" in r.stderr
    assert "loading model micro-clip (builtin)" in r.stderr
    # the outer bar, "task: step"
    assert "tasks:" in r.stderr and "world-cil2-textured-colour_shift4/t1: evaluate" in r.stderr
    assert "evaluate after task 1/2" in r.stderr and "evaluate after task 2/2" in r.stderr  # the evaluation bar
    # third-party INFO lines are quiet by default
    assert "Loaded built-in micro-clip model config" not in r.out and "[INFO]" not in r.out


def test_summary_explains_its_metrics_and_is_in_run_log(finished):
    out, r = finished
    assert "ZeroShot on world-cil2" in r.stdout and "accuracy (%): average" in r.stdout
    words = " ".join(r.stdout.split())
    assert "BWT: mean change on earlier tasks" in words
    assert "For a zero-shot model, forgetting and BWT only measure the growth of the label space" in words
    assert max(len(line) for line in r.stdout.splitlines()) <= 120
    log = (out / "run.log").read_text()
    assert "accuracy (%): average" in log and "BWT: mean change" in " ".join(log.split())
    assert "python scripts/run.py" in log and "stream.n_tasks=2" in log  # how the run was started


def test_result_files_follow_the_umask(finished):
    out, _ = finished
    for name in ("results.json", "results.png", "checkpoint.pt", "run.log", ".hydra/config.yaml",
                 ".hydra/overrides.yaml"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name  # 0o666 less umask 027 (mkstemp gave 0o600)


def test_rerun_of_a_finished_run_says_so_and_rewrites_nothing(finished):
    out, _ = finished
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in
              (out / "results.json", out / "checkpoint.pt", out / ".hydra" / "config.yaml")}
    r = run_cli(f"out_dir={out}", *TINY, "progress=false")
    assert r.rc == 0, r.out[-3000:]
    assert "resuming" not in r.stderr  # it said "resuming ... after task 2/2", then that it was finished
    assert "run already finished (2 tasks): nothing to do" in r.stderr
    assert "accuracy (%): average" in r.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before


def test_a_foreign_resume_is_refused_before_anything_is_written(finished):
    out, _ = finished
    before = {p.name: p.read_bytes() for p in (out / ".hydra" / "config.yaml", out / "run.log")}
    r = run_cli(f"out_dir={out}", *TINY, "strategy=finetune", "progress=false")
    assert r.rc == 2, r.out[-3000:]
    assert "Traceback" not in r.out
    assert "error: " in r.stderr and "belongs to a different run" in r.stderr
    assert "strategy: 'ZeroShot' -> 'Finetune'" in r.stderr and "config.lr" not in r.stderr  # class first, no arg list
    assert f"hint: out_dir={out} holds another run" in r.stderr
    assert "loading model" not in r.stderr  # refused before the weights
    assert {p.name: p.read_bytes() for p in (out / ".hydra" / "config.yaml", out / "run.log")} == before


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_attempts_config_replaced(tmp_path):
    """Two jobs given one folder overwrote each other's results silently; an attempt killed before its first
    checkpoint left its .hydra/config.yaml for the next, different run to inherit."""
    from ctta.files import FolderLock
    out = tmp_path / "run"
    out.mkdir()
    lock = FolderLock(out)
    lock.acquire()  # this test process plays the run that is still writing
    try:
        r = run_cli(f"out_dir={out}", *TINY, "progress=false")
    finally:
        lock.release()
    assert r.rc == 2 and "Traceback" not in r.out, r.out[-3000:]
    assert f"{out} is in use by another run right now (pid {os.getpid()}" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of its own was written
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text("strategy:\n  _target_: ctta.strategies.lwf.LwF\n")
    r = run_cli(f"out_dir={out}", *TINY, "progress=false")
    assert r.rc == 0, r.out[-3000:]
    assert "ctta.strategies.zeroshot.ZeroShot" in (out / ".hydra" / "config.yaml").read_text()


def test_a_resume_reads_its_checkpoint_once(finished, tmp_path, monkeypatch, capsys):
    """run.py's early fingerprint check and the loop's resume share one read of the checkpoint (hashing and loading
    a ViT-B-size file twice costs seconds): run.py's set-up and loop in this process, with a spy on the one call
    that reads a checkpoint file."""
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import ctta
    from ctta.loop import checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # run.py imports its siblings, as when run as a script
    spec = importlib.util.spec_from_file_location("run_script", ROOT / "scripts" / "run.py")
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    reads, real = [], checkpoint.safe_torch_load
    monkeypatch.setattr(checkpoint, "safe_torch_load",
                        lambda path, map_location="cpu": reads.append(path) or real(path, map_location=map_location))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("run", overrides=[f"out_dir={out}", *TINY, "progress=false"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as @hydra.main hands it to main()
        folder = run_py.RunFolder(out)
        try:
            run_py._run(ctta, cfg, run_py._set_up(cfg, folder), folder)
        finally:
            folder.close()
    assert reads == [out / "checkpoint.pt"]
    assert "accuracy (%): average" in capsys.readouterr().out and not checkpoint._held
    assert "run already finished (2 tasks): nothing to do" in (out / "run.log").read_text()


@pytest.mark.slow
def test_a_sample_stream_resumes_and_refuses_another_batch_size(tmp_path):
    """The early checkpoint check uses the sample loop's own fingerprint: the same run finishes, another is named."""
    args = ["experiment=tent_world_shift", "stream.corruptions=[gaussian_noise,contrast]", "stream.per_class=1",
            "threads=1", f"out_dir={tmp_path}", "samples.batch_size=4"]
    first = run_cli(*args)
    assert first.rc == 0 and "online: n 200" in first.stdout, first.out[-3000:]
    assert "online: accuracy of the adapter's prediction" in " ".join(first.stdout.split())
    again = run_cli(*args)
    assert again.rc == 0 and "run already finished" in again.stderr, again.out[-3000:]
    other = run_cli(*args[:-1], "samples.batch_size=2")
    assert other.rc == 2 and "(batch_size: 4 -> 2)" in other.stderr and "Traceback" not in other.out


# ------------------------------------------------------------------------------------------------ errors
def _no_run_folder(cwd: Path) -> bool:
    return not (cwd / "runs").exists() or not any((cwd / "runs").rglob("*"))


def _refused_at_setup(r: Run, error: str, hint: str, cwd: Path) -> None:
    """A user error seen as the user sees it: exit 2, the message and the hint, no traceback, no run folder."""
    assert r.rc == 2, r.out[-3000:]
    assert error in r.stderr
    assert hint in r.stderr and "Traceback" not in r.out
    assert _no_run_folder(cwd)


def test_a_bad_value_fails_plainly_naming_the_key(tmp_path):
    """No out_dir: the default runs/<name>/<time>/ is not left behind by a run that fails at set-up."""
    r = run_cli(*TINY, "strategy=finetune", "strategy.lr=abc", cwd=tmp_path)
    _refused_at_setup(r, "error: strategy.lr='abc': Finetune expects lr: float", "hint:", tmp_path)
    assert "loading model" not in r.stderr and "stream world-cil2" not in r.stderr  # before any data or weights
    assert r.wall_s < 8, r.wall_s  # refused from the target's source, before torch is imported (~1 s idle)


@pytest.mark.parametrize("args, error, hint", [
    (("experiment=world_tta/tdaa",), "error: experiment=world_tta/tdaa: there is no such experiment",
     "did you mean experiment=world_tta/tda"),  # Hydra skips an optional group's unknown choice: the default ran
    (("threads=-2",), "error: threads=-2: must be a number >= 1", "e.g. threads=2"),
    (("out_dir=''",), "error: out_dir is empty", "e.g. out_dir=runs/my_run"),  # wrote .hydra into the cwd
    (("name=../../escape",), "a run's name is one folder under runs/", "out_dir=PATH"),
    (("device=banana",), "error: device='banana' is not a torch device", "device=cpu"),
])
def test_a_bad_top_level_choice_fails_plainly(tmp_path, args, error, hint):
    _refused_at_setup(run_cli(*TINY, *args, cwd=tmp_path), error, hint, tmp_path)


def test_hydras_own_refusals_exit_2_like_ours(tmp_path):
    """An unknown key or group option is refused by Hydra before our checks run; it exited 1."""
    for arg, words in (("foo=1", "Key 'foo' is not in struct"), ("strategy=nope", "Could not find 'strategy/nope'")):
        r = run_cli(arg, cwd=tmp_path)
        assert r.rc == 2 and words in r.stderr and "Traceback" not in r.out and _no_run_folder(tmp_path)


def test_weights_that_do_not_fit_or_would_run_code_are_refused_plainly(tmp_path):
    import pickle
    import torch
    bad = tmp_path / "w"
    bad.mkdir()
    torch.save({"ln_final.bias": torch.zeros(2, 2)}, bad / "wrong.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))
    with open(bad / "evil.pt", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    r = run_cli(*TINY, f"model.pretrained={bad / 'wrong.pt'}", cwd=tmp_path)
    _refused_at_setup(r, "does not fit the micro-clip architecture", "model.pretrained", tmp_path)
    r = run_cli(*TINY, f"model.pretrained={bad / 'evil.pt'}", cwd=tmp_path)
    _refused_at_setup(r, "is not a plain weights file", "model.pretrained", tmp_path)
    assert "ran" not in r.stdout and "weights_only` set to False" not in r.stderr


def test_a_bad_loading_option_fails_plainly(tmp_path):
    r = run_cli(*TINY, "loading.workers=abc", cwd=tmp_path)
    _refused_at_setup(r, "error: loading.workers must be a non-negative int or 'auto', got 'abc'",
                      "hint: e.g. loading.workers=auto", tmp_path)


@pytest.mark.slow
def test_a_value_the_target_refuses_is_named_too(tmp_path):
    """A value of the right type that the stream itself refuses: its message, the key named, no folder."""
    r = run_cli(*TINY, "stream.n_tasks=-1", cwd=tmp_path)
    _refused_at_setup(r, "error: stream (streams.world.cil_stream): n_tasks must be between 1 and 100",
                      "hint: check stream.n_tasks", tmp_path)


def test_debug_keeps_the_traceback(tmp_path):
    plain = run_cli(f"out_dir={tmp_path / 'x'}", "seed=abc")  # a top-level key: refused before torch is imported
    assert plain.rc == 2 and "error: seed='abc': expected int" in plain.stderr and "Traceback" not in plain.out
    debug = run_cli(f"out_dir={tmp_path / 'x'}", "seed=abc", "--debug")
    assert debug.rc != 0 and "Traceback" in debug.out and "SetupError" in debug.out
    assert not (tmp_path / "x").exists()
    unset = run_cli(f"out_dir={tmp_path / 'x'}", "model=local")  # configs/model/local.yaml: pretrained: ???
    assert unset.rc == 2 and "error: model.pretrained must be set" in unset.stderr and "Traceback" not in unset.out
    assert "hint: model.pretrained=..." in unset.stderr and not (tmp_path / "x").exists()


def test_help_describes_the_tool(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.rc == 0, r.out[-2000:]
    for text in ("Runs a continual-learning or test-time-adaptation strategy", "== Config groups (group=option) ==",
                 "strategy: ", "finetune", "stream: ", "world_cil", "== Examples ==", "strategy.lr", "--debug",
                 "resumes", "progress=true|false"):
        assert text in r.stdout, text
    assert r.wall_s < 30  # no torch import for --help


# ------------------------------------------------------------------------------------------- the pieces
def test_validation_names_the_key_and_the_expected_type():
    ConfigError, accepts, check_config = configcheck.ConfigError, configcheck.accepts, configcheck.check_config

    ft = {"_target_": "ctta.strategies.finetune.Finetune", "lr": 1e-5, "epochs": 1}
    check_config(ft, "strategy")
    check_config({**ft, "lr": 3}, "strategy")  # an int is a fine float
    with pytest.raises(ConfigError, match=r"strategy\.lr='abc': Finetune expects lr: float"):
        check_config({**ft, "lr": "abc"}, "strategy")
    with pytest.raises(ConfigError, match=r"strategy\.iterations=2\.5: Finetune expects iterations: int \| None"):
        check_config({**ft, "iterations": 2.5}, "strategy")
    with pytest.raises(ConfigError, match=r"strategy\.reset_optimizer_per_task='no'"):
        check_config({**ft, "reset_optimizer_per_task": "no"}, "strategy")
    # an unknown key, also one that only a base class could take (Finetune passes nothing on)
    with pytest.raises(ConfigError, match=r"strategy\.lrr: Finetune takes no argument 'lrr' \(did you mean lr"):
        check_config({**ft, "lrr": 1e-5}, "strategy")
    with pytest.raises(ConfigError, match=r"strategy\.eval_batch_size: Finetune takes no argument"):
        check_config({**ft, "eval_batch_size": 8}, "strategy")
    # nested _target_ entries are checked too, and required arguments are asked for
    controls = {"_target_": "streams.world.control_tasks", "names": ["shape"], "n": "many"}
    with pytest.raises(ConfigError, match=r"hooks\.retention\.controls\.n='many'"):
        check_config({"_target_": "ctta.ZeroShotRetention", "controls": controls}, "hooks.retention")
    with pytest.raises(ConfigError, match=r"hooks\.retention: ZeroShotRetention needs controls"):
        check_config({"_target_": "ctta.ZeroShotRetention"}, "hooks.retention")
    with pytest.raises(ConfigError, match=r"strategy\._target_: cannot import 'no_such_pkg\.X'"):
        check_config({"_target_": "no_such_pkg.X"}, "strategy")
    # the judge of simple annotations, and what it leaves alone
    from typing import Literal, Sequence
    assert accepts(Literal["a", "b"], "a") and accepts(Literal["a", "b"], "c") is False
    assert accepts(tuple[float, float], [0.9, 0.999]) and accepts(tuple[float, float], [0.9]) is False
    assert accepts(Sequence[str], ["a"]) and accepts(Sequence[str], 3) is False and accepts(Sequence[str], "a") is None
    assert accepts(bool, 1) is False and accepts(int, True) is False and accepts(float, True) is False
    assert accepts(object, "anything") is None


@pytest.mark.slow
def test_every_shipped_group_option_passes_validation():
    """No false alarms: each option of each group composes and passes the checks run.py makes."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    configs = ROOT / "configs"
    check_config, precheck = configcheck.check_config, configcheck.precheck
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        for group in ("strategy", "stream", "model", "hooks"):
            for option in sorted(p.stem for p in (configs / group).glob("*.yaml")):
                cfg = compose("run", overrides=[f"{group}={option}"], return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)
                for key in ("model", "strategy", "stream"):
                    check_config(OmegaConf.to_container(cfg[key], resolve=True), key)
                    precheck(OmegaConf.to_container(cfg[key], resolve=True), key)
                for name, hook in (cfg.hooks or {}).items():
                    check_config(OmegaConf.to_container(hook, resolve=True), f"hooks.{name}")
                    precheck(OmegaConf.to_container(hook, resolve=True), f"hooks.{name}")


@pytest.mark.slow
def test_every_experiment_passes_validation():
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    configs = ROOT / "configs"
    check_config, precheck = configcheck.check_config, configcheck.precheck
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        for p in sorted((configs / "experiment").rglob("*.yaml")):
            if p.stem == "base":
                continue
            cfg = compose("run", overrides=[f"experiment={p.relative_to(configs / 'experiment').with_suffix('')}"],
                          return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            for key in ("model", "strategy", "stream"):
                check_config(OmegaConf.to_container(cfg[key], resolve=True), key)
                precheck(OmegaConf.to_container(cfg[key], resolve=True), key)


def test_the_source_precheck_imports_nothing_and_agrees():
    """`precheck` reads the targets' source: the same verdicts as the import-based check where it is sure, silence
    where it is not (re-exports), and no torch import (run in a fresh interpreter)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import configcheck as c\n"
            "for cfg in ({'_target_': 'ctta.strategies.finetune.Finetune', 'lr': 'abc'},"
            " {'_target_': 'streams.world.cil_stream', 'n_taks': 2}):\n"
            "    try: c.precheck(cfg, 'x')\n"
            "    except c.ConfigError as e: print(e)\n"
            "c.precheck({'_target_': 'ctta.Clip.from_pretrained', 'arch': 3}, 'model')\n"
            "print('torch' in sys.modules, 'ctta' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "x.lr='abc': Finetune expects lr: float",
        "x.n_taks: cil_stream takes no argument 'n_taks' (did you mean n_tasks?); it takes: "
        + ", ".join(inspect.signature(cil_stream).parameters),
        "False False"]
    # where it reads a signature it agrees with the imported one
    for target in ("ctta.strategies.finetune.Finetune", "ctta.strategies.lwf.LwF", "streams.world.cil_stream",
                   "ctta.loop.samples.run_samples"):
        name, params, open_ = configcheck._source_parameters(target)
        imported, hints, open_imported = configcheck._parameters(configcheck.locate(target))
        assert list(params) == list(imported) and open_ == open_imported, target
        for key, (annotation, _) in params.items():
            if annotation is not inspect.Parameter.empty and key in hints:  # same verdicts on sample values
                for value in (1, 1.5, True, "a", None, [1, 2], ["a"], [0.9, 0.999]):
                    assert configcheck.accepts(annotation, value) == configcheck.accepts(hints[key], value), (key, value)


def test_atomic_writes_follow_the_umask(tmp_path):
    from ctta.files import atomic_torch_save, atomic_write_bytes

    old = os.umask(0o007)
    try:
        a = atomic_write_bytes(tmp_path / "a.json", b"{}")
        b = atomic_torch_save(tmp_path / "b.pt", {"x": 1})
    finally:
        os.umask(old)
    assert a.stat().st_mode & 0o777 == 0o660 and b.stat().st_mode & 0o777 == 0o660
    assert json.loads(a.read_text()) == {}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plot_numbers_tasks_from_one_on_every_axis():
    import matplotlib.pyplot as plt

    from ctta.plots import results_figure

    R = [[0.9, 0.5, 0.4], [0.8, 0.9, 0.5], [0.7, 0.8, 0.9]]
    fig = results_figure({"accuracy_matrix": R, "metrics": {"step_accuracy": [0.9, 0.85, 0.8]}})
    fig.canvas.draw()

    def visible(ax, which):
        lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
        labels = ax.get_xticklabels() if which == "x" else ax.get_yticklabels()
        return [t.get_text() for t in labels if lo <= t.get_position()[0 if which == "x" else 1] <= hi]

    heat, steps = (next(ax for ax in fig.axes if ax.get_xlabel().startswith(s)) for s in ("evaluated", "after"))
    assert visible(heat, "x") == ["1", "2", "3"] and visible(heat, "y") == ["1", "2", "3"]
    assert visible(steps, "x") == ["1", "2", "3"]
    plt.close(fig)


def test_the_logged_command_repeats_the_run_with_its_config_dir_and_pythonpath():
    """run.log's command dropped -cd and PYTHONPATH, so pasting it to resume a custom strategy's run failed."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from runfolder import command_line
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    argv = ["scripts/run.py", "-cd", "my configs", "strategy=norm_tuning", "out_dir=x"]
    line = command_line(["strategy=norm_tuning", "templates=[a photo of a {}.]"], argv, {"PYTHONPATH": "ex"})
    assert line == ("PYTHONPATH=ex python scripts/run.py -cd 'my configs' strategy=norm_tuning "
                    "'templates=[a photo of a {}.]'")
    assert command_line(["seed=1"], ["run.py", "--config-dir=c"], {}) == "python scripts/run.py --config-dir=c seed=1"


@pytest.mark.parametrize("sig, code, words", [("SIGTERM", 143, "stopped by SIGTERM"), ("SIGINT", 130, "interrupted")])
def test_a_stopped_run_says_how_to_resume_without_a_traceback(tmp_path, sig, code, words):
    """Ctrl-C printed a 30-line KeyboardInterrupt traceback, and SIGTERM ended the run without a word."""
    import signal
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run.py"), "experiment=world_cl_shifted/finetune",
                          f"out_dir={tmp_path / 'run'}", "threads=1", "progress=false"], cwd=ROOT, env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in p.stderr:  # wait until the loop runs
        lines.append(line)
        if "; running" in line:
            break
    p.send_signal(getattr(signal, sig))
    rest = p.stderr.read()
    p.wait(60)
    assert p.returncode == code, "".join(lines) + rest
    assert f"{words}: what the last checkpoint holds is kept; run the same command to resume" in rest
    assert "Traceback" not in rest
    assert words in (tmp_path / "run" / "run.log").read_text()
