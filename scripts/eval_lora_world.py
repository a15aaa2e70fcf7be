"""Rank-selective LoRA (CoDyRA) vs fixed-rank LoRA on the built-in world: accuracy, retention, ranks, drift.

    python scripts/eval_lora_world.py [--stream cil|dil] [--iterations 25] [--lr 2e-3] [--rank 16]
                                      [--kappa-max auto] [--methods zeroshot,lora,codyra] [--out runs/bench/...]

Runs each method through a world stream (`streams.world.cil_stream`: 100 colour×shape classes in 10 tasks, or
`streams.world.dil_stream`: one task per rendering style) with the same schedule, and reports the accuracy matrix
summary (average incremental / last accuracy, forgetting), zero-shot retention on the control tasks the stream never
trains on (`streams.world.control_tasks`: shape, size, background), the mean effective LoRA rank per module and
task, and the parameter drift ``||θ_T − θ_0||_F`` after the last task. ``--kappa-max auto`` scales the reference's
κ_max = 0.005 (500 iterations) by 500/iterations, keeping the cumulative shrinkage Σκ ≈ 0.65. Writes one JSON file
and prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctta import AccuracyMatrix, Clip, ZeroShotRetention, run  # noqa: E402
from ctta.hooks import StrategySummary  # noqa: E402
from ctta.io import atomic_write_json, provenance  # noqa: E402
from ctta.report import cl_row, cl_table  # noqa: E402
from ctta.strategies.lora_ft import LoRA  # noqa: E402
from ctta.strategies.rank_lora import RankSelectiveLoRA, kappa_schedule  # noqa: E402
from ctta.strategies.zeroshot import ZeroShot  # noqa: E402
from streams import world  # noqa: E402

METHODS = ("zeroshot", "lora", "codyra")


def build(method: str, a: argparse.Namespace):
    common = dict(rank=a.rank, lr=a.lr, batch_size=a.batch_size, iterations=a.iterations)
    if method == "zeroshot":
        return ZeroShot()
    if method == "lora":
        return LoRA(**common)
    if method == "codyra":
        return RankSelectiveLoRA(**common, kappa_max=a.kappa_max)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


class Progress:
    """Prints one line per finished task (these runs take minutes per method on a shared CPU)."""

    def __init__(self, label: str):
        self.label, self.t0 = label, time.perf_counter()

    def on_task_end(self, ctx) -> None:
        m, r = ctx.results.get("metrics", {}), ctx.results.get("retention", {})
        ranks = ctx.results.get("strategy", {}).get("mean_effective_rank")
        print(f"  {self.label} task {ctx.task_index + 1}/{len(ctx.stream)}: step acc "
              f"{100 * m.get('step_accuracy', [0])[-1]:.1f}  controls {100 * r.get('mean_acc', 0):.1f}"
              + (f"  eff. rank {ranks:.2f}" if ranks is not None else "")
              + f"  ({time.perf_counter() - self.t0:.0f} s)", flush=True)


def summarize(res: dict, strategy) -> dict:
    out = cl_row(res)
    tasks = res.get("strategy", {}).get("tasks", [])
    if tasks:
        out["effective_rank"] = sum(t["mean_effective_rank"] for t in tasks) / len(tasks)  # mean over tasks
        out["effective_rank_per_task"] = [t["mean_effective_rank"] for t in tasks]
        out["drift"] = tasks[-1]["drift"]
        out["drift_per_task"] = [t["drift"] for t in tasks]
        out["trainable_per_task"] = sum(p.numel() for lora in strategy.loras for p in lora.parameters())
    return out


LORA_COLUMNS = (("mean eff. rank", lambda s: f"{s['effective_rank']:.2f}" if "effective_rank" in s else "–"),
                ("‖θ_T−θ_0‖", lambda s: f"{s['drift']:.3f}" if "drift" in s else "0"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS}")
    p.add_argument("--stream", choices=("cil", "dil"), default="cil")
    p.add_argument("--checkpoint", default="builtin", help="micro-CLIP weights ('builtin' = the embedded ones, 'none' = random: smoke tests)")
    p.add_argument("--iterations", type=int, default=25, help="optimizer steps per task (same for all methods)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="reference 5e-4 over 500 iterations")
    p.add_argument("--kappa-max", default="auto", help="CoDyRA κ_max; 'auto' = 0.005 · 500 / iterations")
    p.add_argument("--train-per-class", type=int, default=None, help="default: the stream's own")
    p.add_argument("--test-per-class", type=int, default=5)
    p.add_argument("--control-n", type=int, default=150, help="images per control task")
    p.add_argument("--controls", default=None, help="comma list of world control tasks (default: the world's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="default runs/bench/eval_lora_world_<stream>.json")
    a = p.parse_args(argv)
    a.kappa_max = 0.005 * 500 / a.iterations if a.kappa_max == "auto" else float(a.kappa_max)
    a.out = a.out or str(ROOT / f"runs/bench/eval_lora_world_{a.stream}.json")
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")

    t0 = time.perf_counter()
    extra = {} if a.train_per_class is None else {"train_per_class": a.train_per_class}
    stream = (world.cil_stream(10, test_per_class=a.test_per_class, seed=a.seed, **extra) if a.stream == "cil"
              else world.dil_stream(test_per_class=a.test_per_class, seed=a.seed, **extra))
    names = {} if a.controls is None else {"names": [c.strip() for c in a.controls.split(",") if c.strip()]}
    controls = world.control_tasks(n=a.control_n, seed=a.seed, **names)
    print(f"world rendered in {time.perf_counter() - t0:.1f} s: {stream.name} ({len(stream)} tasks), "
          f"κ_max {a.kappa_max:.4g} (Σκ per task {sum(kappa_schedule(a.iterations, a.kappa_max)):.3f})", flush=True)

    rows, raw, model = {}, {}, None
    for method in methods:
        model = Clip.from_pretrained("micro-clip", None if a.checkpoint == "none" else a.checkpoint)
        strategy = build(method, a)
        t = time.perf_counter()
        hooks = [AccuracyMatrix(), ZeroShotRetention(controls), StrategySummary(), Progress(method)]
        res = run(model, strategy, stream, hooks, seed=a.seed, progress=False)
        s = summarize(res, strategy)
        s["wall_s"] = time.perf_counter() - t
        s["skipped_steps"] = strategy.skipped_steps
        rows[method], raw[method] = s, res
        print(f"{method:>9}: average {100 * s['average']:.1f}  last {100 * s['last']:.1f}  forgetting "
              f"{100 * s['forgetting']:.1f}  retention {s['retention_ratio']:.3f}  eff. rank "
              f"{s.get('effective_rank', 0):.2f}  drift {s.get('drift', 0):.3f} ({s['wall_s']:.0f} s)", flush=True)

    doc = {"settings": vars(a), "summary": rows, "results": raw, "total_wall_s": time.perf_counter() - t0,
           "provenance": provenance(model, seed=a.seed, config=vars(a))}
    atomic_write_json(a.out, doc)
    print(f"\n{cl_table(rows, LORA_COLUMNS)}\n\nwritten to {a.out} (total {doc['total_wall_s']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()
