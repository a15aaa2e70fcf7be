"""Benchmark: reading a JPEG folder, today's path against `ctta.loading` (workers, prefetch, reduced-size decoding,
device decoding), end to end as a ZeroShot evaluation with the micro-CLIP, and evaluation sharded across ranks.

    python scripts/bench_data.py [--images 5000] [--cache DIR] [--workers 0 1 2] [--repeats 2] [--rank-images 1000]
                                 [--loading-images 1000] [--device cpu|cuda] [--quick]
                                 [--out benchmarks/results/data_throughput.json]

The folder (ImageNet layout: one folder per class): world images (`streams.synthetic`, the 100 colour x shape
classes) rendered at 400x400, centre-cropped to 400x300, with mild sensor noise so that the files weigh what
photos of that size do, saved as JPEG quality 90. Written once to ``--cache`` (default
``~/.cache/ctta/bench_data``), never to the repository.

- **loading**: one pass over ``--loading-images`` of the folder, batches of 256, no model: today's path (PIL
  decode at full size, float resize, one image after another in the training process), then
  `ctta.data.iter_batches` with 0, 1, 2 workers, reduced-size JPEG decoding (draft) off and on. Images/s and CPU
  utilisation (CPU seconds of the process and its workers per wall second).
- **end to end**: ZeroShot (micro-CLIP, feature cache on) over the whole folder, each path in a fresh child process,
  alternated ``--repeats`` times: today's path; the new defaults (auto workers, full-size decoding: the same pixels
  as today); the new loader with draft decoding. Wall time, CPU utilisation, peak memory of the process tree (PSS:
  shared pages counted once; and the plain RSS sum), and whether every prediction equals today's.
- **ranks**: the evaluation part (the accuracy-matrix hook's time) of a 5-task ZeroShot run over ``--rank-images``
  of the folder (evaluation batches of ``--rank-batch``), one process with one thread against ``torchrun`` with 2
  gloo ranks of one thread each, loading in process in both (so that the ratio is the sharding's); the accuracy
  matrices must be identical.
- **device decoding** (CUDA only): the loader to the GPU with nvJPEG decoding against PIL in the workers.
The machine's load average is recorded with every figure: on a shared machine only ratios taken in one run mean
anything.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from benchlib import ROOT, bench_parser, child, finish, ratio, report, start, table

from ctta import Clip, class_incremental
from ctta.data import Loading, iter_batches
from ctta.hooks import AccuracyMatrix
from streams.images import DRAFT_GAP, ImageFiles, image_folder

SIZE = (400, 300)
BATCH = 256


# ----------------------------------------------------------------------------------------------- the folder
def build_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` world images as JPEGs in class folders ``000_red_circle`` ... (sorted = the combo order), once."""
    from PIL import Image

    from streams import synthetic as W
    from streams.world import combo_classes
    folder = root / f"world_{SIZE[0]}x{SIZE[1]}_q90_n{n}_s{seed}"
    if (folder / "DONE").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    combos = combo_classes()
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(combos)
    f = W.sample_factors(n, g, styles=("filled", "outline"))
    f.shape = torch.tensor([W.SHAPES.index(s) for _, s in combos])[labels]
    f.colour = torch.tensor([W.COLOURS.index(c) for c, _ in combos])[labels]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU renders in moments (float noise aside)
    for s in range(0, n, 16):
        x = W.render(f[s:s + 16].to(device), SIZE[0]).cpu()  # the same scenes as the world's, drawn at 400x400
        x = x[:, :, (SIZE[0] - SIZE[1]) // 2:(SIZE[0] + SIZE[1]) // 2]  # 400 wide, 300 high
        x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # sensor noise: photo-like file sizes
        for k, img in enumerate(W.to_uint8(x).permute(0, 2, 3, 1).numpy()):
            c = int(labels[s + k])
            d = tmp / f"{c:03d}_{combos[c][0]}_{combos[c][1]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{s + k:05d}.jpg", quality=90)
    (tmp / "DONE").write_text(json.dumps({"images": n, "size": SIZE, "quality": 90, "seed": seed}))
    tmp.rename(folder)
    return folder


