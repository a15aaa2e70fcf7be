"""BoostAdapter: TDA's caches plus regional bootstrapping ("boosting samples") from the test image's own views.

Paper: Zhang, Huang, Zhang, Ren, Yang, Zhang, Zhang, Zhang, "BoostAdapter: Improving Vision-Language Test-Time
Adaptation via Regional Bootstrapping", NeurIPS 2024. Official code: taolinzhang/BoostAdapter (commit 9983e1a),
followed exactly: ``runner.py`` (``update_cache`` with ``fifo``, ``compute_cache_logits``, ``run_test_tda`` with
``--mode boostadapter``), ``utils.py`` (``get_clip_logits`` with ``infer_ori_image``, ``select_confident_samples``,
``get_output_entropy``, ``get_entropy``), ``configs/*.yaml`` (α/β as TDA's, per-dataset ``delta``), ``scripts/run.sh``
(``--views 64``: 1 + 63 random crops + flips, no AugMix, on every dataset).

Per sample, with ``logits = 100·cos`` over the 64 views:

1. historical entry: ``query="confident"`` (ImageNet-A/V/R/S) is TDA's query (mean feature / logits of the 6 most
   confident views, entropy of their mean probability); ``query="view0"`` (the cross-domain sets: the official
   ``infer_ori_image`` substring test) uses the original view alone.
2. it enters the **persistent** positive cache (TDA's rule, capacity 3) and, inside TDA's entropy band, the
   negative cache — which in this code is **FIFO** per class (``update_cache(..., include_prob_map=True)`` leaves
   ``fifo=True``: append, drop the oldest beyond 2), not TDA's replace-the-worst rule.
3. boosting: the ``int(64·0.1) = 6`` lowest-entropy views, each with its own entropy and pseudo-label, are inserted
   into a **copy** of the positive cache with capacity ``3 + δ`` (append, stable sort by entropy, truncate): they
   can push historical items of their class out of the copy. The copy is used for this prediction only.
4. ``final = z + α·A(copy) − 0.117·A(negative)`` (TDA's read, `ctta.strategies._cache.DualCache.read`).

Defaults are the ImageNet-A row (α 2, β 5, δ 3); the per-dataset values (δ: A 3, R 3, V 1, S 1) are in
``configs/experiment/boost_adapter_*.yaml``. The official script's ``--delta`` flag is ignored by the code (it reads
``cfg['delta']`` from the YAML); here ``delta`` is the one knob. ImageNet has no official δ and its single view gives
``int(1·0.1) = 0`` boosting samples (the authors never ran it). Logits are 100·cos (``logit_scale=100.0``; ``None`` =
the model's learned scale). The ImageNet-A ``"sh"`` filter of the official loader belongs to the stream, not here.

Label spaces: the state is built for the first label space adapted on and keyed by its fingerprint
(`LabelSpace.fingerprint`); adapting on another space raises ValueError once the state is non-empty (reset first),
and predicting on another space answers from empty state without touching the held one (see `ensure_space`).

Deliberate deviations:
- fp32 features, logits and cache values (official: fp16 model, fp16 cache values);
- the views come from `ctta.views` on the model's device (kornia, bilinear without antialiasing; the official code
  uses its own PIL ``RandomResizedCrop`` with bilinear + antialias);
- ties in the confident-view selection go to the lower view index (stable sort);
- the boosted copy is built only for the (at most 6) classes the boosting samples touch, from the historical items
  and the boosting samples of that class in the official insertion order; other classes are read as stored — the
  same items as the official deep copy, without copying the cache;
- a batch is processed sample after sample in stream order; `predict` boosts with the sample's views but stores
  nothing (views from a copy of the generator);
- a sample with non-finite features (an fp16 overflow, a corrupt input) is not admitted to the state; it is
  counted in ``skipped_steps`` (the official code would store the NaNs).
"""
from __future__ import annotations


import torch
from torch import Tensor

from ctta.losses import entropy
from ctta.strategies._cache import ClassCache, class_logits, confident_query
from ctta.strategies._dual_cache import DualCache
from ctta.strategies.tda import TDA


