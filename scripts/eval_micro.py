"""Zero-shot evaluation of the micro-CLIP on the synthetic world.

    python scripts/eval_micro.py [--checkpoint ctta/assets/micro-clip.safetensors] [--n 2000]

Reports: 100-way "a {colour} {shape}." on seen and on held-out combos (filled + outline styles, the
pre-training styles; the textured style separately), the control tasks (shape only, colour only, size,
background type), and the 100-way task under every corruption at severities 3 and 5. Writes the
numbers into ``<checkpoint>.meta.json`` (key ``zeroshot``) and a markdown table to
``streams/WORLD_RESULTS.md``. Only plain open_clip is used to load the model.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import open_clip  # noqa: E402

from ctta.io import atomic_write_bytes  # noqa: E402
from streams import synthetic as W  # noqa: E402
from streams.corruptions import CORRUPTIONS, corrupt  # noqa: E402
import representation as R  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PRETRAIN_STYLES = ("filled", "outline")
EVAL_SEED = 20261124

# task name -> (class prompts, function factors -> labels)
CONTROL_TASKS = {
    "shape": ([f"a {s}." for s in W.SHAPES], lambda f: f.shape),
    "colour": ([f"a {c} shape." for c in W.COLOURS], lambda f: f.colour),
    "size": ([f"a {s} shape." for s in W.SIZES], lambda f: f.size),
    "background": ([f"a shape {p}." for p in W._BG_PHRASE], lambda f: f.background),
}
COMBO_PROMPTS = [f"a {c} {s}." for c in W.COLOURS for s in W.SHAPES]  # index colour * 10 + shape


def load(checkpoint: str | Path, config: str | Path = ROOT / "ctta/assets/micro-clip.json"):
    """Load the micro-CLIP with plain open_clip; returns (model in eval mode, tokenizer)."""
    open_clip.add_model_config(str(config))
    model = open_clip.create_model("micro-clip", pretrained=str(checkpoint))
    return model.eval(), open_clip.get_tokenizer("micro-clip")


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device)[:, None, None]
    std = torch.tensor(STD, device=images.device)[:, None, None]
    out = [model.encode_image((images[i:i + batch] - mean) / std, normalize=True)
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def report(model, tokenizer, per_class: int = 20, **kw) -> dict:
    """The representation report (``representation.py``) of an open_clip model: NN same-class rates, cosines,
    zero-shot per severity, TPT crop coverage."""
    head = encode_texts(model, tokenizer, COMBO_PROMPTS)
    return R.representation(lambda x: encode_images(model, x), head, per_class=per_class, **kw)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    return model.encode_text(tokenizer(texts), normalize=True)


def accuracy(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * ((image_features @ text_features.T).argmax(1) == labels).float().mean().item()


def eval_sets(n: int, seed: int = EVAL_SEED) -> dict[str, W.Factors]:
    """Fixed evaluation factors: seen / held-out combos in the pre-training styles, and textured."""
    g = torch.Generator().manual_seed(seed)
    seen = W.sample_factors(n, g, exclude_combos=W.HELD_OUT, styles=PRETRAIN_STYLES)
    held = W.sample_factors(n, g, combos=W.HELD_OUT, styles=PRETRAIN_STYLES)
    textured = W.sample_factors(n, g, styles=("textured",))
    return {"seen": seen, "held_out": held, "textured": textured}


def evaluate(model, tokenizer, n: int = 2000, corruptions: bool = True, severities=(3, 5),
             n_corrupt: int = 500) -> dict:
    """All zero-shot numbers (percent) as a flat dict.

    Corruptions are applied to the first ``n_corrupt`` seen plus the first ``n_corrupt`` held-out
    images (``100way_clean_sub`` is their clean accuracy, the reference for the drops).
    """
    sets = eval_sets(n)
    combo_head = encode_texts(model, tokenizer, COMBO_PROMPTS)
    res: dict[str, float] = {}
    images = {k: W.render(f) for k, f in sets.items()}
    feats = {k: encode_images(model, x) for k, x in images.items()}
    for k, f in sets.items():
        res[f"100way_{k}"] = accuracy(feats[k], combo_head, f.combo_index())
    both = W.Factors.cat([sets["seen"], sets["held_out"]])
    both_feats = torch.cat([feats["seen"], feats["held_out"]])
    res["100way_clean_all"] = accuracy(both_feats, combo_head, both.combo_index())
    for task, (prompts, label_fn) in CONTROL_TASKS.items():
        head = encode_texts(model, tokenizer, prompts)
        res[f"{task}_seen"] = accuracy(feats["seen"], head, label_fn(sets["seen"]))
        res[f"{task}_held_out"] = accuracy(feats["held_out"], head, label_fn(sets["held_out"]))
        res[f"{task}_all"] = accuracy(both_feats, head, label_fn(both))
    if corruptions:
        m = min(n, n_corrupt)
        clean = torch.cat([images["seen"][:m], images["held_out"][:m]])
        labels = torch.cat([sets["seen"].combo_index()[:m], sets["held_out"].combo_index()[:m]])
        res["100way_clean_sub"] = accuracy(torch.cat([feats["seen"][:m], feats["held_out"][:m]]), combo_head, labels)
        for name in CORRUPTIONS:
            for s in severities:
                g = torch.Generator().manual_seed(EVAL_SEED + s)
                x = corrupt(clean, name, s, g)
                res[f"100way_{name}_s{s}"] = accuracy(encode_images(model, x), combo_head, labels)
    return res


def markdown(res: dict, meta: dict | None = None) -> str:
    r = lambda k: f"{res[k]:.1f}"  # noqa: E731
    lines = ["## micro-CLIP zero-shot baselines on the built-in world", ""]
    if meta:
        lines += [f"Checkpoint: `ctta/assets/micro-clip.safetensors` ({meta.get('param_count', 0) / 1e6:.2f} M "
                  f"parameters, fp16), {meta.get('steps')} steps of batch {meta.get('batch')} in "
                  f"{meta.get('wall_time_s', 0) / 60:.1f} min on a 2-core CPU, seed {meta.get('seed')}, "
                  f"world version {meta.get('world_version')}. Evaluation: {meta.get('eval_n', '?')} images "
                  "per set, prompts as below, CLIP mean/std normalisation.", ""]
    lines += ["| task | classes (chance) | seen combos | held-out combos | all |", "|---|---|---|---|---|",
              f"| colour x shape, \"a {{colour}} {{shape}}.\" | 100 (1%) | {r('100way_seen')} | "
              f"{r('100way_held_out')} | {r('100way_clean_all')} |"]
    for task, (prompts, _) in CONTROL_TASKS.items():
        lines.append(f"| {task}, \"{prompts[0]}\" ... | {len(prompts)} ({100 / len(prompts):.0f}%) | "
                     f"{r(task + '_seen')} | {r(task + '_held_out')} | {r(task + '_all')} |")
    lines += ["", f"Textured style (never seen in pre-training; a domain for the domain-incremental stream): "
              f"100-way {r('100way_textured')}."]
    if "100way_clean_sub" not in res:
        return "\n".join(lines) + "\n"
    lines += ["", f"100-way accuracy under corruptions ({meta.get('n_corrupt', 500) if meta else 500} seen + as many "
              "held-out test images; never seen in pre-training):", "",
              "| corruption | severity 3 | severity 5 | drop at 5 |", "|---|---|---|---|",
              f"| none | {r('100way_clean_sub')} | {r('100way_clean_sub')} | 0.0 |"]
    for name in CORRUPTIONS:
        if f"100way_{name}_s5" in res:
            lines.append(f"| {name} | {r(f'100way_{name}_s3')} | {r(f'100way_{name}_s5')} | "
                         f"{res['100way_clean_sub'] - res[f'100way_{name}_s5']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "ctta/assets/micro-clip.safetensors"))
    ap.add_argument("--config", default=str(ROOT / "ctta/assets/micro-clip.json"))
    ap.add_argument("--n", type=int, default=2000, help="images per evaluation set")
    ap.add_argument("--results", default=str(ROOT / "streams/WORLD_RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--per-class", type=int, default=20, help="images per class in the representation report")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for name in ("n", "per_class", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load(args.checkpoint, args.config)
    res = evaluate(model, tok, n=args.n)
    meta_path = Path(args.checkpoint).with_suffix("").with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta["eval_n"] = args.n
    rep = report(model, tok, per_class=args.per_class)
    md = markdown(res, meta) + "\n" + R.markdown(rep, args.per_class)
    print(md)
    print(f"eval took {time.time() - t0:.0f} s")
    if not args.no_write:
        meta["zeroshot"] = {k: round(v, 2) for k, v in res.items()}
        meta["representation"] = {k: round(v, 4) for k, v in rep.items()}
        atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
        results = Path(args.results)
        old = results.read_text() if results.exists() else ""
        notes = old[old.index("\nNotes:"):] if "\nNotes:" in old else ""  # hand-written notes survive a rewrite
        atomic_write_bytes(results, (md + ("\n" + notes.lstrip("\n") if notes else "")).encode())


if __name__ == "__main__":
    main()
