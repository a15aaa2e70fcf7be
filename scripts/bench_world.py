"""Renderer throughput of the built-in world: images/s of `streams.synthetic.sample_factors` + `render`.

    python scripts/bench_world.py [--batch 2000] [--repeats 5] [--threads 2] [--out runs/bench/world.json]

Times factor sampling and rendering separately (best of ``--repeats`` after one warm-up) and writes JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctta.io import atomic_write_json, provenance  # noqa: E402
from streams import synthetic as W  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs/bench/world.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    W.render(W.sample_factors(64, g))  # warm-up
    sample_s, render_s = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        f = W.sample_factors(a.batch, g)
        t1 = time.perf_counter()
        W.render(f)
        t2 = time.perf_counter()
        sample_s.append(t1 - t0)
        render_s.append(t2 - t1)
    best = min(s + r for s, r in zip(sample_s, render_s))
    doc = {"batch": a.batch, "repeats": a.repeats, "threads": a.threads, "world_version": W.WORLD_VERSION,
           "best_sample_s": min(sample_s), "best_render_s": min(render_s), "images_per_s": a.batch / best,
           "provenance": provenance(seed=0, config=vars(a))}
    atomic_write_json(a.out, doc)
    print(f"world v{W.WORLD_VERSION}: {a.batch / best:,.0f} images/s (batch {a.batch}, {a.threads} threads; "
          f"sampling {min(sample_s) * 1e3:.0f} ms, rendering {min(render_s) * 1e3:.0f} ms) -> {a.out}")


if __name__ == "__main__":
    main()
