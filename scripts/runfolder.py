"""The run folder as one attempt of scripts/run.py finds it: what it may write there, and what to remove when set-up
fails. `RunFolder.check_resume` takes the folder's lock (`ctta.files.FolderLock`: a second run given the same folder
is refused while the first runs) and compares the folder's checkpoint with this run before anything else is written;
then `RunFolder.open` writes ``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` (a new run, or a folder without
them) and appends this attempt's log lines to ``run.log``. Hydra itself writes nothing (configs/run.yaml:
``hydra.run.dir: .``, ``hydra.output_subdir: null``): Hydra's own files would be written before any check could run.

The checkpoint is read once: `check_resume` reads it through the loop's own `Checkpoint.read` with ``hold=True``,
and the loop's read then takes that state (ctta/loop/checkpoint.py) instead of hashing and loading the file again.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ctta")


class _Solo:
    """The `Parallel` surface `Checkpoint.read` uses, for rank 0's early look at the folder (no collectives)."""
    main, active = True, False

    @staticmethod
    def from_main(state: Any, what: str) -> Any:
        return state


_CONFIG_FLAGS = ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name")


def command_line(overrides: list[str], argv: list[str] | None = None, env: dict[str, str] | None = None) -> str:
    """The command that repeats (and so resumes) this run, pasteable in a shell: the script, Hydra's config-location
    flags from ``argv`` (a user's own ``-cd my_configs``), the overrides quoted, and ``PYTHONPATH`` when it is set
    (a user's own strategy package)."""
    import os
    import shlex
    import sys
    argv = sys.argv if argv is None else argv
    env = os.environ if env is None else env
    flags: list[str] = []
    for i, a in enumerate(argv[1:], 1):
        if a in _CONFIG_FLAGS and i + 1 < len(argv):
            flags += [a, argv[i + 1]]
        elif a.startswith(tuple(f + "=" for f in _CONFIG_FLAGS if f.startswith("--"))):
            flags.append(a)
    parts = ["python", "scripts/run.py", *flags, *overrides]
    prefix = f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} " if env.get("PYTHONPATH") else ""
    return prefix + " ".join(shlex.quote(x) for x in parts)


class RunFolder:
    """``out_dir`` as this attempt found it: what it may write there, and what to remove if set-up fails."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main = path, main
        self.existed = path.exists()
        # the folders above it that this attempt may create (runs/<name>/ for runs/<name>/<time>/), nearest first
        self.new_parents = [q for q in path.parents if not q.exists()]
        self.created: list[Path] = []  # files this attempt wrote, in order
        self.handler: logging.Handler | None = None
        self.held = False  # a checkpoint state read by check_resume, waiting for the loop to take it
        self.resuming = False  # the folder holds a checkpoint of this run
        self.lock: Any = None  # ctta.files.FolderLock, held from check_resume to close

    def check_resume(self, stream, strategy, seed: int, samples: dict, hooks: list | tuple = ()) -> None:
        """Compare the folder's checkpoint with this run before anything is written or any weights load. The state
        read is held for the loop, whose read takes it (and checks the fingerprint again, without reading the file
        again)."""
        from ctta.loop import samples as sample_loop
        from ctta.loop import tasks as task_loop
        from ctta.loop.checkpoint import Checkpoint, ensure_writable
        from ctta.online import resolve_policy

        if any(t.train is not None for t in stream.tasks):
            name, fp = task_loop.CHECKPOINT, task_loop.fingerprint(stream, strategy, seed, hooks=hooks)
        else:
            policy = resolve_policy(samples.get("reset"), strategy)
            name = sample_loop.CHECKPOINT
            fp = sample_loop.fingerprint(stream, strategy, seed, samples.get("batch_size", 1), policy, hooks=hooks,
                                         reset_on_shift=samples.get("reset_on_shift", True))
        ensure_writable(self.path)
        from ctta.files import FolderLock
        lock = FolderLock(self.path)
        if not lock.path.exists():
            self.created.append(lock.path)
        lock.acquire()  # FolderBusy while another run writes here (two jobs given one name)
        self.lock = lock
        if (self.path / name).exists():
            self.held = self.resuming = True
            # raises RunMismatch naming the fields; the model is compared by the loop's own read, once it is built
            Checkpoint(self.path, name, fp, _Solo(), partial=True).read("cpu", hold=True)

    def open(self, cfg: DictConfig) -> None:
        """Write the run's config (a new run: also over the config of an attempt killed before its first
        checkpoint, which left nothing to resume) and start appending this attempt's log lines to run.log."""
        from ctta.files import atomic_write_bytes
        hydra_dir = self.path / ".hydra"
        if not self.resuming or not (hydra_dir / "config.yaml").exists():
            self.created.append(atomic_write_bytes(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode()))
            overrides = OmegaConf.to_yaml(list(HydraConfig.get().overrides.task))
            self.created.append(atomic_write_bytes(hydra_dir / "overrides.yaml", overrides.encode()))
        logfile = self.path / "run.log"
        if not logfile.exists():
            self.created.append(logfile)
        self.handler = logging.FileHandler(logfile, mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(self.handler)
        log.info("run %s: %s", self.path, command_line(HydraConfig.get().overrides.task))

    def log_summary(self, text: str) -> None:
        if self.handler is not None:
            self.handler.emit(logging.LogRecord("ctta.summary", logging.INFO, __file__, 0, "results:\n%s",
                                                (text,), None))

    def close(self) -> None:
        """Stop logging into run.log; forget a held checkpoint state the loop did not take (it failed first)."""
        if self.held:
            from ctta.loop.checkpoint import drop_held
            drop_held()
            self.held = False
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def discard(self) -> None:
        """Set-up failed: remove what this attempt wrote, and the folder (and the folders above it) when it made them
        and they are now empty."""
        if not self.main:
            return
        self.close()
        for p in reversed(self.created):
            p.unlink(missing_ok=True)
        for d in (self.path / ".hydra", self.path, *self.new_parents):
            try:
                if d.is_dir() and not any(d.iterdir()) and (d != self.path or not self.existed or self._fresh()):
                    d.rmdir()
            except OSError:
                pass

    def _fresh(self) -> bool:
        """An empty folder that existed before: one Hydra's sweep made for this job (``hydra.sweep.subdir``)."""
        return HydraConfig.get().mode.name == "MULTIRUN"
