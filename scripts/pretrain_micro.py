"""Pre-train the embedded micro-CLIP contrastively on the synthetic world (rebuilds the shipped checkpoint).

    python scripts/pretrain_micro.py        # the defaults are the shipped recipe (v4: 5,000 steps)

The architecture is ``--config`` (default ``ctta/assets/micro-clip.json``: since v4 a small open_clip
ModifiedResNet image tower, the CLIP RN50 family at width 16, beside a 3-layer text transformer).
Every step renders a fresh batch (never the ``HELD_OUT`` colour x shape combos, never the "textured"
style, never a test-time corruption) with one random caption per image. Captions are partial ("a red
shape", "a star on a noisy background"), so one caption is true of many images in a batch: the loss is a
multi-positive InfoNCE whose targets spread uniformly over every true (image, caption) pair, plus (weight
``--class-weight``) an image-image supervised-contrastive term on the colour x shape class
(``class_contrast_loss``) that pulls one class together across style, size, background and pose.
Batch composition (``make_batch``): 25 % in groups sharing one colour, 25 % in groups sharing colour and shape
(same-class pairs across nuisances), 25 % in groups differing only in shape, the rest free; half the images are
flipped horizontally; 20 % of the captions name exactly one factor (see ``caption_batch``).
AdamW, linear warm-up then cosine decay over ``--steps`` (or over a ``--minutes`` budget with ``--steps 0``).
``--precision bf16`` (default) autocasts the forward to bfloat16 with fp32 master weights.
Writes fp16 safetensors atomically plus ``<out stem>.meta.json``, then runs the zero-shot evaluation.

Levers measured for issue #16 (image features organised by class), figures in streams/WORLD_RESULTS.md:
the image tower (``--config``: v3's ViT vs v4's ModifiedResNet), ``--shape-frac`` (``shape_group``), ``--flip`` and
``--crop-frac`` (CLIP-style flips and random resized crops, ``augment``), ``--class-weight`` / ``--class-label``
(the class term on the colour x shape class or on the shape alone), ``--combo-frac``, ``--init`` / ``--base-steps``
(continue from a checkpoint, or train v3's recipe, ``BASE_RECIPE``, first as a stage 1 of fixed length),
``--degrade-frac`` / ``--degrade-max`` (mild sensor noise and blur, ``degrade``; off by default) and ``--eval-rep``
(nearest-neighbour figures in the periodic evaluation). v3's recipe is
``--config benchmarks/micro-clip-v3/micro-clip.json --steps 0 --minutes 30 --hard-frac 0.6 --combo-frac 0
--shape-frac 0 --class-weight 0 --flip 0``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]

import open_clip  # noqa: E402

import eval_micro  # noqa: E402
from ctta.io import atomic_write_bytes  # noqa: E402
from ctta.weights import weights_sha256_entry  # noqa: E402
from micro_batches import (TRAIN_STYLES, augment, caption_batch, class_contrast_loss, degrade,  # noqa: E402,F401
                           make_batch, multi_positive_loss, shape_group)
from streams import synthetic as W  # noqa: E402

# Stage 1 of a run with --base-steps: v3's recipe (its flags; v3 ran 3,160 steps on a 30-minute budget)
BASE_RECIPE = {"lr": 2e-3, "warmup": 0.04, "hard_frac": 0.6, "group": 16, "combo_frac": 0.0, "shape_frac": 0.0,
               "flip": 0, "crop_frac": 0.0, "class_weight": 0.0, "class_label": "combo", "grey_frac": 0.0,
               "solo_frac": 0.2, "mention_p": None, "degrade_frac": 0.0}


def lr_at(progress: float, warmup: float, base: float) -> float:
    if progress < warmup:
        return base * progress / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def save(model: torch.nn.Module, out: Path, meta: dict) -> None:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out, safetensors_bytes(state))
    meta = {**meta, **weights_sha256_entry(out)}  # Clip.from_pretrained refuses weights that do not match it
    atomic_write_bytes(out.with_suffix("").with_suffix(".meta.json"), (json.dumps(meta, indent=2) + "\n").encode())


def interim_path(out: Path) -> Path:
    """Where the interim checkpoints of a run writing ``out`` go: ``<stem>-interim.safetensors`` beside it (its meta
    file, named by `save` from the stem, is then ``<stem>-interim.meta.json``, never ``out``'s)."""
    return out.with_name(out.name.split(".")[0] + "-interim.safetensors")


def _sha256(path: str) -> str:
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="training time budget (schedule follows it); used only with --steps 0")
    ap.add_argument("--steps", type=int, default=5000,
                    help="fixed step count (machine-independent weights); 0: train for --minutes instead")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.04, help="warm-up fraction of the schedule")
    ap.add_argument("--hard-frac", type=float, default=0.25, help="share of each batch in same-colour groups")
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--combo-frac", type=float, default=0.25, help="share in groups sharing colour and shape")
    ap.add_argument("--shape-frac", type=float, default=0.25,
                    help="share in groups differing only in shape (same colour, style, size, background)")
    ap.add_argument("--class-weight", type=float, default=1.0,
                    help="weight of the image-image same-class contrastive term (class_contrast_loss)")
    ap.add_argument("--class-scale", type=float, default=10.0, help="inverse temperature of that term")
    ap.add_argument("--class-label", choices=("combo", "shape"), default="combo",
                    help="what that term calls one class: the colour x shape combination (never a held-out one) or "
                         "the shape alone (same-shape pairs of any colour, so shape features cannot lean on colour)")
    ap.add_argument("--flip", type=int, default=1, help="1: flip each image horizontally with probability 1/2")
    ap.add_argument("--crop-frac", type=float, default=0.0,
                    help="share of images (among those whose caption leaves size unnamed) given a random resized crop")
    ap.add_argument("--crop-scale", type=float, nargs=2, default=(0.25, 1.0), metavar=("LO", "HI"),
                    help="area range of the pre-training crops")
    ap.add_argument("--degrade-frac", type=float, default=0.0,
                    help="share of images with mild sensor noise and defocus blur (micro_batches.degrade; 0: off)")
    ap.add_argument("--degrade-max", type=float, nargs=2, default=(0.04, 0.3), metavar=("NOISE", "BLUR"),
                    help="largest noise sigma and blur sigma (px) of --degrade-frac, below the world's severity 1")
    ap.add_argument("--grey-frac", type=float, default=0.0, help="share rendered in greyscale, never colour-captioned")
    ap.add_argument("--solo-frac", type=float, default=0.2, help="share of captions naming exactly one factor")
    ap.add_argument("--mention-p", type=float, nargs=5, default=None, metavar="P",
                    help=f"probability of naming each of {W.MENTIONED} in a caption (default {W._MENTION_P})")
    ap.add_argument("--init", default=None,
                    help="start stage 2 from this checkpoint (safetensors of the same config); skips stage 1")
    ap.add_argument("--base-steps", type=int, default=0,
                    help="stage 1: steps of the v3 recipe (BASE_RECIPE) from random weights before the stage these "
                         "flags describe (ignored with --init)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(ROOT / "ctta/assets/micro-clip.json"))
    ap.add_argument("--out", default=str(ROOT / "ctta/assets/micro-clip.safetensors"))
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-rep", type=int, default=1,
                    help="1: the periodic evaluation adds the quick representation figures (NN same class clean and at "
                         "severity 3 on 5 images per class; ~15 s each time, which a time budget pays in steps)")
    ap.add_argument("--eval-n", type=int, default=1000, help="images per set in the final evaluation")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; on a heavily shared CPU 1 thread can be faster than 2")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16",
                    help="bf16: autocast matmuls to bfloat16 (fp32 master weights); about 2x more steps per minute "
                         "on a CPU with AMX; use fp32 on a CPU without native bf16, where autocast is emulated")
    ap.add_argument("--save-every-min", type=float, default=5.0, help="interim checkpoint period")
    args = ap.parse_args()
    if args.steps < 0 or (args.steps == 0 and not args.minutes > 0):
        ap.error(f"--steps must be >= 0 (0: train for --minutes, which must then be > 0), got --steps {args.steps} "
                 f"--minutes {args.minutes}")
    if not args.save_every_min > 0:
        ap.error(f"--save-every-min must be > 0, got {args.save_every_min}")
    if not 0 <= args.degrade_frac <= 1 or min(args.degrade_max) < 0:
        ap.error(f"--degrade-frac must lie in [0, 1] and --degrade-max be >= 0, got {args.degrade_frac} and "
                 f"{list(args.degrade_max)}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    open_clip.add_model_config(args.config)
    model = open_clip.create_model("micro-clip", pretrained=args.init)
    model.float()  # an fp16 checkpoint loads into fp32 master weights
    tokenizer = open_clip.get_tokenizer("micro-clip")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"micro-clip: {n_params / 1e6:.2f} M params (vision {sum(p.numel() for p in model.visual.parameters()) / 1e6:.2f} M)",
          flush=True)
    out = Path(args.out)
    base = None
    if args.init is None and args.base_steps > 0:
        # stage 1: the v3 recipe from random weights, at a fixed step count (v3 itself ran on a time budget)
        print(f"stage 1 (base recipe): {args.base_steps} steps", flush=True)
        b = argparse.Namespace(**{**vars(args), **BASE_RECIPE, "steps": args.base_steps})
        base = {"steps": train(model, tokenizer, b, out), **BASE_RECIPE}
        print("stage 2", flush=True)
    wall0 = time.time()
    steps = train(model, tokenizer, args, out)
    wall = time.time() - wall0
    model.eval()
    meta = {"world_version": W.WORLD_VERSION, "steps": steps, "batch": args.batch, "wall_time_s": round(wall, 1),
            "seed": args.seed, "init": args.init, "init_sha256": _sha256(args.init) if args.init else None,
            "base_stage": base, "minutes_budget": args.minutes, "lr": args.lr, "weight_decay": args.wd,
            "warmup_frac": args.warmup, "hard_frac": args.hard_frac, "group": args.group,
            "combo_frac": args.combo_frac, "shape_frac": args.shape_frac, "flip": args.flip,
            "class_weight": args.class_weight, "class_scale": args.class_scale, "class_label": args.class_label,
            "crop_frac": args.crop_frac, "crop_scale": list(args.crop_scale), "precision": args.precision,
            "grey_frac": args.grey_frac, "solo_frac": args.solo_frac, "mention_p": args.mention_p,
            "degrade_frac": args.degrade_frac, "degrade_max": list(args.degrade_max),
            "threads": args.threads,
            "train_styles": list(TRAIN_STYLES), "held_out_combos": sorted(map(list, W.HELD_OUT)),
            "param_count": n_params, "config": json.loads(Path(args.config).read_text()),
            "eval_normalisation": {"mean": list(eval_micro.MEAN), "std": list(eval_micro.STD)},
            "torch": torch.__version__, "open_clip": open_clip.__version__}
    save(model, out, meta)
    print(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB) after {steps} steps, {wall / 60:.1f} min", flush=True)
    res = eval_micro.evaluate(model, tokenizer, n=args.eval_n)
    meta["eval_n"] = args.eval_n
    meta["zeroshot"] = {k: round(v, 2) for k, v in res.items()}
    save(model, out, meta)
    for stale in (interim_path(out), interim_path(out).with_suffix("").with_suffix(".meta.json")):
        stale.unlink(missing_ok=True)  # the run finished: its interim checkpoint is superseded
    print(eval_micro.markdown(res, meta), flush=True)


