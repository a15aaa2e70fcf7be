"""Run a strategy on a stream: python scripts/run.py strategy=finetune stream=world_cil_shifted [experiment=...]

Hydra composes the model, strategy, stream and hooks from configs/ (`_target_` paths, so a user's own strategy plugs
in with `-cd my_configs strategy=my_strategy` or `'~strategy' +strategy._target_=my_pkg.MyStrategy name=...`).
Results, the accuracy-matrix plot and a resumable checkpoint go to `out_dir`; re-running with the same
`out_dir=...` resumes.
Under `torchrun --nproc_per_node=N scripts/run.py ...` it runs data-parallel (see `ctta.distributed`).

What a user sees, in order (tested by tests/test_cli.py):
1. A first line within a second or two, before torch is imported (`--help` never imports it).
2. Set-up, cheapest first, so that a mistake costs seconds: every ``_target_`` entry is checked against its
   signature (scripts/configcheck.py: unknown keys, simple types; first from the targets' source before torch is
   imported, then from the imported targets), then the stream is built (a real-data recipe verifies
   its dataset), then the strategy and hooks, then the output folder's checkpoint is compared with this run (a
   foreign one is refused with the fields that differ), and only then are weights loaded. That early read is the
   resume's only one: the loop takes the state it read (``Checkpoint.read(..., hold=True)``).
3. Errors of the user's making at set-up (a bad value, a missing dataset, a foreign checkpoint, an unwritable
   folder) are printed as plain text with a hint in command-line terms and exit code 2, without a traceback;
   ``--debug`` or ``HYDRA_FULL_ERROR=1`` keeps tracebacks.
4. Nothing is written into out_dir before those checks pass. Hydra itself writes nothing (``hydra.run.dir: .``,
   ``hydra.output_subdir: null`` in configs/run.yaml): this script writes ``.hydra/config.yaml`` and
   ``.hydra/overrides.yaml`` (for a new run, or a folder without them) and appends to ``run.log`` once the checks
   have passed (scripts/runfolder.py). The alternative, Hydra's per-attempt output subfolders, would still create
   and log into the folder before the check, and scatter a run's config over attempts. A run that fails at set-up
   removes what it created (the folder itself when it made it and nothing else is in it).
5. The summary, also appended to ``run.log``, with a line saying what each printed metric means.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from configcheck import check_config, precheck  # beside this script; standard library only (no torch)
from runfolder import RunFolder

log = logging.getLogger("ctta")

TOP_LEVEL_TYPES = {"seed": (int,), "progress": (bool, type(None)), "threads": (int, type(None)), "device": (str,),
                   "dist_timeout_s": (int, float), "out_dir": (str,), "data_root": (str,)}


class SetupError(Exception):
    """A user's mistake found at set-up: ``message`` and ``hint`` are printed as they are, exit code 2."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


