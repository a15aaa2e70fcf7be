"""Plain-state helpers shared by the loop and the online adapter: copies that never alias, structure checks that
let a load fail before it changes anything, and a strategy's configuration as plain values."""
from __future__ import annotations

from typing import Any

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
