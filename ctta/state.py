"""Plain-state helpers shared by the loop and the online adapter: copies that never alias, structure checks that
let a load fail before it changes anything, and a strategy's configuration as plain values."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_PLAIN = (int, float, str, bool, type(None))


def clone_tree(obj: Any) -> Any:
    """Deep copy of the tensors in nested dicts / lists / tuples (other leaves are immutable or copied as is)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


def check_same_structure(saved: Any, current: Any, what: str, path: str = "") -> None:
    """Raise ValueError unless ``saved`` has the keys and tensor shapes of ``current`` (dicts recursively; list
    lengths of tensors; other leaves are values, free to differ; an empty dict here, such as an optimizer's state
    before its first step, accepts any dict, and a saved None, a part not built yet, fits anything). Called before a load so that it changes nothing when it would fail
    half-way."""
    where = f"{what}{' at ' + path if path else ''}"
    if saved is None:  # saved before the thing was built (an empty cache): the owner's load handles it
        return
    if isinstance(current, Tensor):
        if not isinstance(saved, Tensor):
            raise ValueError(f"{where}: expected a tensor of shape {tuple(current.shape)}, the file has "
                             f"{type(saved).__name__}")
        if saved.shape != current.shape:
            raise ValueError(f"{where}: shape {tuple(saved.shape)} in the file, {tuple(current.shape)} here "
                             f"(saved by a differently configured model or strategy)")
        if saved.is_floating_point() != current.is_floating_point() or saved.is_complex() != current.is_complex():
            raise ValueError(f"{where}: a {saved.dtype} tensor in the file, {current.dtype} here")
        return
    if isinstance(current, dict):
        if not any(isinstance(v, (Tensor, dict, list, tuple)) for v in current.values()):
            return  # a dict of plain values (a scheduler's milestones, hyperparameters) is a value, free to differ
        if not isinstance(saved, dict):
            raise ValueError(f"{where}: expected a dict, the file has {type(saved).__name__}")
        if not current:
            return
        missing, extra = set(current) - set(saved), set(saved) - set(current)
        if missing or extra:
            raise ValueError(f"{where}: keys differ (missing {sorted(map(str, missing))[:5]}, unexpected "
                             f"{sorted(map(str, extra))[:5]}): saved by a differently configured model or strategy")
        for k in current:
            check_same_structure(saved[k], current[k], what, f"{path}.{k}" if path else str(k))
        return
    if isinstance(current, (list, tuple)) and any(isinstance(v, (Tensor, dict)) for v in current):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(current):
            raise ValueError(f"{where}: expected {len(current)} entries, the file has "
                             f"{len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__}")
        for i, (a, b) in enumerate(zip(saved, current)):
            check_same_structure(a, b, what, f"{path}[{i}]")


def check_finite_weights(weights: dict[str, Any], what: str) -> None:
    """Raise ValueError naming the first weight tensor in ``weights`` that holds a NaN or an infinity: a model
    state with one would load and then answer every call with NaN."""
    for name, t in weights.items():
        if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: {name} holds NaN or infinite values; refusing to load it")


def check_optimizer_state(saved: Any, optimizer: Any, what: str) -> None:
    """Raise ValueError unless a saved ``torch.optim`` state dict fits ``optimizer``: the same number of parameters,
    and every per-parameter tensor (Adam's moments; a 0-d step counter is a value) of its parameter's shape. The
    state is keyed by parameter position, so `check_same_structure` cannot see this before the optimizer's first
    step (its state is then empty), and torch's own load accepts moments of any shape: the next step would fail."""
    if saved is None or optimizer is None:
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
            or not isinstance(saved.get("param_groups"), list):
        raise ValueError(f"{what}: not an optimizer state (a dict with 'state' and 'param_groups')")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        ids = [i for g in saved["param_groups"] for i in g["params"]]
    except (TypeError, KeyError):
        raise ValueError(f"{what}: its parameter groups do not list their parameters") from None
    if len(ids) != len(params):
        raise ValueError(f"{what}: the file's optimizer holds {len(ids)} parameters, this one {len(params)} "
                         f"(saved by a differently configured model or strategy)")
    by_id = dict(zip(ids, params))
    for key, entry in saved["state"].items():
        if key not in by_id or not isinstance(entry, dict):
            raise ValueError(f"{what}: state for an unknown parameter {key!r}")
        for name, t in entry.items():
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape != by_id[key].shape:
                raise ValueError(f"{what}: {name} of parameter {key} has shape {tuple(t.shape)} in the file, the "
                                 f"parameter {tuple(by_id[key].shape)} here (saved by a differently configured model)")


def strategy_config(strategy: Any) -> dict[str, Any]:
    """The arguments the strategy was constructed with (recorded by `Strategy.__new__`), as plain values: what tells
    two differently configured instances of one class apart (a checkpoint or adapter file of one fits only itself).
    Arguments that are not plain values (tensors, callables, objects) are named by their type."""
    out: dict[str, Any] = {}
    for name, v in getattr(strategy, "_config", {}).items():
        out[name] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


def short(v: Any, n: int = 120) -> str:
    """``repr(v)``, cut to ``n`` characters for error messages."""
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def differences(saved: dict, current: dict, prefix: str = "", sep: str = ": ", n: int = 80) -> list[str]:
    """The fields that differ between two plain dicts, each as ``key<sep>saved -> current`` (nested dicts as
    ``a.b``; values shortened to ``n`` characters): what a refused checkpoint or adapter file names."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.", sep, n)
        else:
            out.append(f"{prefix}{key}{sep}{short(a, n)} -> {short(b, n)}")
    return out
