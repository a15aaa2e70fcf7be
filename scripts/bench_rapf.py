"""Benchmark: RAPF with and without the feature cache on the built-in 10-task class-incremental stream, and RAPF
against the ZeroShot and Finetune baselines on the same stream.

Every run is the full `ctta.run` (training, the T×T accuracy matrix after every task, zero-shot retention on the
control tasks before the run and after every task), timed end to end on a fresh model. Image-encoder work is counted
by a forward pre-hook on the image tower (images that went through it), independently of the cache's own counters.
Strategy settings are composed by Hydra from ``configs/strategy/<name>.yaml`` (overrides, Hydra syntax:
``--set rapf.threshold=0.7``). ``--quick``: 2 tasks of tiny data, one epoch, ZeroShot and RAPF.

    python scripts/bench_rapf.py                      # all runs, micro-CLIP, writes runs/bench/rapf.json
    python scripts/bench_rapf.py --runs rapf rapf_nocache --epochs 3 --out /tmp/quick.json
"""
from __future__ import annotations

import time

import torch
from benchlib import ROOT, bench_parser, finish, ratio, start, table
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ctta import AccuracyMatrix, Clip, ZeroShotRetention, run
from streams.world import cil_stream, control_tasks

RUNS = {  # run name -> (strategy config, overrides in Hydra syntax)
    "zeroshot": ("zeroshot", ["strategy.cache=true"]),
    "zeroshot_nocache": ("zeroshot", ["strategy.cache=false"]),
    "rapf": ("rapf", ["strategy.cache=true"]),
    "finetune": ("finetune", []),
    "rapf_nocache": ("rapf", ["strategy.cache=false"]),
}
QUICK = {"runs": ["zeroshot", "rapf"], "tasks": 2, "epochs": 1, "per_class": (2, 1), "controls": 10}


def strategy_config(name: str, overrides: list[str]) -> dict:
    """``configs/strategy/<name>.yaml`` composed by Hydra (its defaults list followed) with ``overrides``."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("run", overrides=[f"strategy={name}", *overrides])
    return OmegaConf.to_container(cfg.strategy, resolve=True)


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """``strategy.field=value`` items -> Hydra overrides ``strategy.field=value`` per strategy config name."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        strategy, _, field = key.partition(".")
        if not field or not sep:
            raise SystemExit(f"--set expects strategy.field=value, got {item!r}")
        out.setdefault(strategy, []).append(f"strategy.{field}={value}")
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


# control accuracy after the last task, absolute
COLUMNS = [("run", lambda r: r["name"], ""), ("wall s", lambda r: r["wall_s"], ".1f"),
           ("enc imgs", lambda r: r["encoder_images"], "d"), ("avg", lambda r: 100 * r["average"], ".1f"),
           ("last", lambda r: 100 * r["last"], ".1f"), ("forget", lambda r: 100 * r["forgetting"], ".1f"),
           ("ctrl", lambda r: 100 * r["retention_acc"], ".1f"), ("ratio", lambda r: r["retention_ratio"], ".3f")]


def ratios(runs: dict[str, dict]) -> dict:
    """Cache on / off within this run: end-to-end speed-up, images through the encoder, same accuracy matrix."""
    out = {}
    for a, b in (("rapf", "rapf_nocache"), ("zeroshot", "zeroshot_nocache")):
        if a in runs and b in runs:
            ra, rb = runs[a]["accuracy_matrix"], runs[b]["accuracy_matrix"]
            out[a] = {"speedup_end_to_end": ratio(runs[b]["wall_s"], runs[a]["wall_s"]),
                      "encoder_images_ratio": ratio(runs[b]["encoder_images"], max(1, runs[a]["encoder_images"])),
                      "same_accuracy_matrix": ra == rb,
                      "max_abs_accuracy_diff": max(abs(x - y) for u, v in zip(ra, rb) for x, y in zip(u, v))}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "runs/bench/rapf.json", threads=None)
    ap.add_argument("--runs", nargs="+", default=["zeroshot", "rapf", "finetune", "rapf_nocache"], choices=RUNS)
    ap.add_argument("--weights", default="builtin", help="'builtin' (embedded micro-CLIP) or 'random'")
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=None, help="override the RAPF/Finetune epochs (quick checks)")
    ap.add_argument("--set", nargs="*", default=[], help="strategy.field=value overrides, e.g. rapf.threshold=0.7")
    ap.add_argument("--per-class", nargs=2, type=int, default=(50, 20), metavar=("TRAIN", "TEST"),
                    help="images per class in the stream (default 50 20; smaller for quick checks)")
    ap.add_argument("--controls", type=int, default=1000, help="images per retention control task")
    ap.add_argument("--seed", type=int, default=0)
    args = start(ap, argv, quick=QUICK)

    sets = parse_sets(args.set)
    known = {RUNS[r][0] for r in args.runs}
    if set(sets) - known:  # a typo would otherwise change nothing, silently
        raise SystemExit(f"--set names strategy configs {sorted(set(sets) - known)}, but these runs use "
                         f"{sorted(known)} (e.g. --set rapf.beta=2)")
    weights = None if args.weights == "random" else args.weights
    stream = cil_stream(args.tasks, train_per_class=args.per_class[0], test_per_class=args.per_class[1],
                        seed=args.seed)
    controls = control_tasks(n=args.controls, seed=args.seed)
    doc = {"bench": "rapf", "stream": stream.name, "tasks": len(stream), "weights": args.weights,
           "per_class": list(args.per_class), "controls": args.controls, "runs": {}}
    for name in args.runs:
        base, over = RUNS[name]
        epochs = [f"strategy.epochs={args.epochs}"] if args.epochs is not None and base != "zeroshot" else []
        cfg = strategy_config(base, [*over, *epochs, *sets.get(base, [])])
        r = doc["runs"][name] = one_run(name, cfg, stream, controls, weights, args.seed)
        print(f"{name}: {r['wall_s']:.1f} s, {r['encoder_images']} images encoded, last {100 * r['last']:.1f}",
              flush=True)
        doc["ratios"] = ratios(doc["runs"])
        finish(args, doc, seed=args.seed)  # after every run: partial results survive an interruption
    text = table(list(doc["runs"].values()), COLUMNS)
    if doc["ratios"]:
        text += "\n" + "\n".join(f"{k}: {v}" for k, v in doc["ratios"].items())
    return finish(args, doc, text, model=Clip.from_pretrained("micro-clip", weights), seed=args.seed)


if __name__ == "__main__":
    main()
