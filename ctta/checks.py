"""Checks of user-supplied hyperparameters, at construction and in plain words.

A NaN weight, temperature or learning rate fails nowhere later: it turns every prediction or update into NaN
silently, so strategies refuse it (and anything out of range) when they are built, naming themselves and the
setting. `check_optimizer` is the one check of an optimizer's settings, before torch sees them.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any


def check_number(who: str, name: str, value: Any, *, low: float | None = 0.0, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, none_ok: bool = False) -> float | None:
    """``value`` as a float when it is a finite real number in the range (``low``/``high``, ``None`` = unbounded;
    ``*_open``: strict), or ``None`` when allowed; otherwise a `ValueError` naming ``who``'s hyperparameter ``name``.
    A NaN weight or temperature would not fail anywhere later: it turns every prediction into NaN silently."""
    if value is None and none_ok:
        return None
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    want = "a finite number" + (f" {' and '.join(bounds)}" if bounds else "") + (" (or null)" if none_ok else "")
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a 0-d tensor or array, e.g. model.logit_scale
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{who}: {name} must be {want}, got {value!r}")
    v = float(value)
    if (low is not None and (v < low or (low_open and v == low))) or \
            (high is not None and (v > high or (high_open and v == high))):
        raise ValueError(f"{who}: {name} must be {want}, got {value!r}")
    return v


def _check_pair(who: str, name: str, value: Any, want: str) -> None:
    """Two items (a list or tuple, not a string), or a `ValueError` saying what ``name`` must be."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{who}: {name} must be {want}, got {value!r}")


def check_band(who: str, name: str, band: Any, *, low: float = 0.0, high: float = 1.0, low_open: bool = False,
               equal_ok: bool = False) -> tuple[float, float]:
    """A pair ``(lo, hi)`` with ``low <= lo < hi <= high`` (``lo <= hi`` with ``equal_ok``; ``low < lo`` with
    ``low_open``): an entropy window, a probability mask, a crop's area range; or a `ValueError` naming it."""
    _check_pair(who, name, band, "a pair (low, high)")
    lo, hi = (check_number(who, f"{name}[{k}]", v, low=low, high=high, low_open=low_open) for k, v in enumerate(band))
    if not (lo <= hi if equal_ok else lo < hi):
        raise ValueError(f"{who}: {name} must have low {'<=' if equal_ok else '<'} high, got {tuple(band)!r}")
    return lo, hi


def check_optimizer(who: str, lr: Any, weight_decay: Any = 0.0, betas: Any = None, *,
                    lr_name: str = "lr") -> None:
    """An optimizer's settings: ``lr > 0`` (named ``lr_name``), ``weight_decay >= 0`` and, if given, two ``betas``
    in [0, 1)."""
    check_number(who, lr_name, lr, low_open=True)
    check_number(who, "weight_decay", weight_decay)
    if betas is not None:
        _check_pair(who, "betas", betas, "two numbers in [0, 1)")
        for k, b in enumerate(betas):
            check_number(who, f"betas[{k}]", b, high=1.0, high_open=True)


def check_logit_scale(who: str, logit_scale: Any) -> None:
    """A positive finite logit scale, or None for the model's own (learned) one."""
    check_number(who, "logit_scale", logit_scale, low_open=True, none_ok=True)
