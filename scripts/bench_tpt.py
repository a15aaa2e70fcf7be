"""Benchmark: TPT per-sample cost of ``ctta.strategies.tpt.TPT`` against the reference recipe, and the floor.

    python scripts/bench_tpt.py [--models micro vitb16] [--classes 10 200 1000] [--samples 3]
                                [--skip-ref-1000] [--no-memory] [--out runs/bench/tpt.json] [--quick]

- **ours**: `TPT.adapt` on one image (kornia views on the model's device, padding trimmed, view features encoded
  once, chunked text forward with checkpointing beyond 256 classes).
- **reference**: the azshue/TPT recipe re-implemented here on the same weights: 63 per-view PIL torchvision
  pipelines on the CPU (RandomResizedCrop + RandomHorizontalFlip, view 0 = Resize(bicubic) + CenterCrop), the full
  text context (77 tokens for ViT-B/16), one text batch of all classes, the 64-view image forward recomputed in the
  step, view 0 and the text re-encoded for the prediction.
- **floor**: the 64-view image forward plus one (trimmed) text forward/backward, measured alone.
Peak memory at the largest C: CUDA ``max_memory_allocated``; CPU: the peak resident set (VmHWM, reset through
``/proc/self/clear_refs`` before each measurement) minus the resident set before it. Timings are medians over
samples after one warm-up sample (none for the reference at C = 1000, which is slow on a CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from benchlib import bench_parser, child, finish, interleaved, ratio, report, start, table, timed, write

from ctta import Clip, LabelSpace
from ctta.adapters.prompts import PromptLearner
from ctta.losses import marginal_entropy, select_confident
from ctta.model import BUILTIN_WEIGHTS
from ctta.strategies.tpt import TPT

WORDS = ("red", "small", "striped", "wooden", "golden", "spotted", "tiny", "great", "white", "northern", "sea",
         "house", "car", "dog", "bird", "shark", "tree", "truck", "fish", "lamp", "chair", "kite", "snake", "frog",
         "boat", "clock", "horse", "owl", "bear", "cat", "ship", "tower", "bridge", "flower", "mountain", "lizard",
         "spider", "beetle", "monkey", "whale")


def class_names(n: int) -> list[str]:
    """Deterministic names of 1-3 common words (about 1-4 BPE tokens, like most ImageNet class names)."""
    out, k = [], 0
    while len(out) < n:
        a, b, c = WORDS[k % 40], WORDS[(k // 40) % 40], WORDS[(k // 1600) % 40]
        out.append([b, f"{a} {b}", f"{c} {a} {b}"][k % 3] if k >= 40 else a)
        out = list(dict.fromkeys(out))
        k += 1
    return out


def load_model(name: str, device: str) -> tuple[Clip, str]:
    if name == "micro":
        if BUILTIN_WEIGHTS.exists():
            return Clip.from_pretrained("micro-clip", "builtin", device=device), "micro-clip (builtin weights)"
        return Clip.from_pretrained("micro-clip", None, device=device), "micro-clip (random weights)"
    if name == "vitb16":
        return Clip.from_pretrained("ViT-B-16", None, device=device), "ViT-B-16 (random weights)"
    raise ValueError(f"unknown model {name!r}")


# ----------------------------------------------------------------------------------------- memory and timing
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


class Peak:
    """Peak extra memory (MiB) of the code inside the block."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.mib = (_rss_kb("VmHWM") * 1024 - self.base) / 2 ** 20