@hydra.main(config_path="../configs", config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    _ENTERED.append(True)
    choices = HydraConfig.get().runtime.choices
    log.info("ctta: %s on %s -> %s; setting up (imports, stream, strategy, model) ...",
             choices.get("strategy"), choices.get("stream"), cfg.out_dir)
    t0 = time.monotonic()
    try:
        check_top_level(cfg)
        check_experiment(choices.get("experiment"))
        for where, entry in _entries(cfg):
            precheck(entry, where)  # from the targets' source: a wrong key or type is refused before torch loads
    except (SetupError, ValueError) as e:
        _report(e, cfg, at_setup=True)
        raise
    from ctta import distributed  # torch: seconds; the line above comes first

    with distributed.launched(timeout_s=float(cfg.dist_timeout_s)) as device:
        if device is not None and device.type == "cuda":
            cfg.device = str(device)
        if distributed.world_size() > 1:
            # every rank must agree on where results go (${now} differs by a second between processes)
            cfg.out_dir = distributed.broadcast_object(str(cfg.out_dir), "out_dir")
        folder = RunFolder(Path(str(cfg.out_dir)), main=distributed.is_main())
        try:
            run = _set_up(cfg, folder)
        except BaseException as e:
            folder.discard()
            _report(e, cfg, at_setup=True)
            raise
        log.info("set up in %.1f s; running", time.monotonic() - t0)
        import ctta
        try:
            return _run(ctta, cfg, run, folder)
        except KeyboardInterrupt as e:  # said here, so that run.log has it too, while it is open
            log.warning("%s: what the last checkpoint holds is kept; run the same command to resume",
                        e.args[0] if e.args else "interrupted")
            _ENTERED.append("interrupt reported")
            raise
        finally:
            folder.close()  # under -m, the next job's run.log is another file


def _run(ctta, cfg: DictConfig, run: dict[str, Any], folder: RunFolder) -> dict:
    """The loop, then the summary (printed, and appended to run.log)."""
    from ctta import distributed
    from ctta.report import format_summary
    try:
        results = ctta.run(run["model"], run["strategy"], run["stream"], run["hooks"], out_dir=cfg.out_dir,
                           seed=cfg.seed, config=OmegaConf.to_container(cfg, resolve=True), progress=cfg.progress,
                           samples=OmegaConf.to_container(cfg.samples, resolve=True))
    except BaseException as e:
        if _raised_at_loop_setup(e):  # the loop's own checks (a foreign hook state, samples.* values)
            folder.discard()
            _report(e, cfg, at_setup=True)
        raise
    if distributed.is_main():
        head = (f"{type(run['strategy']).__name__} on {run['stream'].name} -> {cfg.out_dir}"
                + (f" ({distributed.world_size()} ranks)" if distributed.world_size() > 1 else ""))
        summary = "\n".join([head, format_summary(results), *legend(results)])
        print(summary, flush=True)
        folder.log_summary(summary)
    return results


# ------------------------------------------------------------------------------------------------ set-up
def _set_up(cfg: DictConfig, folder: RunFolder) -> dict[str, Any]:
    """Check, build and prepare everything but the loop; raises `SetupError` (or the target's own error)."""
    if cfg.get("loading") is not None:  # worker processes, prefetch, device decoding for image files
        from ctta.data import configure_loading
        try:
            configure_loading(**OmegaConf.to_container(cfg.loading, resolve=True))
        except (TypeError, ValueError) as e:
            raise SetupError(str(e), "e.g. loading.workers=auto (or 0, 2, ...), loading.device_decode=auto") from e
    import torch
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if "device" in cfg:
        check_device(str(cfg.device))
    for where, entry in _entries(cfg):
        check_config(entry, where)  # from the imported targets: re-exports, inherited **kwargs
    samples = OmegaConf.to_container(cfg.samples, resolve=True) if cfg.get("samples") else {}

    t = time.monotonic()
    # The stream first: a real-data recipe verifies its dataset against the manifest, so a missing or damaged
    # dataset fails in seconds with what to download, before any model weights are loaded or downloaded.
    stream = _build("stream", cfg.stream, cfg)
    log.info("stream %s: %d tasks, %d test images (%.1f s)", stream.name, len(stream),
             sum(len(task.test) for task in stream.tasks), time.monotonic() - t)
    strategy = _build("strategy", cfg.strategy, cfg)
    hooks = [_build(f"hooks.{k}", h, cfg) for k, h in (cfg.hooks or {}).items() if h is not None]
    for h in hooks:  # hooks with evaluation bars follow the run's progress setting
        if hasattr(h, "progress"):
            h.progress = cfg.progress
    if folder.main:
        folder.check_resume(stream, strategy, int(cfg.seed), samples, hooks)
        folder.open(cfg)
    t = time.monotonic()
    log.info("loading model %s (%s) ...", cfg.model.get("arch", "?"), cfg.model.get("pretrained", "?"))
    model = _build("model", cfg.model, cfg)
    log.info("model ready (%.1f s)", time.monotonic() - t)
    return {"stream": stream, "strategy": strategy, "hooks": hooks, "model": model}


def _entries(cfg: DictConfig) -> list[tuple[str, dict]]:
    """The config entries that are calls: model, strategy, stream, each hook, and the sample loop's options."""
    out = [(g, OmegaConf.to_container(cfg[g], resolve=True)) for g in ("model", "strategy", "stream")]
    out += [(f"hooks.{k}", OmegaConf.to_container(h, resolve=True)) for k, h in (cfg.get("hooks") or {}).items()
            if h is not None]
    samples = OmegaConf.to_container(cfg.samples, resolve=True) if cfg.get("samples") else {}
    out.append(("samples", {"_target_": "ctta.loop.samples.run_samples", "_partial_": True, **samples}))
    return out


def check_top_level(cfg: DictConfig, types: dict[str, tuple] = TOP_LEVEL_TYPES) -> None:
    """No ``???`` left anywhere, and each top-level key of ``types`` that the config has is of one of its types
    (scripts/serve.py checks its own keys with this too)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SetupError(f"{', '.join(missing)} must be set (the config has ??? there)",
                         " ".join(f"{k}=..." for k in missing))
    for key, allowed in types.items():
        if key not in cfg:
            continue
        value = cfg[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise SetupError(f"{key}={value!r}: expected {want}", f"e.g. {key}={EXAMPLES.get(key, 'null')}")
    for key, low in (("threads", 1), ("dist_timeout_s", 0)):
        value = cfg.get(key)
        bad = value is not None and not value >= low  # NaN fails >= too
        if bad or (key == "dist_timeout_s" and value == 0):
            raise SetupError(f"{key}={value!r}: must be a number {'>=' if low else '>'} {low}",
                             f"e.g. {key}={EXAMPLES[key]}")
    if "out_dir" in cfg and not str(cfg.out_dir).strip():
        raise SetupError("out_dir is empty: results, the checkpoint and run.log need a folder",
                         f"e.g. out_dir={EXAMPLES['out_dir']}")
    name = cfg.get("name")
    if isinstance(name, str) and (not name.strip() or "/" in name or "\\" in name or ".." in name):
        raise SetupError(f"name={name!r}: a run's name is one folder under runs/ (no '/', '\\' or '..')",
                         "e.g. name=my_run, or out_dir=PATH to choose the folder itself")


EXAMPLES = {"seed": "0", "progress": "true", "threads": "2", "device": "cpu", "dist_timeout_s": "1800",
            "out_dir": "runs/my_run", "data_root": "data", "host": "127.0.0.1", "port": "8000"}


def check_device(device: str) -> None:
    """A device torch knows and this machine has, refused in words before any weights load."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SetupError(f"device={device!r} is not a torch device", "e.g. device=cpu, device=cuda or device=cuda:1"
                         ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device={device}: torch sees no CUDA GPU on this machine", "device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SetupError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA GPUs",
                         "e.g. device=cuda:0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SetupError(f"device={device}: torch sees no Apple GPU (MPS) on this machine", "device=cpu")


def check_experiment(choice: str | None) -> None:
    """``experiment`` is an optional group (most runs have none), and Hydra silently skips an optional choice it
    cannot find: a misspelt ``experiment=...`` would run the default job instead. Refuse it, naming near matches."""
    if choice is None:
        return
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType
    loader = GlobalHydra.instance().config_loader()

    def names(group: str, prefix: str = "") -> list[str]:
        out = [prefix + n for n in loader.get_group_options(group, results_filter=ObjectType.CONFIG)]
        for sub in loader.get_group_options(group, results_filter=ObjectType.GROUP):
            out += names(f"{group}/{sub}", f"{prefix}{sub}/")
        return out

    known = names("experiment")
    if choice not in known:
        import difflib
        near = difflib.get_close_matches(choice, known, n=3, cutoff=0.5)
        raise SetupError(f"experiment={choice}: there is no such experiment (configs/experiment/{choice}.yaml)",
                         (f"did you mean {' or '.join('experiment=' + n for n in near)}? " if near else "")
                         + f"{len(known)} experiments: python scripts/run.py --help lists them")


def _build(where: str, entry: DictConfig, cfg: DictConfig) -> Any:
    """``instantiate`` one entry; an error of the target's own checks becomes a `SetupError` naming the key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    try:
        # plain lists and dicts, not OmegaConf containers: a strategy's recorded configuration (its checkpoint
        # fingerprint) is then the same as the same strategy built in Python, so their states load into each other
        return instantiate(entry, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if not isinstance(cause, (ValueError, TypeError, FileNotFoundError, PermissionError)):
            raise  # not a value the user set: a bug, with its traceback
        text = str(cause)
        keys = [k for k in entry if not str(k).startswith("_") and (  # the key's name, or its value, in the message
            re.search(rf"\b{re.escape(str(k))}\b", text)
            or isinstance(entry.get(k), str) and len(entry.get(k)) >= 3 and entry.get(k) in text)]
        target = entry.get("_target_", "?")
        if type(cause).__name__ == "DatasetError":
            hint = (f"data_root=PATH (now {cfg.data_root}) must hold the dataset in the layout above (the CTTA_DATA "
                    "variable sets it too)")
            if "verify_level" in entry:
                hint += (f"; {where}.verify_level=structure checks the files without checksums (now "
                         f"{entry.verify_level})")
            raise SetupError(str(cause), hint) from cause
        named = ", ".join(f"{where}.{k}" for k in keys) or f"the {where}.* keys"
        raise SetupError(f"{where} ({target}): {cause}",
                         f"check {named}; the defaults are in configs/{where.split('.')[0]}/") from cause


# --------------------------------------------------------------------------------------------- messages
def _raised_at_loop_setup(e: BaseException) -> bool:
    """Whether ``e`` came from the loop's own checks before any work (`RunMismatch`; a ValueError raised directly
    in run_tasks / run_samples, e.g. samples.batch_size=0) rather than from inside training."""
    if type(e).__name__ in ("RunMismatch", "PermissionError"):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not isinstance(e, (ValueError, TypeError)):
        return False
    code = tb.tb_frame.f_code
    return code.co_name in ("run", "run_tasks", "run_samples") and f"{os.sep}loop{os.sep}" in code.co_filename


def _report(e: BaseException, cfg: DictConfig, at_setup: bool) -> None:
    """Print a user error found at set-up plainly and exit 2; anything else (a bug) goes on with its traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(e, Exception):
        return
    name = type(e).__name__
    if isinstance(e, SetupError):
        message, hint = e.message, e.hint
    elif name == "ConfigError":
        message, hint = str(e), "fix that key on the command line (python scripts/run.py --help lists the groups)"
    elif name == "RunMismatch":
        message = str(e)
        hint = (f"out_dir={cfg.out_dir} holds another run: resume it with its settings ({cfg.out_dir}/.hydra/"
                f"config.yaml), or give this run another out_dir=...")
    elif name in ("PermissionError", "CorruptFileError"):
        message, hint = str(e), "choose another out_dir=..."
    elif name == "FolderBusy":
        message, hint = str(e), None
    elif at_setup and isinstance(e, (ValueError, TypeError)):
        message, hint = str(e), "check the values you set on the command line (python scripts/run.py --help)"
    else:
        return
    rank = os.environ.get("RANK", "0")
    prefix = "" if rank == "0" else f"rank {rank}: "
    print(f"{prefix}error: {message}" + (f"\n{prefix}hint: {hint}" if hint else "")
          + f"\n{prefix}(--debug shows the traceback)", file=sys.stderr, flush=True)
    raise SystemExit(2)


