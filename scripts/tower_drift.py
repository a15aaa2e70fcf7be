"""Which tower moved in a continual run, and which one holds what it learnt.

    python scripts/tower_drift.py RUN_DIR [RUN_DIR ...] [--json OUT] [--device cpu]

For a task-stream run of `scripts/run.py` (finished, or stopped after some task): the model, stream and strategy are
rebuilt from the run folder's ``.hydra/config.yaml``, the weights at the start come from the model config, the
weights at the end from ``checkpoint.pt`` (hash-checked, ``weights_only`` load). For every task learnt so far, on its
test images, scored over the label space after the last task learnt (the run's own evaluation space):

- ``text_cos``: mean cosine between each of the task's class text features (`Clip.text_head`: the label space's
  templates averaged) at the start and at the end;
- ``image_cos``: mean cosine between each test image's features at the start and at the end;
- ``acc``: nearest-class-text accuracy with the towers mixed — ``end_end`` (both towers as trained), ``end_start``
  (trained image tower, untouched text tower: what the image tower carries alone), ``start_end``, ``start_start``
  (zero-shot).

It reads the shared CLIP only: a strategy's own head (RAPF's adapter) or cache is not in these figures, so for such
a strategy ``end_end`` is not its accuracy. Used to find out why LwF forgets more than fine-tuning on the shifted
class-incremental world (README, "Continual learning on the shifted world").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def tower_table(f0: Tensor, f1: Tensor, y: Tensor, t0: Tensor, t1: Tensor, classes: Tensor) -> dict:
    """Drift and mixed-tower accuracy of one task.

    ``f0`` / ``f1``: L2-normalised image features at the start / end ``[N, D]``; ``y``: their labels in the evaluation
    space ``[N]``; ``t0`` / ``t1``: class text features of the whole evaluation space ``[C, D]``; ``classes``: the
    task's classes (rows of ``t0`` / ``t1``)."""
    def acc(f: Tensor, t: Tensor) -> float:
        return float(((f @ t.T).argmax(1) == y).float().mean())

    return {"text_cos": float(F.cosine_similarity(t0[classes], t1[classes], dim=-1).mean()),
            "image_cos": float(F.cosine_similarity(f0, f1, dim=-1).mean()),
            "acc": {"end_end": acc(f1, t1), "end_start": acc(f1, t0), "start_end": acc(f0, t1),
                    "start_start": acc(f0, t0)}}


def _features(model, dataset, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    from ctta.data import iter_batches
    feats, labels = [], []
    with torch.no_grad():
        for images, y, *_ in iter_batches(dataset, batch_size, device=model.device):
            feats.append(model.encode_image(images).float().cpu())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def drift(run: Path, device: str = "cpu") -> dict:
    """The table of ``tower_table`` rows for every task the run at ``run`` has learnt."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ctta.files import safe_torch_load
    from ctta.state import check_same_structure

    cfg_path, ckpt_path = run / ".hydra" / "config.yaml", run / "checkpoint.pt"
    for p in (cfg_path, ckpt_path):
        if not p.is_file():
            raise FileNotFoundError(f"{run} is not a task-stream run folder of scripts/run.py: {p.name} is missing")
    cfg = OmegaConf.load(cfg_path)
    cfg.device = device
    stream = instantiate(cfg.stream, _convert_="all")
    if not hasattr(stream, "space_for"):
        raise ValueError(f"{run}: the stream {cfg.stream._target_} is a sample stream; this looks at task streams")
    saved = safe_torch_load(ckpt_path)
    done = int(saved["next_task"])
    if done < 1:
        raise ValueError(f"{run}: no task learnt yet")
    start = instantiate(cfg.model, _convert_="all").eval()
    end = instantiate(cfg.model, _convert_="all")
    strategy = instantiate(cfg.strategy, _convert_="all")
    strategy.setup(end)  # the strategy's own modules (LoRA) exist before the weights load
    check_same_structure(saved["model"], end.net.state_dict(), f"{ckpt_path}: model")
    end.net.load_state_dict(saved["model"])
    end.eval()
    space, _ = stream.space_for(done - 1, 0)
    with torch.no_grad():
        t0, t1 = start.text_head(space).float().cpu(), end.text_head(space).float().cpu()
    rows = []
    for k in range(done):
        _, offset = stream.space_for(done - 1, k)
        f0, y = _features(start, stream.tasks[k].test)
        f1, _ = _features(end, stream.tasks[k].test)
        classes = torch.arange(len(stream.tasks[k].space)) + offset
        rows.append({"task": k + 1, **tower_table(f0, f1, y + offset, t0, t1, classes)})
    return {"run": str(run), "strategy": cfg.strategy._target_.rsplit(".", 1)[-1], "tasks_learnt": done,
            "rows": rows}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders of scripts/run.py (task streams)")
    p.add_argument("--json", type=Path, help="write the tables here (atomically)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from ctta.io import atomic_write_json, provenance

    out = []
    for run in args.runs:
        d = drift(run, args.device)
        out.append(d)
        print(f"{d['run']} ({d['strategy']}, {d['tasks_learnt']} tasks learnt)")
        print("  task | text cos | image cos | acc end·end | end img·start text | start img·end text | start·start")
        for r in d["rows"]:
            a = r["acc"]
            print(f"  {r['task']:4d} | {r['text_cos']:8.3f} | {r['image_cos']:9.3f} | {100 * a['end_end']:11.1f} | "
                  f"{100 * a['end_start']:18.1f} | {100 * a['start_end']:18.1f} | {100 * a['start_start']:11.1f}")
        mean = {k: sum(r["acc"][k] for r in d["rows"]) / len(d["rows"]) for k in d["rows"][0]["acc"]}
        print("  mean | " + " | ".join(f"{k} {100 * v:.1f}" for k, v in mean.items()))
    if args.json:
        config = {"runs": [str(r) for r in args.runs], "device": args.device}
        atomic_write_json(args.json, {"runs": out, "provenance": provenance(config=config)})
        print(f"-> {args.json}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
