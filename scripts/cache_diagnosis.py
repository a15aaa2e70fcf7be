"""Diagnosis: when a TDA-style cache does not move predictions on a stream, is it the pseudo-labels or the geometry?

    python scripts/cache_diagnosis.py                          # severity 3, 2,000 images per corruption, seed 0
    python scripts/cache_diagnosis.py --severity 5 --per-class 5 --corruptions contrast jpeg --out /tmp/d.json
    python scripts/cache_diagnosis.py --styles textured --per-class 150   # the natural shift (streams.world_style)

Replays TDA's positive cache on the micro-CLIP's features of the world's shift streams (`streams.world.shift_tasks`,
each corruption from an empty cache, images in stream order, update before predict as TDA does), with the pieces the
strategies use (`ClassCache` with TDA's entropy admission, `affinity_logits`, 100·cos text logits, the official
α = 2, β = 5, capacity 3 of `DualCacheConfig`), three ways over the same features:

- ``pseudo``: items keyed by the zero-shot prediction, as TDA keys them (its negative cache left out);
- ``oracle``: the same admission rule, items keyed by the true class: what a perfect pseudo-labeller would give the
  same read rule. If ``oracle`` gains and ``pseudo`` does not, the pseudo-labels are the cause; if neither gains,
  the read rule cannot separate classes on these features (geometry);
- the geometry itself: ``w_same`` / ``w_other``, the mean affinity ``exp(−β(1 − q·k))`` of a query to oracle items of
  its own class and of other classes, and ``text_margin``, the mean gap between the top-2 text logits (100·cos)
  that the cache term ``α · Σ w`` has to overcome to flip a prediction.

``purity``: the share of the pseudo cache's items (at the end of each domain) whose pseudo-label is right.
The zero-shot errors themselves: ``gap_wrong``, the median lead of the wrong class over the true one (100·cos), which
a full cache can overcome only where it is below ``α · capacity · w_same``; ``entropy_wrong`` / ``entropy_right``,
the median prediction entropy (nats) of the errors and of the right answers (confident errors enter the cache under
their wrong label); ``top_confusions``, the three most frequent (true, predicted) class pairs; ``nn_fixable``, the
share of errors whose nearest other image of the domain (cosine) is a right zero-shot answer of the same class (a
cache of right pseudo-labels has something near them); ``errors_in_lost_classes``, the share of errors in classes that
zero-shot gets less than 20 % right on the domain (errors massed by class rather than spread).
Prints a markdown table; ``--out`` writes it as JSON with provenance. About 1 minute on one core at the defaults.
"""
from __future__ import annotations

import argparse

import torch
from torch import Tensor

from ctta import Clip
from ctta.io import atomic_write_json, provenance
from ctta.losses import entropy
from ctta.strategies._cache import ClassCache, affinity_logits, class_logits
from ctta.strategies._dual_cache import DualCacheConfig
from representation import nearest_other
from streams import synthetic as W
from streams.corruptions import CORRUPTIONS
from streams.world import shift_tasks
from streams.world_style import style_shift_tasks