def legend(results: dict) -> list[str]:
    """What each printed metric means, a few indented lines (the run's summary and run.log)."""
    import textwrap
    out = []
    m = results.get("metrics")
    if m and "step_accuracy" in m:
        out.append("average: mean over steps of the accuracy on all classes seen so far; last: that accuracy after "
                   "the final task; forgetting: mean drop of each earlier task from its best accuracy to its final "
                   "one; BWT: mean change on earlier tasks since each was learnt (negative = forgotten). For a "
                   "zero-shot model, forgetting and BWT only measure the growth of the label space (more classes "
                   "to tell apart), not lost knowledge.")
    elif m:
        out.append("transfer: accuracy on tasks before they are trained; average: mean over all evaluations; "
                   "last: after the final task; forgetting: drop from each task's best accuracy; BWT: change since "
                   "each task was learnt (negative = forgotten).")
    if results.get("retention", {}).get("mean_ratio") is not None:
        out.append("zero-shot retention: accuracy on held-out control tasks the stream never trains on, after the "
                   "run / before it (ratio 1.000: zero-shot ability kept; drop in points).")
    if results.get("online"):
        out.append("online: accuracy of the adapter's prediction for each sample as it arrives (labels never reach "
                   "the strategy), per domain and cumulative; domain error = 1 - domain accuracy; ECE: expected "
                   "calibration error (20 bins).")
    return [line for text in out for line in textwrap.wrap(text, 110, initial_indent="  ", subsequent_indent="  ")]