# ----------------------------------------------------------------------------------------- the three recipes
class Reference:
    """azshue/TPT's per-sample recipe (see the module docstring) on a given `Clip`."""

    def __init__(self, model: Clip):
        from torchvision import transforms as T
        self.m = model
        s = model.image_size
        self.base = T.Compose([T.Resize(s, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s), T.ToTensor()])
        self.aug = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor()])
        self.prompts = PromptLearner(model, "a photo of a", chunk_size=None)
        self.opt = torch.optim.AdamW([self.prompts.ctx], lr=5e-3)
        self.anchor = (self.prompts.ctx.detach().clone(), copy.deepcopy(self.opt.state_dict()))

    def __call__(self, pil, space: LabelSpace) -> torch.Tensor:
        m, p = self.m, self.prompts
        with torch.no_grad():  # model.reset() + optimizer.load_state_dict(optim_state)
            p.ctx.copy_(self.anchor[0])
        self.opt.load_state_dict(copy.deepcopy(self.anchor[1]))
        views = torch.stack([self.base(pil)] + [self.aug(pil) for _ in range(63)]).to(m.device)
        with torch.no_grad():
            feats = m.encode_image(views)
        logits = m.logits(feats, p(space, trim=False))
        sel = select_confident(logits, 0.1)
        loss = marginal_entropy(logits[sel])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            return m.logits(m.encode_image(views[:1]), p(space, trim=False))


def floor_fn(model: Clip, views: torch.Tensor, prompts: PromptLearner, space: LabelSpace):
    def run():
        with torch.no_grad():
            f = model.encode_image(views)
        text = prompts(space)
        (model.logits(f, text).logsumexp(-1).mean()).backward()
        prompts.ctx.grad = None
    return run


def setting(name: str, c: int, device: torch.device, samples: int):
    from torchvision.transforms.functional import to_pil_image
    model, desc = load_model(name, str(device))
    raw = model.image_size if name == "micro" else 256  # raw image side the views are cut from
    images = torch.rand(samples + 1, 3, raw, raw, generator=torch.Generator().manual_seed(0))
    space = LabelSpace(class_names(c), name=f"bench{c}")
    return model, desc, images, [to_pil_image(x) for x in images], space


def memory_child(args) -> None:
    """Run in a fresh process: peak memory (and time) of one sample of ``ours`` or ``reference``."""
    device = torch.device(args.device)
    model, _, images, pils, space = setting(args.model, args.classes[0], device, 1)
    if args.memory_child == "ours":
        tpt = TPT(view_batch=64)
        tpt.setup(model)
        fn = lambda: tpt.adapt(images[1:2].to(device), space)  # noqa: E731
    else:
        ref = Reference(model)
        fn = lambda: ref(pils[1], space)  # noqa: E731
    with Peak(device) as pk:
        wall, cpu = timed(fn, device)
    report({"peak_mib": pk.mib, "wall_s": wall, "cpu_s": cpu})


def run_child(kind: str, name: str, c: int, args) -> dict:
    """One sample of ``kind`` in a fresh process: its peak memory is its own."""
    return child(__file__, ["--memory-child", kind, "--model", name, "--classes", str(c), "--device", args.device,
                            "--threads", str(args.threads)])