def train(model: torch.nn.Module, tokenizer, args: argparse.Namespace, out: Path) -> int:
    """One training stage with a fresh AdamW and a fresh batch generator seeded by ``args.seed`` (so a stage
    started from a saved checkpoint with ``--init`` draws the same batches as the same stage run in one
    process); returns the steps taken. Interim checkpoints go to ``out``."""
    g = torch.Generator().manual_seed(args.seed)
    mean = torch.tensor(eval_micro.MEAN)[:, None, None]
    std = torch.tensor(eval_micro.STD)[:, None, None]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    bf16 = args.precision == "bf16"

    def compute():
        # Under bf16 the fused CPU attention kernel's backward is several times slower than the plain
        # matmul-softmax path (measured on this 2-core CPU), so bf16 steps take the math path.
        if not bf16:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack

    quick = eval_micro.eval_sets(500, seed=eval_micro.EVAL_SEED + 1)
    budget = args.minutes * 60
    t0, step, loss_avg, last_save = time.time(), 0, None, time.time()
    model.train()
    while True:
        elapsed = time.time() - t0
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(progress, args.warmup, args.lr)
        f = make_batch(args.batch, g, args.hard_frac, args.group, args.combo_frac, args.shape_frac)
        images, texts, positives, mentions = caption_batch(W.render(f), f, g, args.grey_frac, args.mention_p,
                                                           args.solo_frac)
        valid = None
        if args.flip or args.crop_frac > 0:
            images, cropped = augment(images, mentions, g, args.crop_frac, tuple(args.crop_scale), args.flip)
            if cropped.any():
                valid = ~(cropped[:, None] & (mentions[:, W.MENTIONED.index("size")] >= 0)[None, :])
                positives = positives & valid
        images = degrade(images, g, args.degrade_frac, *args.degrade_max)
        images = (images - mean) / std
        tokens = tokenizer(texts)
        with compute():
            img, txt, scale = model(images, tokens)[:3]
            # Under bf16 autocast the loss's similarity matmul runs in bf16 too (autocast recasts it); its
            # log-softmax and the reductions run in fp32. The shipped checkpoint was trained this way.
            loss = multi_positive_loss(img.float(), txt.float(), scale.float(), positives, valid)
            if args.class_weight > 0:
                labels = f.combo_index() if args.class_label == "combo" else f.shape
                loss = loss + args.class_weight * class_contrast_loss(img.float(), labels, args.class_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # follows the ops the forward recorded (bf16 matmuls, math attention)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if step % args.log_every == 0:
            print(f"step {step} t={time.time() - t0:.0f}s loss {loss_avg:.3f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"scale {model.logit_scale.exp().item():.1f} pos/img {positives.sum(1).float().mean():.1f}",
                  flush=True)
        if time.time() - last_save > args.save_every_min * 60:  # interim checkpoint, in case of a crash
            # beside --out, never over it: --out is by default the shipped micro-CLIP, which a run stopped half-way
            # must leave as it was (the interim file's own meta hash would pass the load check)
            save(model, interim_path(out), {"interim": True, "steps": step, "world_version": W.WORLD_VERSION})
            last_save = time.time()
        if step % args.eval_every == 0:
            model.eval()
            print(f"  eval step {step}: {quick_eval(model, tokenizer, quick, args.eval_rep)}", flush=True)
            model.train()
    return step


def quick_eval(model, tokenizer, quick: dict, rep: bool = True) -> str:
    """Periodic progress line: 100-way and shape zero-shot on 500 seen / held-out images, and the quick
    representation figures (5 images per class: NN same class clean and at severity 3, class vs colour cosines)."""
    head = eval_micro.encode_texts(model, tokenizer, eval_micro.COMBO_PROMPTS)
    shape_head = eval_micro.encode_texts(model, tokenizer, eval_micro.CONTROL_TASKS["shape"][0])
    msg = []
    for k in ("seen", "held_out"):
        feats = eval_micro.encode_images(model, W.render(quick[k]))
        msg.append(f"100way_{k} {eval_micro.accuracy(feats, head, quick[k].combo_index()):.1f} "
                   f"shape_{k} {eval_micro.accuracy(feats, shape_head, quick[k].shape):.1f}")
    if not rep:
        return " ".join(msg)
    rep = eval_micro.report(model, tokenizer, per_class=5, severities=(3,), crops=False)
    msg.append(f"nn_clean {rep['nn_same_class']:.1f} nn_s3 {rep['nn_same_class_s3']:.1f} zs_s3 {rep['zs100_s3']:.1f} "
               f"cos {rep['cos_same_class']:.2f}/{rep['cos_same_colour_other_shape']:.2f}")
    return " ".join(msg)


if __name__ == "__main__":
    main()
