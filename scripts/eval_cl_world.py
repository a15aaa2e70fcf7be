"""Continual fine-tuning baselines on the built-in world: ZeroShot, Finetune, LwF, VR-LwF, WiSE-FT.

    python scripts/eval_cl_world.py [--iterations 10] [--batch-size 32] [--lr 3e-4] [--methods zeroshot,finetune,...]
                                    [--checkpoint ctta/assets/micro-clip.safetensors] [--out runs/bench/eval_cl_world.json]
    python scripts/eval_cl_world.py --merge part1.json part2.json --out runs/bench/eval_cl_world.json

Runs each method through the 10-task class-incremental world stream (`streams.world.cil_stream`, 100 colour×shape
classes, 10 a task) with the same schedule (iterations per task, batch size, lr, warm-up, label smoothing) for every
trained method, and measures the accuracy matrix (average incremental / last accuracy, forgetting) and zero-shot
retention on the control tasks the stream never trains on (`streams.world.control_tasks`: shape, size, background).
Writes one JSON file (per-method results + provenance) and prints a markdown table. ``--merge`` combines the JSON
files of runs made with the same settings (e.g. methods run as parallel processes) into one table.
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

from ctta import AccuracyMatrix, Clip, ZeroShotRetention, run  # noqa: E402
from ctta.io import atomic_write_json, provenance  # noqa: E402
from ctta.report import cl_row, cl_table  # noqa: E402
from ctta.strategies.finetune import Finetune  # noqa: E402
from ctta.strategies.lwf import LwF  # noqa: E402
from ctta.strategies.vr_lwf import VRLwF  # noqa: E402
from ctta.strategies.zeroshot import ZeroShot  # noqa: E402
from streams import synthetic as W  # noqa: E402
from streams import world  # noqa: E402

METHODS = ("zeroshot", "finetune", "lwf", "vr_lwf", "wise_ft")
EXTRA = ("vr_lwf_words",)  # VR-LwF with the world's caption words as the replayed vocabulary (not the paper's)


def world_words() -> list[str]:
    """Single words of the world's captions (colours, shapes, sizes, background kinds): a domain vocabulary."""
    words = list(W.COLOURS) + list(W.SHAPES) + list(W.SIZES) + ["plain", "gradient", "striped", "noisy", "shape",
                                                                "background", "outline", "filled"]
    return list(dict.fromkeys(words))


def build(method: str, a: argparse.Namespace):
    sched = dict(params=a.params, lr=a.lr, warmup=a.warmup, label_smoothing=a.label_smoothing, batch_size=a.batch_size,
                 iterations=a.iterations)
    if method == "zeroshot":
        return ZeroShot()
    if method == "finetune":
        return Finetune(**sched)
    if method == "wise_ft":
        return Finetune(**sched, wise_alpha=a.wise_alpha)
    if method == "lwf":
        return LwF(**sched, temperature=a.temperature, distill_scale=a.distill_scale)
    if method == "vr_lwf":
        return VRLwF(**sched, temperature=a.temperature, distill_scale=a.distill_scale, n_sentences=a.n_sentences, length=a.length)
    if method == "vr_lwf_words":
        return VRLwF(**sched, temperature=a.temperature, distill_scale=a.distill_scale, vocabulary=world_words())
    raise ValueError(f"unknown method {method!r}; choose from {METHODS + EXTRA}")


def merge(paths: list[str], out: str) -> dict:
    docs = [json.loads(Path(f).read_text()) for f in paths]
    keys = ("params", "iterations", "batch_size", "lr", "warmup", "label_smoothing", "train_per_class", "test_per_class",
            "control_n", "seed", "checkpoint")
    for d in docs[1:]:
        diff = [k for k in keys if d["settings"][k] != docs[0]["settings"][k]]
        if diff:
            raise SystemExit(f"cannot merge runs with different settings: {diff}")
    order = {m: i for i, m in enumerate(METHODS + EXTRA)}
    rows = dict(sorted(((k, v) for d in docs for k, v in d["summary"].items()), key=lambda kv: order[kv[0]]))
    raw = {k: v for d in docs for k, v in d["results"].items()}
    doc = {"settings": {**docs[0]["settings"], "methods": ",".join(rows), "merged_from": paths}, "summary": rows,
           "results": raw, "total_wall_s": sum(d["total_wall_s"] for d in docs), "provenance": docs[0]["provenance"]}
    atomic_write_json(out, doc)
    print(f"{cl_table(rows)}\n\nwritten to {out}")
    return doc


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS + EXTRA}")
    p.add_argument("--checkpoint", default="builtin", help="micro-CLIP weights ('builtin' = the embedded ones)")
    p.add_argument("--iterations", type=int, default=10, help="optimizer steps per task (same for all methods)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--params", default="", help="parameter prefixes trained by every method ('' = all, 'visual.')")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--label-smoothing", type=float, default=0.2)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--distill-scale", type=lambda v: None if v == "model" else float(v), default=100.0,
                   help="LwF/VR-LwF distillation logit scale ('model' = the model's own exp(logit_scale))")
    p.add_argument("--n-sentences", type=int, default=1000)
    p.add_argument("--length", type=int, default=10)
    p.add_argument("--wise-alpha", type=float, default=0.5)
    p.add_argument("--train-per-class", type=int, default=50)
    p.add_argument("--test-per-class", type=int, default=5)
    p.add_argument("--control-n", type=int, default=200, help="images per control task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "runs/bench/eval_cl_world.json"))
    p.add_argument("--merge", nargs="+", default=None, help="combine these result files instead of running")
    a = p.parse_args(argv)
    if a.merge:
        return merge(a.merge, a.out)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS + EXTRA:
            p.error(f"unknown method {m!r}; choose from {METHODS + EXTRA}")

    t0 = time.perf_counter()
    stream = world.cil_stream(10, train_per_class=a.train_per_class, test_per_class=a.test_per_class, seed=a.seed)
    controls = world.control_tasks(n=a.control_n, seed=a.seed)
    print(f"world rendered in {time.perf_counter() - t0:.1f} s: {stream.name}, {len(controls)} control tasks")

    rows, raw, model = {}, {}, None
    for method in methods:
        model = Clip.from_pretrained("micro-clip", a.checkpoint)
        strategy = build(method, a)
        t = time.perf_counter()
        res = run(model, strategy, stream, [AccuracyMatrix(), ZeroShotRetention(controls)], seed=a.seed,
                  progress=False)
        s = cl_row(res)
        s["wall_s"] = time.perf_counter() - t
        s["skipped_steps"] = strategy.skipped_steps
        rows[method], raw[method] = s, res
        print(f"{method:>13}: average {100 * s['average']:.1f}  last {100 * s['last']:.1f}  forgetting "
              f"{100 * s['forgetting']:.1f}  retention {s['retention_ratio']:.3f} ({s['wall_s']:.0f} s)", flush=True)

    doc = {"settings": vars(a), "summary": rows, "results": raw, "total_wall_s": time.perf_counter() - t0,
           "provenance": provenance(model, seed=a.seed, config=vars(a))}
    atomic_write_json(a.out, doc)
    print(f"\n{cl_table(rows)}\n\nwritten to {a.out} (total {doc['total_wall_s']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()