def replay(feats: Tensor, labels: Tensor, head: Tensor, cfg: DualCacheConfig, scale: float = 100.0) -> dict:
    """One domain in stream order (``feats [N, D]`` L2-normalised, ``labels [N]``, ``head [C, D]``): accuracy of
    zero-shot and of the two caches, purity, and the affinity / margin figures (see the module docstring)."""
    c, d = head.shape
    z_all = class_logits(None, feats, head, scale)  # [N, C]
    # the pseudo cache carries each item's true class as a one-hot "probability" vector, only to score purity
    caches = {"pseudo": ClassCache(c, cfg.pos_capacity, d, with_probs=True),
              "oracle": ClassCache(c, cfg.pos_capacity, d)}
    right = {"zeroshot": 0, "pseudo": 0, "oracle": 0}
    w_same, w_other = [], []
    for f, y, z in zip(feats, labels.tolist(), z_all):
        p = z.softmax(-1)
        h, pred = -(p * p.clamp_min(1e-12).log()).sum(), int(z.argmax())
        caches["pseudo"].insert(pred, f, h, torch.nn.functional.one_hot(torch.tensor(y), c).float())
        caches["oracle"].insert(y, f, h)
        right["zeroshot"] += int(pred == y)
        for name, cache in caches.items():
            keys, classes = cache.items()[:2]
            logits = z + affinity_logits(f, keys, None, classes, cfg.pos_alpha, cfg.pos_beta, c)
            right[name] += int(int(logits.argmax()) == y)
        keys, classes = caches["oracle"].items()[:2]
        if bool((classes == y).any()) and bool((classes != y).any()):
            w = torch.exp(-cfg.pos_beta * (1.0 - keys @ f))
            w_same.append(float(w[classes == y].mean()))
            w_other.append(float(w[classes != y].mean()))
    _, classes, _, truth = caches["pseudo"].items()
    top2 = z_all.topk(2, dim=-1).values
    n = len(labels)
    # the zero-shot errors: how far the true class trails (what the cache term must add to flip one), how sure the
    # model is of them (entropy, nats) against its right answers, and the most frequent (true, predicted) pairs
    pred = z_all.argmax(-1)
    wrong = pred != labels
    rows = torch.arange(n)
    gap = (z_all[rows, pred] - z_all[rows, labels])[wrong]
    ent = entropy(z_all)
    pairs: dict[tuple[int, int], int] = {}
    for t, q in zip(labels[wrong].tolist(), pred[wrong].tolist()):
        pairs[(t, q)] = pairs.get((t, q), 0) + 1
    top = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    median = (lambda v: float(v.median()) if len(v) else float("nan"))
    share = (lambda m: float(m[wrong].float().mean()) if bool(wrong.any()) else float("nan"))
    # where a cache could help at all: an error whose nearest other image of the stream is a right zero-shot answer
    # of its own class, and errors spread over classes or massed in classes zero-shot has lost (accuracy < 20 %)
    nn = nearest_other(feats)
    class_acc = torch.zeros(c).index_add_(0, labels, (~wrong).float()) / torch.bincount(labels, minlength=c).clamp(1)
    return {"n": n, **{f"acc_{k}": v / n for k, v in right.items()},
            "purity": float((truth.argmax(-1) == classes).float().mean()) if len(classes) else float("nan"),
            "cached_items": len(classes),
            "w_same": sum(w_same) / max(1, len(w_same)), "w_other": sum(w_other) / max(1, len(w_other)),
            "text_margin": float((top2[:, 0] - top2[:, 1]).mean()),
            "gap_wrong": median(gap), "entropy_wrong": median(ent[wrong]), "entropy_right": median(ent[~wrong]),
            "nn_fixable": share((labels[nn] == labels) & ~wrong[nn]),
            "errors_in_lost_classes": share(class_acc[labels] < 0.2),
            "top_confusions": [[t, q, k] for (t, q), k in top]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=CORRUPTIONS)
    ap.add_argument("--severity", type=int, default=3, choices=range(1, 6))
    ap.add_argument("--styles", nargs="+", choices=W.STYLES, default=None,
                    help="diagnose the natural-shift stream instead (streams.world_style: the classes drawn in these "
                         "styles, no corruption; --corruptions and --severity are then unused)")
    ap.add_argument("--per-class", type=int, default=20, help="images per class and corruption (x 100 classes)")
    ap.add_argument("--seed", type=int, default=0, help="stream seed")
    ap.add_argument("--capacity", type=int, default=3,
                    help="items a class in the replayed cache (TDA's official 3; more is a what-if, not TDA)")
    ap.add_argument("--out", help="write the figures here as JSON (atomically)")
    a = ap.parse_args(argv)
    if a.per_class < 1:
        raise SystemExit(f"--per-class must be at least 1, got {a.per_class}")
    if a.capacity < 1:
        raise SystemExit(f"--capacity must be at least 1, got {a.capacity}")
    torch.manual_seed(a.seed)
    model = Clip.from_pretrained("micro-clip", "builtin")
    cfg = DualCacheConfig(pos_capacity=a.capacity)  # TDA's official positive-cache settings at the default 3
    if a.styles:
        stream = style_shift_tasks(a.styles, per_class=a.per_class, seed=a.seed, setting="reset")
        what = f"styles {', '.join(a.styles)}"
    else:
        stream = shift_tasks(a.corruptions, a.severity, per_class=a.per_class, seed=a.seed, setting="reset")
        what = f"severity {a.severity}"
    rows = {}
    print(f"{len(stream.tasks)} domains of {a.per_class * 100} images, {what}, seed {a.seed}; "
          f"alpha {cfg.pos_alpha}, beta {cfg.pos_beta}, capacity {cfg.pos_capacity}, 100*cos", flush=True)
    for task in stream.tasks:
        images, labels = task.test.get_batch(torch.arange(len(task.test)))[:2]
        with torch.no_grad():
            feats = torch.cat([model.encode_image(images[i:i + 256]) for i in range(0, len(images), 256)]).float()
        rows[task.name] = r = replay(feats, labels, model.text_head(task.space).float(), cfg)
        names = task.space.classnames
        r["top_confusions"] = [[names[t], names[q], k] for t, q, k in r["top_confusions"]]
        print(f"  {task.name}: zero-shot {100 * r['acc_zeroshot']:.1f}, pseudo cache {100 * r['acc_pseudo']:.1f}, "
              f"oracle cache {100 * r['acc_oracle']:.1f}, purity {100 * r['purity']:.0f} %; most frequent errors "
              + ", ".join(f"{t} -> {q} ({k})" for t, q, k in r["top_confusions"]), flush=True)
    keys = ("acc_zeroshot", "acc_pseudo", "acc_oracle", "purity", "w_same", "w_other", "text_margin", "gap_wrong",
            "entropy_wrong", "entropy_right", "nn_fixable", "errors_in_lost_classes")
    mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
    head = ("| domain | zero-shot | pseudo cache | oracle cache | purity % | w same | w other | text margin | "
            "gap on errors | entropy errors / right | errors NN-fixable % | errors in lost classes % |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in [*rows.items(), ("mean", mean)]:
        lines.append(f"| {name} | {100 * r['acc_zeroshot']:.1f} | {100 * r['acc_pseudo']:.1f} | "
                     f"{100 * r['acc_oracle']:.1f} | {100 * r['purity']:.0f} | {r['w_same']:.3f} | "
                     f"{r['w_other']:.3f} | {r['text_margin']:.2f} | {r['gap_wrong']:.2f} | "
                     f"{r['entropy_wrong']:.3f} / {r['entropy_right']:.3f} | {100 * r['nn_fixable']:.0f} | "
                     f"{100 * r['errors_in_lost_classes']:.0f} |")
    print("\n" + "\n".join(lines))
    doc = {"severity": None if a.styles else a.severity, "styles": a.styles, "per_class": a.per_class,
           "seed": a.seed, "config": {"pos_alpha": cfg.pos_alpha, "pos_beta": cfg.pos_beta,
                                      "pos_capacity": cfg.pos_capacity, "logit_scale": 100.0},
        "domains": rows, "mean": mean, "provenance": provenance(model, seed=a.seed, config=vars(a))}
    if a.out:
        print(f"-> {atomic_write_json(a.out, doc)}")
    return doc


if __name__ == "__main__":
    main()