def _quiet_other_ranks() -> None:
    """Under torchrun only rank 0 writes: the other ranks' Hydra logs nothing to the console twice (and ${now} may
    differ by a second between processes; rank 0's out_dir is broadcast in main)."""
    if os.environ.get("RANK", "0") != "0":
        sys.argv += ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                     f"hydra.run.dir={tempfile.gettempdir()}"]


_ENTERED: list[bool] = []  # set when a main() body starts: Hydra composed the config


def exit_code_two_for_config_errors(entry) -> None:
    """Run ``entry`` (a ``@hydra.main`` function). Hydra refuses an unknown key or group option (``foo=1``,
    ``strategy=nope``) with its own message and exit code 1, before our checks run; those are a user's mistakes
    too, so they exit 2 like every other set-up error. A failure once the run has started keeps its code."""
    try:
        entry()
    except SystemExit as e:
        if e.code == 1 and not _ENTERED:
            raise SystemExit(2) from None
        raise


def stop_plainly(entry) -> None:
    """Run ``entry``; Ctrl-C or SIGTERM stop it without a traceback (the loops' ``finally`` blocks still run: loader
    workers stop, nothing half-written is left), saying that the same command resumes, with the shell's exit codes
    130 and 143."""
    import signal

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise KeyboardInterrupt("stopped by SIGTERM")

    signal.signal(signal.SIGTERM, terminated)
    try:
        entry()
    except KeyboardInterrupt as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sigterm = e.args == ("stopped by SIGTERM",)
        if "interrupt reported" not in _ENTERED:  # stopped before the run started: nothing to resume yet
            print(f"\n{e.args[0] if sigterm else 'interrupted'} during set-up", file=sys.stderr, flush=True)
        raise SystemExit(143 if sigterm else 130) from None


def _debug_flag() -> None:
    """``--debug``: keep tracebacks (Hydra's own errors included) by setting HYDRA_FULL_ERROR=1."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"


if __name__ == "__main__":
    _debug_flag()
    _quiet_other_ranks()
    stop_plainly(lambda: exit_code_two_for_config_errors(main))
