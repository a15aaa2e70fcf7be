"""Renderer throughput of the built-in world: images/s of `streams.synthetic.sample_factors` + `render`.

    python scripts/bench_world.py [--batch 2000] [--repeats 5] [--threads 2] [--out runs/bench/world.json]

Times factor sampling and rendering separately (best of ``--repeats`` after one warm-up) and writes JSON.
"""
from __future__ import annotations

import torch
from benchlib import bench_parser, finish, start, table, timed

from streams import synthetic as W


def main(argv: list[str] | None = None) -> dict:
    p = bench_parser(__doc__, "runs/bench/world.json", threads=2)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    a = start(p, argv, quick={"batch": 64, "repeats": 1})
    g = torch.Generator().manual_seed(0)
    W.render(W.sample_factors(64, g))  # warm-up
    sample_s, render_s = [], []
    for _ in range(a.repeats):
        f = None

        def sample() -> None:
            nonlocal f
            f = W.sample_factors(a.batch, g)

        sample_s.append(timed(sample)[0])
        render_s.append(timed(lambda: W.render(f))[0])
    best = min(s + r for s, r in zip(sample_s, render_s))
    row = {"world_version": W.WORLD_VERSION, "batch": a.batch, "threads": torch.get_num_threads(),
           "best_sample_s": min(sample_s), "best_render_s": min(render_s), "images_per_s": a.batch / best}
    text = table([row], [("world", lambda r: f"v{r['world_version']}", ""), ("batch", lambda r: r["batch"], "d"),
                         ("threads", lambda r: r["threads"], "d"),
                         ("sampling ms", lambda r: 1e3 * r["best_sample_s"], ".0f"),
                         ("rendering ms", lambda r: 1e3 * r["best_render_s"], ".0f"),
                         ("images/s", lambda r: r["images_per_s"], ",.0f")])
    return finish(a, {"benchmark": "world", "repeats": a.repeats, **row}, text)


if __name__ == "__main__":
    main()