# ----------------------------------------------------------------------------------------------- measuring
class TreeMemory:
    """Peak memory of this process and its children (loader workers), sampled every 20 ms: PSS (shared pages split
    between the processes that map them) and the plain RSS sum (shared pages counted in every process)."""

    def __init__(self):
        self.pss = self.rss = 0
        self._stop = threading.Event()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        pids = [pid]
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    for c in fh.read().split():
                        pids += TreeMemory._tree(int(c))
        except OSError:
            pass
        return pids

    def sample(self) -> None:
        pss = rss = 0
        for pid in self._tree(os.getpid()):
            try:
                with open(f"/proc/{pid}/smaps_rollup") as fh:
                    for line in fh:
                        if line.startswith(("Pss:", "Rss:")):
                            kb = int(line.split()[1]) * 1024
                            pss, rss = (pss + kb, rss) if line.startswith("Pss:") else (pss, rss + kb)
            except OSError:
                pass
        self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)

    def __enter__(self):
        def loop():
            while not self._stop.wait(0.02):
                self.sample()
        self.sample()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children (loader workers are joined at the end)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def measure(fn) -> dict:
    load0 = os.getloadavg()[0]
    c, t = cpu_seconds(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    return {"wall_s": wall, "cpu_util": (cpu_seconds() - c) / wall, "load_before": load0,
            "load_after": os.getloadavg()[0], "out": out}


def today_batches(data: ImageFiles, batch_size: int):
    """The loop before `ctta.loading`: each image decoded by PIL at full size and resized, one after another."""
    for s in range(0, len(data), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(data)))
        items = [data[int(i)] for i in idx]
        yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items]), idx


def model_and_space(device: str):
    from ctta.model import BUILTIN_WEIGHTS
    from streams.world import combo_space
    weights = "builtin" if BUILTIN_WEIGHTS.exists() else None
    return Clip.from_pretrained("micro-clip", weights, device=device), combo_space()


def weights_id(model: Clip) -> str:
    """The loaded weights' hash: children compared side by side must have loaded the same shipped checkpoint."""
    from ctta.cache import weights_hash
    return weights_hash(model)[:16]


# ----------------------------------------------------------------------------------------------- child processes
def child_e2e(args) -> None:
    """One end-to-end ZeroShot evaluation of the folder in this fresh process."""
    from ctta.strategies.zeroshot import ZeroShot
    model, space = model_and_space(args.device)
    strategy = ZeroShot()
    strategy.setup(model)
    data, _ = image_folder(args.folder, model.image_size, draft=DRAFT_GAP if args.path == "draft" else None)

    def run() -> list[int]:
        batches = today_batches(data, BATCH) if args.path == "today" else \
            iter_batches(data, BATCH, device=model.device)
        preds = []
        for images, _, _ in batches:
            preds += strategy.predict(images.to(model.device), space).argmax(-1).tolist()
        return preds
    with TreeMemory() as mem:
        m = measure(run)
    preds = m.pop("out")
    report({**m, "peak_pss_mib": mem.pss / 2**20, "peak_rss_sum_mib": mem.rss / 2**20, "weights": weights_id(model),
            "preds": preds})


class TimedMatrix(AccuracyMatrix):
    """The accuracy matrix, timing its own evaluations (on every rank, like the matrix itself)."""

    seconds = 0.0

    def on_task_end(self, ctx) -> None:
        t = time.perf_counter()
        super().on_task_end(ctx)
        self.seconds += time.perf_counter() - t


