"""Check a config's keyword arguments against its ``_target_``'s signature before calling it (scripts/run.py).

A config group entry such as ``strategy: {_target_: ctta.strategies.finetune.Finetune, lr: abc}`` would otherwise
fail deep inside the target (``strategy.lr=abc`` used to fail 47 s into a run, in ``torch.optim``). Two passes:

- `precheck`: reads the target's *source* (`ast`) without importing anything, so that a wrong key or type is
  refused a fraction of a second after start, before torch is imported. It judges only what it can read for sure:
  a class or function defined in the module the ``_target_`` names (not a re-export), its own parameters and their
  annotations; anything else is left to the second pass.
- `check_config`: imports the target and reads its signature and type hints (`inspect`, `typing.get_type_hints`),
  following ``**kwargs`` up a class's bases (``Strategy`` subclasses pass ``batch_size``/``epochs`` on).

Both refuse a key the target does not take (with the closest accepted names), a missing required argument, and a
value of the wrong simple type (int, float, bool, str, None, ``Literal`` choices, lists/tuples of those, and unions
of them). Annotations they cannot judge (tensors, callables, devices) are not checked: the target still validates
its own values (ranges, consistency). Nested entries with a ``_target_`` (a hook's ``controls``) are checked too.
The config is a plain ``dict`` (``OmegaConf.to_container(cfg, resolve=True)``). This module imports only the standard
library: it lives beside run.py, not in ctta, so that loading it does not import torch.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Callable

_RESERVED = ("_target_", "_args_", "_recursive_", "_convert_", "_partial_")


class ConfigError(ValueError):
    """A config entry that its ``_target_`` cannot take; the message names the key (``strategy.lr``)."""


def locate(path: str, where: str = "_target_") -> Any:
    """The object at dotted ``path`` (``pkg.module.Class.method``). A module that exists but fails to import
    raises its own error; a path that names nothing raises `ConfigError`."""
    parts = path.split(".")
    obj, err = None, None
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and not name.startswith(e.name) and not e.name.startswith(name):
                raise  # the module exists but one of its own imports is missing: that is the real error
            err = e
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise ConfigError(f"{where}: {path!r} names nothing ({name!r} has no attribute {attr!r})")
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(f"{where}: cannot import {path!r} ({err}); is its package installed or on PYTHONPATH?")


def _hints(fn: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve at run time (TYPE_CHECKING imports): not checked
        return {}


def _parameters(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """``(parameters, type hints, open)``: the keyword parameters ``target`` accepts, their hints, and whether it
    takes any keyword at all (``**kwargs`` that no base class's ``__init__`` narrows down)."""
    if inspect.isclass(target):
        params: dict[str, inspect.Parameter] = {}
        hints: dict[str, Any] = {}
        for klass in target.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            if klass is object:  # **kwargs passed all the way up: object takes none
                return params, hints, False
            sig = inspect.signature(init)
            own = {k: p for k, p in list(sig.parameters.items())[1:]
                   if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
            for k, p in own.items():
                params.setdefault(k, p)
            for k, h in _hints(init).items():
                hints.setdefault(k, h)
            if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
                return params, hints, False
        return params, hints, True
    sig = inspect.signature(target)
    params = {k: p for k, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return params, _hints(target), any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def accepts(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` (a plain config value) fits ``hint``: True, False, or None when the hint is not one this
    module judges."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if isinstance(value, Mapping) and "_target_" in value:
        return None  # built into an object by instantiate
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, PurePath) or hint is os.PathLike:
        return isinstance(value, (str, PurePath))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin is typing.Union or origin is types.UnionType:
        verdicts = [accepts(a, value) for a in args]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin in (list, tuple, Sequence, Iterable, typing.Sequence, typing.Iterable):
        if isinstance(value, str):
            return None  # a string is a sequence too: the target decides
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False
            verdicts = [accepts(a, v) for a, v in zip(args, value)]
        else:
            verdicts = [accepts(args[0], v) for v in value] if args else []
        return False if False in verdicts else (None if None in verdicts else True)
    if origin in (dict, Mapping, typing.Mapping):
        return isinstance(value, Mapping)
    return None


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _check_arguments(config: Mapping[str, Any], where: str, name: str, params: dict[str, tuple[Any, bool]],
                     open_: bool, *, require: bool) -> None:
    """The checks both passes make of one entry's arguments against ``params`` (name -> (annotation, has a
    default)): an unknown key (unless the target takes ``**kwargs``), a value of the wrong type, and (with
    ``require``, unless the entry is partial or positional) a required argument left out."""
    kwargs = {k: v for k, v in config.items() if k not in _RESERVED}
    for key, value in kwargs.items():
        if key not in params:
            if open_:
                continue
            close = difflib.get_close_matches(str(key), list(params), n=3)
            raise ConfigError(
                f"{where}.{key}: {name} takes no argument {key!r}"
                + (f" (did you mean {' or '.join(close)}?)" if close else "")
                + f"; it takes: {', '.join(params) or 'no arguments'}")
        if accepts(params[key][0], value) is False:
            raise ConfigError(f"{where}.{key}={_show(value)}: {name} expects {key}: {_type_name(params[key][0])}")
    if require and not config.get("_partial_", False) and "_args_" not in config:
        missing = [k for k, (_, has_default) in params.items() if not has_default and k not in kwargs]
        if missing:
            raise ConfigError(f"{where}: {name} needs {', '.join(missing)} (set {where}.{missing[0]}=...)")


def check_config(config: Mapping[str, Any], where: str) -> None:
    """Check one ``{_target_: ..., key: value, ...}`` entry (and its nested ``_target_`` entries) against the
    target's signature; raises `ConfigError` naming ``where.key``, what was given and what is expected."""
    if not isinstance(config, Mapping) or "_target_" not in config:
        return
    target = locate(str(config["_target_"]), f"{where}._target_")
    name = getattr(target, "__qualname__", str(config["_target_"]))
    kwargs = {k: v for k, v in config.items() if k not in _RESERVED}
    try:
        params, hints, open_ = _parameters(target)
    except (TypeError, ValueError):  # no introspectable signature (a builtin): nothing to check here
        return
    _check_arguments(config, where, name, {k: (hints.get(k, p.annotation), p.default is not p.empty)
                                            for k, p in params.items()}, open_, require=True)
    for key, value in kwargs.items():
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, Mapping):
                check_config(item, f"{where}.{key}" + (f"[{i}]" if isinstance(value, list) else ""))


# ------------------------------------------------------------------------------------ from the source, no import
_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "None": None, "list": list, "tuple": tuple,
          "dict": dict, "Literal": typing.Literal, "Optional": typing.Optional, "Union": typing.Union,
          "Sequence": Sequence, "Iterable": Iterable, "Mapping": Mapping, "Path": Path, "Any": Any}


def _source_of(path: str) -> tuple[ast.Module, list[str]] | None:
    """The parsed module file a dotted ``_target_`` names and the attribute path inside it, found without importing
    anything (finding a top-level package's spec does not run it; editable installs included). None when there is
    no such file: a re-export, a builtin, an extension module."""
    import importlib.util
    parts = path.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = [Path(d) for d in (spec.submodule_search_locations or [])]
    candidates = []
    for i in range(len(parts) - 1, 0, -1):
        if i == 1 and spec.origin and spec.origin.endswith(".py"):
            candidates.append((Path(spec.origin), i))  # the top-level module (or package __init__) itself
        for root in roots:
            base = root.joinpath(*parts[1:i]) if i > 1 else None
            if base is not None:
                candidates += [(base.with_suffix(".py"), i), (base / "__init__.py", i)]
    for f, i in candidates:
        if f.is_file():
            try:
                return ast.parse(f.read_text(encoding="utf-8")), parts[i:]
            except (OSError, SyntaxError, UnicodeDecodeError):
                return None
    return None


def _annotation(node: ast.expr | None) -> Any:
    if node is None:
        return inspect.Parameter.empty
    try:
        text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ast.unparse(node)
        return eval(text, {"__builtins__": {}}, dict(_NAMES))  # names beyond _NAMES: not judged
    except Exception:
        return inspect.Parameter.empty


def _source_parameters(path: str) -> tuple[str, dict[str, tuple[Any, bool]], bool] | None:
    """``(name, {parameter: (annotation, has_default)}, open)`` read from the source, or None if unsure."""
    found = _source_of(path)
    if found is None:
        return None
    module, attrs = found
    if len(attrs) != 1:
        return None
    node = next((n for n in module.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                 and n.name == attrs[0]), None)
    if node is None or getattr(node, "decorator_list", None):
        return None  # a re-export, a dataclass, a decorated function: left to the import-based check
    fn = node
    if isinstance(node, ast.ClassDef):
        fn = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if fn is None:
            return None  # inherited __init__
    a = fn.args
    positional = a.posonlyargs + a.args
    if isinstance(node, ast.ClassDef):
        positional = positional[1:]  # self
    defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    params = {p.arg: (_annotation(p.annotation), d) for p, d in zip(positional, defaults)}
    params.update({p.arg: (_annotation(p.annotation), d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)})
    return node.name, params, a.kwarg is not None


def precheck(config: Mapping[str, Any], where: str) -> None:
    """`check_config` from the target's source, importing nothing; silent where it cannot be sure."""
    if not isinstance(config, Mapping) or "_target_" not in config:
        return
    read = _source_parameters(str(config["_target_"]))
    if read is not None:
        name, params, open_ = read
        _check_arguments(config, where, name, params, open_, require=not open_)
    for key, value in config.items():
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, Mapping):
                precheck(item, f"{where}.{key}" + (f"[{i}]" if isinstance(value, list) else ""))
