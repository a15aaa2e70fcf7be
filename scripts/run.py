"""Run a strategy on a stream: python scripts/run.py strategy=finetune stream=world_cil [experiment=...]

Hydra builds the model, strategy, stream and hooks from configs/ (`_target_` paths, so a user's own strategy plugs
in with `-cd my_configs strategy=my_strategy` or `strategy._target_=my_pkg.MyStrategy`). Results, the accuracy-
matrix plot and a resumable checkpoint go to `out_dir`; re-running with the same `out_dir=...` resumes.
"""
import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import ctta
from ctta.report import format_summary


@hydra.main(config_path="../configs", config_name="run", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    model = instantiate(cfg.model)
    strategy = instantiate(cfg.strategy)
    stream = instantiate(cfg.stream)
    hooks = [instantiate(h) for h in cfg.hooks.values() if h is not None]
    results = ctta.run(model, strategy, stream, hooks, out_dir=cfg.out_dir, seed=cfg.seed,
                       config=OmegaConf.to_container(cfg, resolve=True), progress=cfg.progress,
                       samples=OmegaConf.to_container(cfg.samples, resolve=True))
    print(f"{type(strategy).__name__} on {stream.name} -> {cfg.out_dir}")
    print(format_summary(results))
    return results


if __name__ == "__main__":
    main()