def boosting_samples(feats: Tensor, logits: Tensor, p: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """The official ``select_confident_samples`` + ``get_output_entropy``: the ``int(V·p)`` lowest-entropy views
    (none when that is 0), as ``(features [k, D], entropies [k] (nats), pseudo-labels [k])``, most confident first."""
    k = int(logits.shape[0] * p)
    h = entropy(logits)
    sel = torch.argsort(h, stable=True)[:k]
    return feats[sel], h[sel], logits[sel].argmax(-1)


def boosted_items(pos: ClassCache, keys: Tensor, ent: Tensor, classes: Tensor, capacity: int
                  ) -> tuple[Tensor, Tensor]:
    """The positive items of the official ``cur_pos_cache``: the historical cache with the boosting samples inserted
    one by one under capacity ``capacity`` (append, stable sort by entropy, truncate). Per touched class this is
    the ``capacity`` lowest-entropy items of [historical items in slot order; boosting samples in order], ties to
    the earlier one. Returns ``(keys [N, D], classes [N])``."""
    hist_k, hist_c, hist_e, _ = pos.items()
    touched = torch.unique(classes)
    keep = ~torch.isin(hist_c, touched)
    out_k, out_c = [hist_k[keep]], [hist_c[keep]]
    for c in touched.tolist():
        cand_k = torch.cat([hist_k[hist_c == c], keys[classes == c]])
        cand_e = torch.cat([hist_e[hist_c == c], ent[classes == c].to(hist_e.dtype)])
        order = torch.argsort(cand_e, stable=True)[:capacity]
        out_k.append(cand_k[order])
        out_c.append(torch.full((len(order),), c, dtype=hist_c.dtype, device=hist_c.device))
    return torch.cat(out_k), torch.cat(out_c)


class BoostAdapter(TDA):
    """TDA + boosting samples from the test image's own confident views (see the module docstring). `TDA` owns
    the per-batch frame and the state; this class changes the per-sample step (`_sample`) and the negative cache's
    rule (FIFO)."""

    neg_policy = "fifo"

    def __init__(self, *, pos_alpha: float = 2.0, pos_beta: float = 5.0, pos_capacity: int = 3, delta: int = 3,
                 neg_alpha: float = 0.117, neg_beta: float = 1.0, neg_capacity: int = 2,
                 neg_entropy: tuple[float, float] = (0.2, 0.5), neg_mask: tuple[float, float] = (0.03, 1.0),
                 pos_enabled: bool = True, neg_enabled: bool = True, query: str = "confident", n_views: int = 63,
                 augmix: bool = False, selection_p: float = 0.1, boost_p: float = 0.1, entropy_norm: str = "log2",
                 logit_scale: float | None = 100.0, view_batch: int = 256, seed: int = 1, amp: bool = False,
                 eval_batch_size: int = 256):
        if query not in ("confident", "view0"):
            raise ValueError(f"query must be 'confident' (ImageNet-A/V/R/S) or 'view0' (cross-domain), got {query!r}")
        if delta < 0:
            raise ValueError(f"BoostAdapter: delta must be >= 0, got {delta}")
        if not 0.0 <= boost_p <= 1.0:
            raise ValueError(f"BoostAdapter: boost_p must be in [0, 1], got {boost_p}")
        super().__init__(pos_alpha=pos_alpha, pos_beta=pos_beta, pos_capacity=pos_capacity, neg_alpha=neg_alpha,
                         neg_beta=neg_beta, neg_capacity=neg_capacity, neg_entropy=neg_entropy, neg_mask=neg_mask,
                         pos_enabled=pos_enabled, neg_enabled=neg_enabled, n_views=n_views, augmix=augmix,
                         selection_p=selection_p, entropy_norm=entropy_norm, logit_scale=logit_scale,
                         view_batch=view_batch, seed=seed, amp=amp, eval_batch_size=eval_batch_size)
        self.delta, self.query, self.boost_p = delta, query, boost_p

    # ----------------------------------------------------------------------------------------- the method
    def _sample(self, feats: Tensor, head: Tensor, cache: DualCache, adapt: bool) -> Tensor:
        logits = class_logits(self._model(), feats, head, self.logit_scale)
        if self.query == "view0":  # official infer_ori_image: the original view alone
            f, z = feats[0], logits[0]
            h, p, pred = entropy(z), z.softmax(-1), int(z.argmax())
        else:
            f, z, h, p, pred = confident_query(feats, logits, self.selection_p)
        if adapt:
            cache.update(f, h, p, pred)  # persistent: positive (TDA rule) and negative (FIFO) caches
        items = None
        if self.cfg.pos_enabled:
            items = boosted_items(cache.pos, *boosting_samples(feats, logits, self.boost_p),
                                  capacity=self.pos_capacity + self.delta)
        return cache.read(f, z, items)
