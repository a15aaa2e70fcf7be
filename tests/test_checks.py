"""Hyperparameter checks (ctta/checks.py): a NaN, infinite or out-of-range setting is refused at construction."""
import glob
import importlib
import inspect
import math
import re

import pytest
import yaml

from ctta.checks import check_band, check_number, check_optimizer


def test_check_number_bounds_and_kinds():
    assert check_number("X", "a", 0) == 0.0 and check_number("X", "a", 2.5, high=2.5) == 2.5
    assert check_number("X", "a", None, none_ok=True) is None
    import numpy as np
    import torch
    assert check_number("X", "a", torch.tensor(4.5)) == 4.5 and check_number("X", "a", np.float32(0.25)) == 0.25
    with pytest.raises(ValueError, match="got nan"):
        check_number("X", "a", torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="a must be a finite number"):
        check_number("X", "a", torch.tensor([1.0, 2.0]))  # not one number
    for bad, kw in [(float("nan"), {}), (float("inf"), {}), (-1e-9, {}), (0.0, {"low_open": True}),
                    (1.0, {"high": 1.0, "high_open": True}), (True, {}), ("2", {}), (None, {}), (-5, {"low": -2})]:
        with pytest.raises(ValueError, match=r"^X: a must be a finite number"):
            check_number("X", "a", bad, **kw)
    with pytest.raises(ValueError, match=r"> 0 and <= 1 \(or null\), got nan"):
        check_number("X", "a", math.nan, low_open=True, high=1.0, none_ok=True)


def test_check_band_and_optimizer():
    assert check_band("X", "b", [0.2, 0.5]) == (0.2, 0.5)
    assert check_band("X", "b", (1.0, 1.0), low_open=True, equal_ok=True) == (1.0, 1.0)
    for bad in [(0.5, 0.2), (0.3, 0.3), (0.1, 1.5), 0.3, "ab", (0.1, 0.2, 0.3), (math.nan, 0.5)]:
        with pytest.raises(ValueError, match="X: b"):
            check_band("X", "b", bad)
    with pytest.raises(ValueError, match="b\\[0\\] must be a finite number > 0"):
        check_band("X", "b", (0.0, 1.0), low_open=True)
    check_optimizer("X", 1e-3, 0.0, (0.9, 0.999))
    for args in [(0.0,), (math.nan,), (1e-3, -0.1), (1e-3, 0.0, (0.9, 1.0)), (1e-3, 0.0, (0.9,)), (1e-3, 0, "ab")]:
        with pytest.raises(ValueError, match="^X: "):
            check_optimizer("X", *args)


def _strategy_classes():
    targets = set()
    for f in sorted(glob.glob("configs/strategy/*.yaml")):
        cfg = yaml.safe_load(open(f))
        if "_target_" in cfg:
            targets.add(cfg["_target_"])
    out = []
    for t in sorted(targets):
        mod, name = t.rsplit(".", 1)
        out.append(getattr(importlib.import_module(mod), name))
    return out


def _float_settings(cls):
    for name, p in inspect.signature(cls.__init__).parameters.items():
        d = p.default
        if isinstance(d, float) and not isinstance(d, bool) or (d is None and "float" in str(p.annotation)):
            yield name, math.nan
        elif isinstance(d, tuple) and d and all(isinstance(v, float) for v in d):
            yield name, (math.nan,) * len(d)


CASES = [(cls, name, value) for cls in _strategy_classes() for name, value in _float_settings(cls)]


def test_every_strategy_has_float_settings_to_check():
    names = {cls.__name__ for cls, _, _ in CASES}
    assert {"TDA", "DMN", "DPE", "BoostAdapter", "ZERO", "TPT", "Tent", "RAPF", "LwF", "Finetune"} <= names
    assert len(CASES) > 60


@pytest.mark.parametrize("cls,name,value", CASES, ids=[f"{c.__name__}.{n}" for c, n, _ in CASES])
def test_a_nan_setting_is_refused_when_the_strategy_is_built(cls, name, value):
    # a NaN weight, temperature or rate would otherwise turn every prediction or update into NaN, silently
    with pytest.raises(ValueError, match=re.escape(name)):  # the message names the setting
        cls(**{name: value})
