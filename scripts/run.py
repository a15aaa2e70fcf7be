"""Run a strategy on a stream: python scripts/run.py strategy=finetune stream=world_cil [experiment=...]

Hydra builds the model, strategy, stream and hooks from configs/ (`_target_` paths, so a user's own strategy plugs
in with `-cd my_configs strategy=my_strategy` or `strategy._target_=my_pkg.MyStrategy`). Results, the accuracy-
matrix plot and a resumable checkpoint go to `out_dir`; re-running with the same `out_dir=...` resumes.
Under `torchrun --nproc_per_node=N scripts/run.py ...` it runs data-parallel (see `ctta.distributed`).
"""
import os
import sys
import tempfile

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ctta
from ctta import distributed
from ctta.report import format_summary
from streams.manifest import DatasetError


@hydra.main(config_path="../configs", config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    # Under torchrun: one process group for the run, one device per rank (cuda:LOCAL_RANK when there are GPUs).
    with distributed.launched(timeout_s=float(cfg.dist_timeout_s)) as device:
        if device is not None and device.type == "cuda":
            cfg.device = str(device)
        if distributed.world_size() > 1:
            # every rank must agree on where results go (${now} differs by a second between processes)
            cfg.out_dir = distributed.broadcast_object(str(cfg.out_dir), "out_dir")
        # The stream first: a real-data recipe verifies its dataset against the manifest, so a missing or damaged
        # dataset fails in seconds with what to download, before any model weights are loaded or downloaded.
        stream = _build_stream(cfg.stream)
        model = instantiate(cfg.model)
        strategy = instantiate(cfg.strategy)
        hooks = [instantiate(h) for h in cfg.hooks.values() if h is not None]
        results = ctta.run(model, strategy, stream, hooks, out_dir=cfg.out_dir, seed=cfg.seed,
                           config=OmegaConf.to_container(cfg, resolve=True), progress=cfg.progress,
                           samples=OmegaConf.to_container(cfg.samples, resolve=True))
        if distributed.is_main():
            print(f"{type(strategy).__name__} on {stream.name} -> {cfg.out_dir}"
                  + (f" ({distributed.world_size()} ranks)" if distributed.world_size() > 1 else ""))
            print(format_summary(results))
    return results


def _build_stream(cfg_stream: DictConfig):
    """Instantiate the stream; a missing or damaged dataset ends the run with the manifest's message as written
    (what is wrong, what to download, how to lay it out) rather than Hydra's one-line repr of the exception."""
    try:
        return instantiate(cfg_stream)
    except Exception as e:
        cause = e.__cause__ if isinstance(e.__cause__, DatasetError) else e
        if isinstance(cause, DatasetError):
            raise SystemExit(f"error: {cause}") from None
        raise


def _quiet_other_ranks() -> None:
    """Under torchrun only rank 0 writes: the other ranks' Hydra keeps its config and log files out of the run
    folder (and ${now} may differ by a second between processes; rank 0's out_dir is broadcast in main)."""
    if os.environ.get("RANK", "0") != "0":
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                     f"hydra.run.dir={tempfile.gettempdir()}"]


if __name__ == "__main__":
    _quiet_other_ranks()
    main()