def bench_model(name: str, args, device: torch.device, rows: list[dict], save) -> None:
    samples = args.vitb_samples if name == "vitb16" else args.samples
    warm = name != "vitb16"  # a ViT-B/16 sample on a CPU takes long enough that the first-call overhead is noise
    for c in sorted(args.classes):
        if any(r["model_key"] == name and r["classes"] == c for r in rows):
            continue  # --resume: measured already
        model, desc, images, pils, space = setting(name, c, device, samples)
        tpt = TPT(view_batch=64)
        tpt.setup(model)
        ref = Reference(model)
        plen = int(model.eot_positions(model.tokenize(tpt.prompts.prompt_texts(space.classnames))).max()) + 1
        row = {"model": desc, "model_key": name, "classes": c, "prompt_tokens": plen,
               "context_length": model.tokenize(["x"]).shape[1]}
        views = torch.rand(64, 3, model.image_size, model.image_size).to(device)
        fl = floor_fn(model, views, tpt.prompts, space)
        if warm:
            tpt.adapt(images[:1].to(device), space)
            fl()
        # interleaved, so that drifting machine load hits both alike (warmed up above)
        t = interleaved({"ours": lambda i: tpt.adapt(images[i:i + 1].to(device), space), "floor": lambda i: fl()},
                        samples, device, warmup=False)
        row["ours_s"], row["ours_cpu_s"] = t["ours"]["wall_s"], t["ours"]["cpu_s"]
        row["floor_s"], row["floor_cpu_s"] = t["floor"]["wall_s"], t["floor"]["cpu_s"]
        row["samples"] = samples
        slow = c >= 1000 and device.type == "cpu" and name != "micro"
        last = c == max(args.classes) and not args.no_memory  # peak memory at the largest C, in child processes
        if last:
            row["ours_peak_mib"] = run_child("ours", name, c, args)["peak_mib"]
        if slow and args.skip_ref_1000:
            row["reference_s"] = row["reference_cpu_s"] = None
        elif slow:  # one sample, timed in the memory child
            r = run_child("reference", name, c, args)
            row["reference_s"], row["reference_cpu_s"], row["reference_peak_mib"] = r["wall_s"], r["cpu_s"], r["peak_mib"]
        else:
            n_ref = min(samples, args.vitb_ref_samples) if name == "vitb16" else samples
            t = interleaved({"ref": lambda i: ref(pils[i], space)}, n_ref, device, warmup=warm)["ref"]
            row["reference_s"], row["reference_cpu_s"] = t["wall_s"], t["cpu_s"]
            if last:
                row["reference_peak_mib"] = run_child("reference", name, c, args)["peak_mib"]
        key = "_cpu_s" if device.type == "cpu" else "_s"
        row["ratio_basis"] = "cpu time" if device.type == "cpu" else "wall time"
        row["speedup_vs_reference"] = ratio(row["reference" + key], row["ours" + key])
        row["ratio_to_floor"] = ratio(row["ours" + key], row["floor" + key])
        rows.append(row)
        save()
        print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> dict | None:
    ap = bench_parser(__doc__, "runs/bench/tpt.json")
    ap.add_argument("--models", nargs="+", default=["micro", "vitb16"], choices=["micro", "vitb16"])
    ap.add_argument("--classes", nargs="+", type=int, default=[10, 200, 1000])
    ap.add_argument("--samples", type=int, default=3, help="timed samples per setting (after one warm-up)")
    ap.add_argument("--vitb-samples", type=int, default=1, help="timed samples for the ViT-B/16-sized model")
    ap.add_argument("--vitb-ref-samples", type=int, default=1, help="timed reference samples for ViT-B/16")
    ap.add_argument("--skip-ref-1000", action="store_true", help="skip the (slow) CPU reference at C >= 1000")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (child processes)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out, measure the rest")
    ap.add_argument("--memory-child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--model", default="micro", help=argparse.SUPPRESS)
    args = start(ap, argv, quick={"models": ["micro"], "classes": [10], "samples": 1, "no_memory": True})
    if args.memory_child:
        return memory_child(args)
    device = torch.device(args.device)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []

    def save() -> None:  # after every setting, so a long run that is stopped keeps what it measured
        write(out, {"rows": rows})

    for name in args.models:
        bench_model(name, args, device, rows, save)
    k = "_cpu_s" if device.type == "cpu" else "_s"
    columns = [("model", lambda r: r["model"], ""), ("C", lambda r: r["classes"], "d"),
               ("L", lambda r: r["prompt_tokens"], "d"), ("ours s", lambda r: r["ours" + k], ".3f"),
               ("ref s", lambda r: r["reference" + k], ".3f"), ("speed-up", lambda r: r["speedup_vs_reference"], ".1f"),
               ("floor s", lambda r: r["floor" + k], ".3f"), ("x floor", lambda r: r["ratio_to_floor"], ".2f"),
               ("peak MiB ours", lambda r: r["ours_peak_mib"], ".0f"),
               ("peak MiB ref", lambda r: r["reference_peak_mib"], ".0f")]
    text = f"\n({'CPU' if k == '_cpu_s' else 'wall'} seconds per sample)\n" + table(rows, columns)
    return finish(args, {"benchmark": "tpt", "device": str(device), "rows": rows}, text)


if __name__ == "__main__":
    main()
