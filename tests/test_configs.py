"""Every config composes and instantiates; a bad choice gets a clear error; the CLI runs end to end, including a
user's own strategy plugged in with `-cd` (the README's example)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import get_object, instantiate

from ctta import Strategy, TaskStream

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMALL = {"train_per_class": 2, "test_per_class": 1, "per_class": 1, "n": 20}


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("run", overrides=overrides, return_hydra_config=True)


def _targets(node) -> list[str]:
    from omegaconf import DictConfig, ListConfig
    out = []
    if isinstance(node, DictConfig):
        for k, v in node.items_ex(resolve=False):
            if k == "_target_":
                out.append(v)
            else:
                out += _targets(v)
    elif isinstance(node, ListConfig):
        for v in node:
            out += _targets(v)
    return out


@pytest.mark.parametrize("name", _choices("strategy"))
def test_strategy_configs_instantiate(name):
    cfg = _compose([f"strategy={name}"])
    assert isinstance(instantiate(cfg.strategy), Strategy)


@pytest.mark.parametrize("name", _choices("stream"))
def test_stream_configs_compose(name):
    cfg = _compose([f"stream={name}"])
    target = cfg.stream._target_
    get_object(target)  # importable
    if target.startswith("streams.world"):  # world, world_mtil, world_style: small enough to build here
        small = [f"stream.{k}={v}" for k, v in SMALL.items() if k in cfg.stream]
        stream = instantiate(_compose([f"stream={name}"] + small).stream)
        assert isinstance(stream, TaskStream) and len(stream) >= 1


@pytest.mark.parametrize("name", _choices("model"))
def test_model_configs_compose(name):
    cfg = _compose([f"model={name}"])
    get_object(cfg.model._target_)
    if name == "micro":  # the embedded model is the only one that needs no download or user file
        model = instantiate(cfg.model)
        assert model.image_size == 32


@pytest.mark.parametrize("name", _choices("hooks"))
def test_hook_configs_instantiate(name):
    cfg = _compose([f"hooks={name}"])
    overrides = [f"hooks={name}"]
    if "retention" in cfg.hooks and "controls" in cfg.hooks.retention:
        overrides.append("hooks.retention.controls.n=20")
    hooks = [instantiate(h) for h in _compose(overrides).hooks.values()]
    assert hooks and all(any(hasattr(h, e) for e in ("on_task_end", "on_batch_end", "on_run_end")) for h in hooks)


@pytest.mark.parametrize("name", _choices("experiment"))
def test_experiment_configs_compose(name):
    cfg = _compose([f"experiment={name}"])
    for t in _targets(cfg.model) + _targets(cfg.strategy) + _targets(cfg.stream):
        get_object(t)


def test_unknown_choice_is_a_clear_error():
    with pytest.raises(MissingConfigException, match="strategy"):
        _compose(["strategy=does_not_exist"])


def _cli(overrides: list[str], tmp_path: Path, extra_path: str = "", flags: tuple[str, ...] = ()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), extra_path])), OMP_NUM_THREADS="1")
    # hydra's flags (-cd ...) go before the overrides
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), *flags, f"out_dir={tmp_path}",
                           "stream.n_tasks=2", "stream.train_per_class=2", "stream.test_per_class=2",
                           "hooks.retention.controls.n=20", "progress=false", *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_cli_runs_end_to_end_and_user_strategy_plugs_in(tmp_path):
    example = ROOT / "examples" / "custom_strategy"
    r = _cli(["strategy=norm_tuning"], tmp_path, str(example), flags=("-cd", str(example / "my_configs")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NormTuning on world-cil2" in r.stdout and "zero-shot retention" in r.stdout
    assert (tmp_path / "results.json").exists() and (tmp_path / "checkpoint.pt").exists()
    # the bad-config path: an unknown strategy names the problem
    bad = _cli(["strategy=nope"], tmp_path / "bad")
    assert bad.returncode != 0 and "strategy/nope" in bad.stderr