def child_ranks(args) -> None:
    """A 5-task ZeroShot run over the first ``--rank-images`` of the folder; run alone or under torchrun."""
    from ctta import distributed, run
    from ctta.data import configure_loading
    from ctta.strategies.zeroshot import ZeroShot
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU ratio (gloo), also on a GPU machine: before CUDA starts
    torch.set_num_threads(1)
    configure_loading(workers=0)
    with distributed.launched():
        model, space = model_and_space("cpu")
        data, _ = image_folder(args.folder, model.image_size)
        per_class = max(1, args.rank_images // len(space))  # the first files of every class: 5 tasks of 20 classes
        seen: dict[int, int] = {}
        samples = []
        for path, y in zip(data.paths, data.targets.tolist()):
            seen[y] = seen.get(y, 0) + 1
            if seen[y] <= per_class:
                samples.append((path, y))
        part = ImageFiles(samples, model.image_size)
        stream = class_incremental(space, part, part, increment=20, seed=0)
        hook = TimedMatrix()
        t = time.perf_counter()
        r = run(model, ZeroShot(eval_batch_size=args.rank_batch), stream, [hook])
        total = time.perf_counter() - t
        seconds = distributed.gather_objects(hook.seconds, "eval seconds")
        if distributed.is_main():
            report({"eval_s": max(seconds), "eval_s_per_rank": seconds, "run_s": total,
                    "matrix": r["accuracy_matrix"], "ranks": distributed.world_size(), "load": os.getloadavg()[0],
                    "weights": weights_id(model)})


def ranks(args) -> dict:
    """One process, then 2 gloo ranks, of `child_ranks` (each 1 thread)."""
    base = [__file__, "--child", "ranks", "--folder", str(args.folder), "--rank-images", str(args.rank_images),
            "--rank-batch", str(args.rank_batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    one = child(base[0], base[1:])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"torchrun failed ({r.returncode}):\n{r.stderr[-3000:]}")
    two = json.loads(lines[-1][len("RESULT "):])
    return {"one": one, "two": two, "ratio": ratio(two["eval_s"], one["eval_s"]),
            "identical_matrix": one["matrix"] == two["matrix"]}


# ----------------------------------------------------------------------------------------------- main
def loading_rows(args, data_full: ImageFiles, data_draft: ImageFiles) -> list[dict]:
    device = torch.device(args.device)

    def drain(batches) -> int:
        return sum(len(y) for _, y, _ in batches)

    rows = [{"path": "today", "workers": 0, "draft": False, **measure(lambda: drain(today_batches(data_full, BATCH)))}]
    for workers in args.workers:
        for draft, data in ((False, data_full), (True, data_draft)):
            opts = Loading(workers=workers, device_decode=False)
            rows.append({"path": "new", "workers": workers, "draft": draft,
                         **measure(lambda: drain(iter_batches(data, BATCH, device=device, loading=opts)))})
    if device.type == "cuda":
        for workers in args.workers:
            opts = Loading(workers=workers, device_decode=True)
            rows.append({"path": "new", "workers": workers, "draft": False, "device_decode": True,
                         **measure(lambda: drain(iter_batches(data_full, BATCH, device=device, loading=opts)))})
    for r in rows:
        r["images_per_s"] = r.pop("out") / r["wall_s"]
    today = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / today
    return rows


def main(argv: list[str] | None = None) -> dict | None:
    p = bench_parser(__doc__, "benchmarks/results/data_throughput.json")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/ctta/bench_data"))
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=2, help="end-to-end runs of each path, alternated")
    p.add_argument("--rank-images", type=int, default=1000)
    p.add_argument("--rank-batch", type=int, default=50,
                   help="evaluation batch of the ranks part: ranks share whole batches, so 5 test sets of one batch "
                        "each would split 3:2; batches of 50 split 100-image sets evenly")
    p.add_argument("--loading-images", type=int, default=1000, help="images of each pass of the loading table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", choices=["e2e", "ranks"], help=argparse_hidden())
    p.add_argument("--path", choices=["today", "new", "draft"], help=argparse_hidden())
    p.add_argument("--folder", help=argparse_hidden())
    args = start(p, argv, quick={"images": 300, "repeats": 1, "rank_images": 200, "loading_images": 300})
    if args.child == "e2e":
        return child_e2e(args)
    if args.child == "ranks":
        return child_ranks(args)
    if args.quick and args.out == p.get_default("out"):
        args.out = str(ROOT / "runs/bench/data_throughput_quick.json")
    folder = build_folder(Path(args.cache), args.images)
    args.folder = str(folder)
    data_full, _ = image_folder(folder, 32, draft=None)
    data_draft, _ = image_folder(folder, 32, draft=DRAFT_GAP)
    files = [os.path.getsize(x) for x in data_full.paths]
    head = [(p, int(y)) for p, y in zip(data_full.paths[::max(1, len(files) // args.loading_images)],
                                         data_full.targets[::max(1, len(files) // args.loading_images)])]
    rows = loading_rows(args, ImageFiles(head, 32), ImageFiles(head, 32, draft=DRAFT_GAP))
    e2e: dict[str, list[dict]] = {"today": [], "new": [], "draft": []}
    for _ in range(args.repeats):
        for path in e2e:
            e2e[path].append(child(__file__, ["--child", "e2e", "--path", path, "--folder", args.folder,
                                             "--device", args.device]))
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in e2e.items()}
    ref = best["today"]["preds"]
    end_to_end = {k: {**{f: r[f] for f in r if f != "preds"},
                      "images_per_s": len(r["preds"]) / r["wall_s"],
                      "identical_predictions": all(x["preds"] == ref for x in e2e[k]),
                      "accuracy": sum(a == b for a, b in zip(r["preds"], data_full.targets.tolist())) / len(ref),
                      "agreement": sum(a == b for a, b in zip(r["preds"], ref)) / len(ref),
                      "all_wall_s": [x["wall_s"] for x in e2e[k]]} for k, r in best.items()}
    for k in end_to_end:
        end_to_end[k]["speedup"] = ratio(best["today"]["wall_s"], best[k]["wall_s"])
        end_to_end[k]["pss_vs_today"] = ratio(best[k]["peak_pss_mib"], best["today"]["peak_pss_mib"])
    sharded = ranks(args)
    doc = {"loading_images": len(head), "folder": {"images": len(files), "size": list(SIZE), "jpeg_quality": 90, "mean_kib": sum(files) / len(files)
                      / 1024, "path": str(folder)},
           "loading": rows, "end_to_end": end_to_end, "ranks": sharded}
    text = table(rows, [("path", lambda r: r["path"], ""), ("workers", lambda r: r["workers"], ""),
                        ("draft", lambda r: r["draft"], ""), ("img/s", lambda r: r["images_per_s"], ".0f"),
                        ("x today", lambda r: r["speedup"], ".2f"), ("CPU util", lambda r: r["cpu_util"], ".2f"),
                        ("load", lambda r: r["load_before"], ".1f")])
    text += "\n\n" + table([{"path": k, **v} for k, v in end_to_end.items()], [
        ("end to end", lambda r: r["path"], ""), ("wall s", lambda r: r["wall_s"], ".1f"),
        ("img/s", lambda r: r["images_per_s"], ".0f"), ("x today", lambda r: r["speedup"], ".2f"),
        ("CPU util", lambda r: r["cpu_util"], ".2f"), ("peak PSS MiB", lambda r: r["peak_pss_mib"], ".0f"),
        ("PSS/today", lambda r: r["pss_vs_today"], ".2f"), ("same preds", lambda r: r["identical_predictions"], ""),
        ("agreement", lambda r: r["agreement"], ".4f")])
    text += (f"\n\nevaluation part, {args.rank_images} images x 5 tasks: 1 process {sharded['one']['eval_s']:.1f} s, "
             f"2 gloo ranks {sharded['two']['eval_s']:.1f} s (ratio {sharded['ratio']:.2f}), identical matrix: "
             f"{sharded['identical_matrix']}")
    finish(args, doc, text)
    return doc


def argparse_hidden() -> str:
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
