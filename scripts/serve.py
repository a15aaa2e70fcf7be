"""Serve a deployed CLIP that adapts online: python scripts/serve.py [strategy=tent] [classes=[a,b]] [serve.*=...]

Hydra composes the model and strategy from scripts/run.py's config groups (configs/model/, configs/strategy/), the
label space from ``classes`` (a list), ``classes_file`` (one name a line) or the ``label_space`` entry (default: the
micro-CLIP's world classes), with ``templates`` and the ``reset`` policy; configs/serve.yaml holds the rest
(``serve.*``: `ctta.serve.ServeOptions`). The server itself is `ctta.serve.serve`; this script only builds its
objects. ``ctta serve ...`` and ``python -m ctta.serve ...`` start this script (the core never imports hydra).

What a user sees, as with scripts/run.py: a first line at once; set-up cheapest first (keys and types checked from
the targets' source before torch is imported, the class list read, then the strategy, the model, the state file);
a mistake of the user's making — a bad key or value, a missing classes file, a corrupt or foreign state file, a
missing extra — printed as ``error:`` / ``hint:`` lines with exit code 2 and no traceback (``--debug`` keeps it).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from configcheck import ConfigError, check_config, precheck  # beside this script; standard library only
from run import (_ENTERED, SetupError, _build, _debug_flag, check_device, check_top_level,
                 exit_code_two_for_config_errors)

log = logging.getLogger("ctta")

TOP_LEVEL = {"seed": (int,), "device": (str,), "threads": (int, type(None)), "host": (str,), "port": (int,),
             "log_level": (str,), "classes_file": (str, type(None)), "reset": (str, int, type(None))}


@hydra.main(config_path="../configs", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    _ENTERED.append(True)
    choices = HydraConfig.get().runtime.choices
    log.info("ctta serve: %s on %s at http://%s:%s; setting up ...", choices.get("strategy"), choices.get("model"),
             cfg.host, cfg.port)
    t0 = time.monotonic()
    try:
        _check_top_level(cfg)
        for where, entry in _entries(cfg):
            precheck(entry, where)  # wrong key or type: refused from the target's source, before torch loads
        classes = _classes(cfg)
        options = OmegaConf.to_container(cfg.serve, resolve=True)
    except (SetupError, ValueError) as e:
        _report(e)
        raise
    try:
        adapter, opts = _set_up(cfg, classes, options)
        from ctta.serve import serve
        log.info("set up in %.1f s; serving %s (%d classes, reset %s)", time.monotonic() - t0,
                 type(adapter.strategy).__name__, len(adapter.space), adapter.reset_policy)
        serve(adapter, opts, host=cfg.host, port=int(cfg.port), log_level=str(cfg.log_level))
    except Exception as e:
        _report(e)
        raise


def _set_up(cfg: DictConfig, classes: list[str] | None, options: dict) -> tuple[Any, Any]:
    from ctta.serve import ServeOptions, require
    require()  # the extra, before anything slow
    opts = ServeOptions.from_dict(options)
    import torch
    import ctta
    from ctta.predictions import SOURCE_SIDE
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    check_device(str(cfg.device))
    for where, entry in _entries(cfg):
        check_config(entry, where)
    # plain lists, not ListConfig: the strategy's recorded configuration (its state file's fingerprint) must be the
    # one a strategy built in Python records, so a state file fits the same strategy however it was built
    entry = OmegaConf.create({"_convert_": "all", **OmegaConf.to_container(cfg.strategy, resolve=True)})
    strategy = _build("strategy", entry, cfg)
    if classes is not None:
        space = ctta.LabelSpace(classes, *([list(cfg.templates)] if cfg.templates is not None else []))
    else:
        space = _build("label_space", cfg.label_space, cfg)
        if cfg.templates is not None:
            space = space.with_templates(list(cfg.templates))
    cache = getattr(strategy, "cache", None)
    if getattr(cache, "max_items", 0) is None:
        log.warning("the strategy caches every distinct image's features without a bound; a long-running server "
                    "grows with its traffic: set strategy.cache_size=N (or strategy.cache=false)")
    t = time.monotonic()
    model = _build("model", cfg.model, cfg)
    log.info("model %s ready (%.1f s)", cfg.model.get("arch", "?"), time.monotonic() - t)
    return ctta.wrap(model, strategy, space, reset=cfg.reset, seed=int(cfg.seed),
                     source_side=cfg.get("source_side", SOURCE_SIDE)), opts


def _entries(cfg: DictConfig) -> list[tuple[str, dict]]:
    out = [(g, OmegaConf.to_container(cfg[g], resolve=True)) for g in ("model", "strategy")]
    if cfg.classes is None and cfg.classes_file is None:
        out.append(("label_space", OmegaConf.to_container(cfg.label_space, resolve=True)))
    return out


def _check_top_level(cfg: DictConfig) -> None:
    check_top_level(cfg, TOP_LEVEL)
    if not 0 < cfg.port < 65536:
        raise SetupError(f"port={cfg.port}: expected a TCP port in 1..65535", "e.g. port=8000")
    if not isinstance(cfg.serve, DictConfig):
        raise SetupError("serve must be a group of options (serve.max_batch=..., ...)", "see configs/serve.yaml")
    for key in ("classes", "templates"):
        value = cfg.get(key)
        if value is not None and (not OmegaConf.is_list(value) or not all(isinstance(v, str) for v in value)):
            raise SetupError(f"{key}={value!r}: expected a list of strings",
                             f"e.g. '{key}=[red star,blue circle]'" if key == "classes"
                             else "e.g. 'templates=[\"a photo of a {}.\"]'")
    if cfg.classes is not None and cfg.classes_file is not None:
        raise SetupError("classes and classes_file are both set", "give one of them")


def _classes(cfg: DictConfig) -> list[str] | None:
    """The class names from ``classes`` or ``classes_file`` (None: the ``label_space`` entry)."""
    if cfg.classes is not None:
        names = [str(c) for c in cfg.classes]
        where = "classes"
    elif cfg.classes_file is not None:
        path = Path(cfg.classes_file).expanduser()
        if not path.is_file():
            raise SetupError(f"classes_file={path} does not exist", "give a text file with one class name a line")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SetupError(f"classes_file={path} cannot be read as UTF-8 text: {e}") from e
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        where = f"classes_file={path}"
    else:
        return None
    if not names:
        raise SetupError(f"{where} holds no class names", "one class name a line")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise SetupError(f"{where} names a class twice: {dups[:5]}", "each class once")
    return names


def _report(e: BaseException) -> None:
    """A user's mistake at set-up: plain ``error:`` / ``hint:`` lines and exit code 2; anything else keeps its
    traceback (a bug)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(e, Exception):
        return
    name = type(e).__name__
    if isinstance(e, SetupError):
        message, hint = e.message, e.hint
    elif isinstance(e, ConfigError):
        message, hint = str(e), "fix that key on the command line (python scripts/serve.py --help lists them)"
    elif name in ("StateError", "CorruptFileError"):
        message, hint = str(e), "move the file away, or set serve.state_path to another file"
    elif isinstance(e, ImportError) and "ctta[serve]" in str(e):
        message, hint = str(e), 'pip install "ctta[serve]"'
    elif isinstance(e, (ValueError, TypeError, FileNotFoundError, PermissionError)) and not _serving(e):
        message, hint = str(e), "check the values you set on the command line (python scripts/serve.py --help)"
    else:
        return
    print(f"error: {message}" + (f"\nhint: {hint}" if hint else "") + "\n(--debug shows the traceback)",
          file=sys.stderr, flush=True)
    raise SystemExit(2)


def _serving(e: BaseException) -> bool:
    """Whether ``e`` came from inside the running server (uvicorn's loop), not from set-up."""
    tb = e.__traceback__
    while tb is not None:
        if "uvicorn" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


if __name__ == "__main__":
    _debug_flag()
    exit_code_two_for_config_errors(main)
