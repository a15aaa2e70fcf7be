"""TPT vs zero-shot on the built-in world's shift streams (micro-CLIP), per corruption and severity.

    python scripts/eval_tpt_world.py [--severities 3 5] [--per-domain 100] [--variants zeroshot tpt tpt_online]
                                     [--out runs/tpt_world.json]

One domain per (corruption, severity) of `streams.world.shift_tasks` (setting "reset": boundaries revealed), the
100-way colour×shape task. Variants: ``zeroshot`` (frozen CLIP, "a {}."), ``tpt`` (episodic TPT, context from "a" so
that the untuned prompt is the zero-shot prompt), ``tpt_online`` (never reset within a domain, reset at each revealed
boundary), ``ctpt`` (episodic C-TPT, λ = 20 as for natural shifts). Prints accuracy (%) and ECE (20 bins) per
domain and their means, and writes them to JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctta import Clip  # noqa: E402
from ctta.metrics import expected_calibration_error  # noqa: E402
from ctta.strategies.tpt import TPT  # noqa: E402
from ctta.strategies.zeroshot import ZeroShot  # noqa: E402
from streams.corruptions import CORRUPTIONS  # noqa: E402
from streams.world import shift_tasks  # noqa: E402

VARIANTS = {
    "zeroshot": lambda: ZeroShot(),
    "tpt": lambda: TPT(ctx_init="a", reset_every=1),
    "tpt_online": lambda: TPT(ctx_init="a", reset_every=None),
    "ctpt": lambda: TPT(ctx_init="a", reset_every=1, ctpt_lambda=20.0),
}


def run_domain(strategy, task, per_domain: int, batch: int) -> dict:
    if hasattr(strategy, "reset"):
        strategy.reset()  # the "reset" setting reveals every domain boundary
    n = min(per_domain, len(task.test))
    idx = torch.arange(n)
    images, labels = task.test.get_batch(idx)
    logits, t = [], time.perf_counter()
    for i in range(0, n, batch):
        logits.append(strategy.adapt(images[i:i + batch], task.space).detach().float().cpu())
    seconds = time.perf_counter() - t
    probs = torch.cat(logits).softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    return {"acc": 100 * float(correct.mean()), "ece": 100 * expected_calibration_error(conf, correct),
            "n": n, "s_per_sample": seconds / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    ap.add_argument("--severities", nargs="+", type=int, default=[3, 5])
    ap.add_argument("--per-domain", type=int, default=100, help="test images per (corruption, severity)")
    ap.add_argument("--variants", nargs="+", default=["zeroshot", "tpt", "tpt_online"], choices=list(VARIANTS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--random-weights", action="store_true", help="smoke test without the embedded checkpoint")
    ap.add_argument("--out", default=str(ROOT / "runs" / "tpt_world.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Clip.from_pretrained("micro-clip", None if args.random_weights else "builtin")
    per_class = max(1, -(-args.per_domain // 100))
    stream = shift_tasks(args.corruptions, args.severities, per_class=per_class, setting="reset")
    results: dict[str, dict[str, dict]] = {}
    for v in args.variants:
        strategy = VARIANTS[v]()
        strategy.setup(model)
        results[v] = {}
        for task in stream.tasks:
            results[v][task.name] = run_domain(strategy, task, args.per_domain, args.batch)
            r = results[v][task.name]
            print(f"{v:<11} {task.name:<18} acc {r['acc']:5.1f}  ece {r['ece']:5.1f}  "
                  f"{1000 * r['s_per_sample']:6.0f} ms/sample", flush=True)
    domains = [t.name for t in stream.tasks]
    print(f"\n{'domain':<18}" + "".join(f"{v:>22}" for v in args.variants) + "   (acc % / ECE %)")
    for d in domains + ["mean"]:
        cells = []
        for v in args.variants:
            rs = [results[v][x] for x in domains] if d == "mean" else [results[v][d]]
            acc = sum(r["acc"] for r in rs) / len(rs)
            ece = sum(r["ece"] for r in rs) / len(rs)
            cells.append(f"{acc:13.1f} / {ece:5.1f}")
        print(f"{d:<18}" + "".join(f"{c:>22}" for c in cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_meta = Path(str(model.provenance().get("pretrained") or "")).with_suffix(".meta.json")
    meta = {"model": model.provenance(), "checkpoint_meta": json.loads(ckpt_meta.read_text()) if ckpt_meta.is_file()
            else None, "per_domain": args.per_domain, "severities": args.severities,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
