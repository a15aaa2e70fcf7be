"""Benchmark the online runtime over a long sample stream: per-sample latency p50 / p95, samples/s, and resident
memory, which must stay flat (mean RSS over the first vs the last 10 % of the stream).

Every sample goes through `ctta.loop.run_samples`, i.e. through an `OnlineAdapter` call (input validation,
reset policy, strategy.adapt, softmax) plus the online metric hooks — what a deployed adapter pays per request.

    python scripts/bench_online.py                                 # 5,000 samples; zeroshot, tent, tent-episodic
    python scripts/bench_online.py --samples 20000 --strategies tent --out runs/bench/online_long.json

Each strategy runs in its own process. Writes JSON (default ``runs/bench/online.json``) and prints a table. Model: the embedded micro-CLIP (its random
initialisation if the weights are missing: timing does not need trained weights; accuracy then means nothing).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from ctta import Clip
from ctta.io import atomic_write_json, provenance
from ctta.model import BUILTIN_WEIGHTS
from ctta.online_hooks import Latency, Memory, OnlineAccuracy
from ctta.loop import run_samples
from ctta.strategies.tent import Tent
from ctta.strategies.zeroshot import ZeroShot
from streams.world import shift_tasks

STRATEGIES = {  # name -> (factory, adapter reset policy)
    "zeroshot": (lambda: ZeroShot(cache=False), "never"),  # a stream shows each image once: nothing to cache
    "zeroshot-cache": (ZeroShot, "never"),  # ZeroShot's default unbounded feature cache: grows with the stream
    "tent": (Tent, "never"),
    "tent-episodic": (Tent, "episodic"),  # a snapshot restore before every call: must not leak either
}


def load_model(device: str) -> tuple[Clip, str]:
    if BUILTIN_WEIGHTS.exists():
        return Clip.from_pretrained("micro-clip", "builtin", device=device), "builtin"
    torch.manual_seed(0)
    return Clip.from_pretrained("micro-clip", None, device=device), "random (embedded weights missing)"


def bench(name: str, stream, args) -> dict:
    factory, reset = STRATEGIES[name]
    model, weights = load_model(args.device)
    hooks = [OnlineAccuracy(), Latency(warmup=args.warmup), Memory(every=args.memory_every)]
    gc.collect()
    t0 = time.perf_counter()
    res = run_samples(model, factory(), stream, hooks, batch_size=args.batch_size, reset=reset, seed=0,
                      checkpoint_every=None, progress=False)
    wall = time.perf_counter() - t0
    lat, mem, online = res["latency"], res["memory"], res["online"]
    return {"strategy": name, "reset": reset, "weights": weights,
            "checkpoint_sha256": model.provenance().get("checkpoint_sha256"), "samples": online["n"], "wall_s": wall,
            "latency": lat, "memory": mem, "accuracy": online["cumulative_accuracy"], "ece": online["ece"],
            "per_domain_accuracy": {k: v["accuracy"] for k, v in online["per_domain"].items()}}


def table(rows: list[dict]) -> str:
    head = (f"{'strategy':<14} {'samples':>7} {'p50 ms':>7} {'p95 ms':>7} {'samp/s':>7} {'RSS first10%':>12} "
            f"{'RSS last10%':>11} {'growth':>7} {'2nd half':>8} {'peak RSS':>8} {'acc %':>6} {'ECE':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lat, rss = r["latency"], r["memory"]["rss"]
        lines.append(f"{r['strategy']:<14} {r['samples']:>7} {lat['p50_ms']:>7.2f} {lat['p95_ms']:>7.2f} "
                     f"{lat['samples_per_s']:>7.0f} {rss['first_10pct_mb']:>9.1f} MB {rss['last_10pct_mb']:>8.1f} MB "
                     f"{rss['growth_mb']:>+5.1f}MB {rss['second_half_growth_mb']:>+6.1f}MB {r['memory']['peak_rss_mb']:>6.0f}MB {100 * r['accuracy']:>6.1f} "
                     f"{r['ece']:>6.3f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=5000, help="stream length (rounded up to whole domains)")
    p.add_argument("--strategies", nargs="+", default=["zeroshot", "tent", "tent-episodic"], choices=list(STRATEGIES))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--setting", default="continual", help="shift setting of streams.world.shift_tasks")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20, help="calls left out of the latency figures")
    p.add_argument("--memory-every", type=int, default=10, help="sample RSS every N samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/bench/online.json"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one strategy, print its row as JSON
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # 10 corruptions x 100 classes per image per class: the smallest per_class that gives --samples
    stream = shift_tasks(severity=args.severity, per_class=max(1, math.ceil(args.samples / 1000)),
                         setting=args.setting)
    if args.one:
        print(json.dumps(bench(args.one, stream, args)))
        return
    # one process per strategy, so that each one's resident memory is its own (freed memory stays mapped)
    rows = [json.loads(subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name], check=True,
                                      capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for name in args.strategies]
    model, _ = load_model(args.device)
    doc = {"benchmark": "online", "stream": stream.name, "samples": rows[0]["samples"],
           "batch_size": args.batch_size, "severity": args.severity, "rows": rows,
           "provenance": provenance(model, seed=0, config=vars(args) | {"out": str(args.out)})}
    atomic_write_json(args.out, doc)
    print(f"{stream.name}, {rows[0]['samples']} samples, batch {args.batch_size}, device "
          f"{doc['provenance']['device']}")
    print(table(rows))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
