"""Benchmark: RAPF with and without the feature cache on the built-in 10-task class-incremental stream, and RAPF
against the ZeroShot and Finetune baselines on the same stream.

Every run is the full `ctta.run` (training, the T×T accuracy matrix after every task, zero-shot retention on the
control tasks before the run and after every task), timed end to end on a fresh model. Image-encoder work is counted
by a forward pre-hook on the image tower (images that went through it), independently of the cache's own counters.
Strategy settings come from ``configs/strategy/<name>.yaml`` (overrides: ``--set rapf.threshold=0.7``).

    python scripts/bench_rapf.py                      # all runs, micro-CLIP, writes runs/bench/rapf.json
    python scripts/bench_rapf.py --runs rapf rapf_nocache --epochs 3 --out /tmp/quick.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate

from ctta import AccuracyMatrix, Clip, ZeroShotRetention, run
from ctta.io import atomic_write_json, provenance
from streams.world import cil_stream, control_tasks

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # run name -> (strategy config, overrides)
    "zeroshot": ("zeroshot", {"cache": True}),
    "zeroshot_nocache": ("zeroshot", {"cache": False}),
    "rapf": ("rapf", {"cache": True}),
    "finetune": ("finetune", {}),
    "rapf_nocache": ("rapf", {"cache": False}),
}


def strategy_config(name: str, overrides: dict) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "strategy" / f"{name}.yaml").read_text())
    cfg.pop("defaults", None)
    cfg.update(overrides)
    return cfg


def parse_sets(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        strategy, _, field = key.partition(".")
        if not field:
            raise SystemExit(f"--set expects strategy.field=value, got {item!r}")
        out.setdefault(strategy, {})[field] = yaml.safe_load(value)
    return out


def one_run(name: str, cfg: dict, stream, controls, weights: str | None, seed: int) -> dict:
    torch.manual_seed(seed)  # the same random weights in every run when --weights random
    model = Clip.from_pretrained("micro-clip", weights)
    images = {"n": 0, "calls": 0}

    def count(_module, args):
        images["n"] += args[0].shape[0]
        images["calls"] += 1

    model.net.visual.register_forward_pre_hook(count)
    strategy = instantiate(cfg)
    t0 = time.perf_counter()
    res = run(model, strategy, stream, [AccuracyMatrix(), ZeroShotRetention(controls)], seed=seed, progress=False)
    wall = time.perf_counter() - t0
    m, ret = res["metrics"], res["retention"]
    cache = getattr(strategy, "cache", None)
    return {"name": name, "config": cfg, "wall_s": wall, "encoder_images": images["n"],
            "encoder_forwards": images["calls"], "cache": cache.stats() if cache is not None else None,
            "average": m["average"], "last": m["last"], "forgetting": m["forgetting"], "bwt": m["bwt"],
            "step_accuracy": m["step_accuracy"], "accuracy_matrix": res["accuracy_matrix"],
            "retention_acc0": ret.get("mean_acc0"), "retention_acc": ret.get("mean_acc"),
            "retention_ratio": ret.get("mean_ratio"), "skipped_steps": strategy.skipped_steps}


def table(runs: dict[str, dict]) -> str:
    # control accuracy after the last task (absolute: RAPF's "before" value is that of its random adapter)
    head = f"{'run':18s} {'wall s':>8s} {'enc imgs':>9s} {'avg':>6s} {'last':>6s} {'forget':>7s} {'ctrl':>6s}"
    rows = [head, "-" * len(head)]
    for r in runs.values():
        rows.append(f"{r['name']:18s} {r['wall_s']:8.1f} {r['encoder_images']:9d} {100 * r['average']:6.1f} "
                    f"{100 * r['last']:6.1f} {100 * r['forgetting']:7.1f} {100 * (r['retention_acc'] or 0):6.1f}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["zeroshot", "rapf", "finetune", "rapf_nocache"], choices=RUNS)
    ap.add_argument("--weights", default="builtin", help="'builtin' (embedded micro-CLIP) or 'random'")
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=None, help="override the RAPF/Finetune epochs (quick checks)")
    ap.add_argument("--set", nargs="*", default=[], help="strategy.field=value overrides, e.g. rapf.threshold=0.7")
    ap.add_argument("--per-class", nargs=2, type=int, default=(50, 20), metavar=("TRAIN", "TEST"),
                    help="images per class in the stream (default 50 20; smaller for quick checks)")
    ap.add_argument("--controls", type=int, default=1000, help="images per retention control task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "rapf.json"))
    args = ap.parse_args()

    sets = parse_sets(args.set)
    weights = None if args.weights == "random" else args.weights
    stream = cil_stream(args.tasks, train_per_class=args.per_class[0], test_per_class=args.per_class[1],
                        seed=args.seed)
    controls = control_tasks(n=args.controls, seed=args.seed)
    doc = {"bench": "rapf", "stream": stream.name, "tasks": len(stream), "weights": args.weights,
           "per_class": list(args.per_class), "controls": args.controls,
           "torch_threads": torch.get_num_threads(),
           "provenance": provenance(Clip.from_pretrained("micro-clip", weights), seed=args.seed), "runs": {}}
    for name in args.runs:
        base, over = RUNS[name]
        cfg = strategy_config(base, {**over, **sets.get(base, {})})
        if args.epochs is not None and "epochs" in cfg:
            cfg["epochs"] = args.epochs
        doc["runs"][name] = one_run(name, cfg, stream, controls, weights, args.seed)
        r = doc["runs"][name]
        print(f"{name}: {r['wall_s']:.1f} s, {r['encoder_images']} images encoded, last {100 * r['last']:.1f}",
              flush=True)
        _ratios(doc)
        atomic_write_json(args.out, doc)  # after every run: partial results survive an interruption
    print(table(doc["runs"]))
    if "ratios" in doc:
        print(json.dumps(doc["ratios"], indent=1))
    print(f"wrote {args.out}")


def _ratios(doc: dict) -> None:
    runs = doc["runs"]
    for a, b in (("rapf", "rapf_nocache"), ("zeroshot", "zeroshot_nocache")):
        if a in runs and b in runs:
            doc.setdefault("ratios", {})[a] = {
                "speedup_end_to_end": runs[b]["wall_s"] / runs[a]["wall_s"],
                "encoder_images_ratio": runs[b]["encoder_images"] / max(1, runs[a]["encoder_images"]),
                "same_accuracy_matrix": runs[a]["accuracy_matrix"] == runs[b]["accuracy_matrix"],
                "max_abs_accuracy_diff": max(abs(x - y) for ra, rb in zip(runs[a]["accuracy_matrix"],
                                                                       runs[b]["accuracy_matrix"])
                                             for x, y in zip(ra, rb))}


if __name__ == "__main__":
    main()
