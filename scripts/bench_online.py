"""Benchmark the online runtime over a long sample stream: per-sample latency p50 / p95, samples/s, and resident
memory, which must stay flat (mean RSS over the first vs the last 10 % of the stream).

Every sample goes through `ctta.loop.run_samples`, i.e. through an `OnlineAdapter` call (input validation,
reset policy, strategy.adapt, softmax) plus the online metric hooks — what a deployed adapter pays per request.

    python scripts/bench_online.py                                 # 5,000 samples; zeroshot, tent, tent-episodic
    python scripts/bench_online.py --samples 20000 --strategies tent --out runs/bench/online_long.json

Each strategy runs in its own process. Writes JSON (default ``runs/bench/online.json``) and prints a table;
``--quick``: 100 samples of one domain, episodic TENT only. Model: the embedded micro-CLIP (its random initialisation
if the weights are missing: timing does not need trained weights; accuracy then means nothing).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import torch
from benchlib import bench_parser, child, finish, report, start, table

from ctta import Clip
from ctta.loop import run_samples
from ctta.model import BUILTIN_WEIGHTS
from ctta.online_hooks import Latency, Memory, OnlineAccuracy
from ctta.strategies.tent import Tent
from ctta.strategies.zeroshot import ZeroShot
from streams.corruptions import CORRUPTIONS
from streams.world import shift_tasks

STRATEGIES = {  # name -> (factory, adapter reset policy)
    "zeroshot": (lambda: ZeroShot(cache=False), "never"),  # a stream shows each image once: nothing to cache
    "zeroshot-cache": (ZeroShot, "never"),  # ZeroShot's default unbounded feature cache: grows with the stream
    "tent": (Tent, "never"),
    "tent-episodic": (Tent, "episodic"),  # a snapshot restore before every call: must not leak either
}
QUICK = {"samples": 100, "corruptions": ["contrast"], "strategies": ["tent-episodic"], "warmup": 5}


def load_model(device: str) -> tuple[Clip, str]:
    if BUILTIN_WEIGHTS.exists():
        return Clip.from_pretrained("micro-clip", "builtin", device=device), "builtin"
    torch.manual_seed(0)
    return Clip.from_pretrained("micro-clip", None, device=device), "random (embedded weights missing)"


def bench(name: str, stream, args) -> dict:
    factory, reset = STRATEGIES[name]
    model, weights = load_model(args.device)
    strategy = factory()
    strategy.setup(model)  # min_batch is known once set up (the run sets it up again, from the same model)
    # TENT on a BatchNorm tower (the micro-CLIP's ResNet) needs >= 2 images a call: one image has no batch statistics
    batch = max(args.batch_size, strategy.min_batch)
    hooks = [OnlineAccuracy(), Latency(warmup=args.warmup), Memory(every=args.memory_every)]
    gc.collect()
    t0 = time.perf_counter()
    res = run_samples(model, strategy, stream, hooks, batch_size=batch, reset=reset, seed=0,
                      checkpoint_every=None, progress=False)
    wall = time.perf_counter() - t0
    lat, mem, online = res["latency"], res["memory"], res["online"]
    return {"strategy": name, "reset": reset, "batch_size": batch, "weights": weights,
            "checkpoint_sha256": model.provenance().get("checkpoint_sha256"), "samples": online["n"], "wall_s": wall,
            "latency": lat, "memory": mem, "accuracy": online["cumulative_accuracy"], "ece": online["ece"],
            "per_domain_accuracy": {k: v["accuracy"] for k, v in online["per_domain"].items()}}


COLUMNS = [("strategy", lambda r: r["strategy"], ""), ("batch", lambda r: r["batch_size"], "d"),
           ("samples", lambda r: r["samples"], "d"),
           ("p50 ms", lambda r: r["latency"]["p50_ms"], ".2f"), ("p95 ms", lambda r: r["latency"]["p95_ms"], ".2f"),
           ("samples/s", lambda r: r["latency"]["samples_per_s"], ".0f"),
           ("RSS first 10% MB", lambda r: r["memory"]["rss"]["first_10pct_mb"], ".1f"),
           ("RSS last 10% MB", lambda r: r["memory"]["rss"]["last_10pct_mb"], ".1f"),
           ("growth MB", lambda r: r["memory"]["rss"]["growth_mb"], "+.1f"),
           ("2nd half MB", lambda r: r["memory"]["rss"]["second_half_growth_mb"], "+.1f"),
           ("peak RSS MB", lambda r: r["memory"]["peak_rss_mb"], ".0f"),
           ("acc %", lambda r: 100 * r["accuracy"], ".1f"), ("ECE", lambda r: r["ece"], ".3f")]


def main(argv: list[str] | None = None) -> dict | None:
    p = bench_parser(__doc__, "runs/bench/online.json")
    p.add_argument("--samples", type=int, default=5000, help="stream length (rounded up to whole domains)")
    p.add_argument("--strategies", nargs="+", default=["zeroshot", "tent", "tent-episodic"], choices=list(STRATEGIES))
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=list(CORRUPTIONS))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--setting", default="continual", help="shift setting of streams.world.shift_tasks")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20, help="calls left out of the latency figures")
    p.add_argument("--memory-every", type=int, default=10, help="sample RSS every N samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one strategy, report its row
    args = start(p, argv, quick=QUICK)
    # 100 classes x per_class images per corruption: the smallest per_class that gives --samples
    stream = shift_tasks(args.corruptions, severity=args.severity, setting=args.setting,
                         per_class=max(1, math.ceil(args.samples / (100 * len(args.corruptions)))))
    if args.one:
        report(bench(args.one, stream, args))
        return None
    # one process per strategy, so that each one's resident memory is its own (freed memory stays mapped)
    argv = list(sys.argv[1:] if argv is None else argv)
    rows = [child(__file__, [*argv, "--one", name]) for name in args.strategies]
    model, _ = load_model(args.device)
    head = (f"{stream.name}, {rows[0]['samples']} samples, batch {args.batch_size} (or the strategy's min_batch), "
            f"device {model.device}, {torch.get_num_threads()} threads")
    return finish(args, {"benchmark": "online", "stream": stream.name, "samples": rows[0]["samples"],
                         "batch_size": args.batch_size, "severity": args.severity, "rows": rows},
                  head + "\n" + table(rows, COLUMNS), model=model)


if __name__ == "__main__":
    main()
