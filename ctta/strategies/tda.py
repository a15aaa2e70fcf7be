"""TDA: training-free dynamic adapter (positive and negative caches of test features).

Paper: Karmanov, Guan, Lu, El Saddik, Xing, "Efficient Test-Time Adaptation of Vision-Language Models", CVPR 2024.
Official code: kdiAAA/TDA (commit e697fb0), followed exactly: ``tda_runner.py`` (``update_cache``,
``compute_cache_logits``, ``run_test_tda``), ``utils.py`` (``get_clip_logits``, ``get_entropy``, ``avg_entropy``),
``configs/*.yaml`` (per-dataset α/β), ``utils.get_ood_preprocess`` (63 AugMix views on ImageNet-A/V/R/S).

Per sample, with ``logits = 100·cos(view, class text)`` (the official scale; see ``logit_scale``):

1. query: one view → its feature ``f``, logits ``z``, entropy ``H`` and probabilities ``p``; several views (1 + 63 on
   A/V/R/S) → the ``int(V·0.1)`` lowest-entropy views, ``f`` = their mean feature (not re-normalised), ``z`` = their
   mean logits, ``H`` = entropy of their mean probability, ``p`` = that mean probability; pseudo-label ``argmax z``.
2. positive cache, always offered: per class at most ``pos_capacity`` = 3 items ``(f, H)``; while there is room the
   item is appended, else it replaces the worst (highest-entropy) item if its entropy is strictly lower; sorted by
   ascending entropy (`ClassCache`, policy ``"entropy"``).
3. negative cache, offered only if ``0.2 < H / log2(C) < 0.5`` (strict): same rule, capacity 2, items ``(f, H, p)``.
4. prediction **after** the updates (the sample can retrieve itself):
   ``final = z + α_p·Σ_pos exp(−β_p(1 − f·k))·onehot(class) − α_n·Σ_neg exp(−β_n(1 − f·k))·1[0.03 < p_k < 1]``
   with the negative mask computed at read time from the stored ``p``.

Defaults are the ImageNet-A row of the official configs (α_p 2, β_p 5, 1 + 63 AugMix views); the other datasets'
values are in ``configs/experiment/tda_*.yaml`` (ImageNet and the cross-domain sets use one centre view:
``n_views=0``). The state (`state_dict`) is both caches as fixed-capacity tensors plus the view generator; resets
belong to `ctta.OnlineAdapter`.

Label spaces: the state is built for the first label space adapted on and keyed by its fingerprint
(`LabelSpace.fingerprint`); adapting on another space raises ValueError once the state is non-empty (reset first),
and predicting on another space answers from empty state without touching the held one (see `ensure_space`).

Switches for the documented traps (design note ``tta_methods.md`` §0–1):
- ``entropy_norm="log2"`` (official ``get_entropy``: nats divided by log2 C; the 0.2/0.5 band is tuned to it) or
  ``"ln"`` (a true [0, 1] normalisation);
- ``logit_scale=100.0`` (the official ``100.·image_features @ clip_weights``; α/β are tuned to it); ``None`` = the
  model's own learned scale (the micro-CLIP's is ~20), which changes the entropies, the confident views and the
  balance between ``z`` and the cache terms;
- the ImageNet-A ``"sh"`` file filter of the official data loader (6,862 of 7,500 images) is a property of the test
  set, not of the method: it belongs to the stream recipe, not here.

Deliberate deviations:
- features, logits and cache values are fp32 (the official code runs the OpenAI fp16 model and casts the cache
  values to fp16);
- views are made on the model's device with kornia (`ctta.views`: bilinear without antialiasing, AugMix on float
  images), not with PIL;
- the confident views are chosen with a stable sort (ties to the lower view index; the official ``argsort`` is not
  stable) and at least one is kept when ``int(V·0.1) = 0`` (the official code would average zero views);
- a batch of B images is processed sample after sample in stream order (sample i+1 sees the caches after sample
  i), with the views of the whole batch encoded in one go;
- `predict` runs the same read on a copy of the view generator and changes nothing (no cache update);
- a sample with non-finite features (an fp16 overflow, a corrupt input) is not admitted to the state; it is
  counted in ``skipped_steps`` (the official code would store the NaNs).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctta.checks import check_logit_scale
from ctta.model import Clip
from ctta.stream import LabelSpace
from ctta.strategy import Strategy
from ctta.strategies._cache import Policy, class_logits, confident_query, encode_views, finite_samples, fork_generator
from ctta.strategies._dual_cache import DualCache, DualCacheConfig, dual_cache_for


class TDA(Strategy):
    """Training-free dynamic adapter (see the module docstring). It owns the per-batch frame (one text head per
    label space, the batch's views encoded once, samples in stream order, non-finite samples never admitted) and
    the caches' state; a subclass changes `_sample` (`BoostAdapter`)."""

    learns = False
    holds_label_space = True  # the caches are keyed by class
    neg_policy: Policy = "entropy"  # the negative cache's admission rule (BoostAdapter's is "fifo")

    def __init__(self, *, pos_alpha: float = 2.0, pos_beta: float = 5.0, pos_capacity: int = 3,
                 neg_alpha: float = 0.117, neg_beta: float = 1.0, neg_capacity: int = 2,
                 neg_entropy: tuple[float, float] = (0.2, 0.5), neg_mask: tuple[float, float] = (0.03, 1.0),
                 pos_enabled: bool = True, neg_enabled: bool = True, n_views: int = 63, augmix: bool = True,
                 selection_p: float = 0.1, entropy_norm: str = "log2", logit_scale: float | None = 100.0,
                 view_batch: int = 256, seed: int = 1, amp: bool = False, eval_batch_size: int = 256):
        super().__init__(eval_batch_size=eval_batch_size, amp=amp)
        if n_views < 0 or view_batch < 1:
            raise ValueError(f"bad n_views={n_views} or view_batch={view_batch}")
        if not 0.0 < selection_p <= 1.0:
            raise ValueError(f"selection_p must be in (0, 1], got {selection_p}")
        self.cfg = DualCacheConfig(pos_alpha, pos_beta, pos_capacity, neg_alpha, neg_beta, neg_capacity,
                                   neg_entropy, neg_mask, pos_enabled, neg_enabled, entropy_norm,
                                   neg_policy=self.neg_policy, owner=type(self).__name__)
        check_logit_scale(type(self).__name__, logit_scale)
        self.pos_alpha, self.pos_beta, self.pos_capacity = pos_alpha, pos_beta, pos_capacity
        self.neg_alpha, self.neg_beta, self.neg_capacity = neg_alpha, neg_beta, neg_capacity
        self.neg_entropy, self.neg_mask = self.cfg.neg_entropy, self.cfg.neg_mask
        self.pos_enabled, self.neg_enabled, self.entropy_norm = pos_enabled, neg_enabled, entropy_norm
        self.n_views, self.augmix, self.selection_p = n_views, augmix, selection_p
        self.logit_scale, self.view_batch, self.seed = logit_scale, view_batch, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.cache: DualCache | None = None  # built for the first label space adapted on
        self.space: str | None = None  # that space's fingerprint (LabelSpace.fingerprint)

    def setup(self, model: Clip) -> None:
        super().setup(model)  # frozen CLIP: nothing but the caches adapts
        self.cache, self.space = None, None

    @property
    def views_from_source(self) -> bool:
        """Its random views are cropped from the image as given (`ctta.views`), so it takes the whole image; one
        view (``n_views=0``) is the eval view, which the caller's eval crop already is."""
        return self.n_views > 0

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.generator.manual_seed(seed)

    # ----------------------------------------------------------------------------------------- the method
    def _sample(self, feats: Tensor, head: Tensor, cache: DualCache, adapt: bool) -> Tensor:
        f, z, h, p, pred = confident_query(feats, class_logits(self._model(), feats, head, self.logit_scale),
                                           self.selection_p)
        if adapt:  # update first, then read: the sample can retrieve itself (official order)
            cache.update(f, h, p, pred)
        return cache.read(f, z)

    def _run(self, images: Tensor, space: LabelSpace, adapt: bool) -> Tensor:
        """Logits ``[B, C]``: one `_sample` call per image in stream order; ``adapt`` False draws the views from a
        copy of the generator and keeps nothing (``predict``)."""
        head = self._model().text_head(space)  # frozen text tower: encoded once per label space, cached by the Clip
        cache = dual_cache_for(self, head, space, adapt)
        gen = self.generator if adapt else fork_generator(self.generator)
        feats = encode_views(self, images, self.n_views, augmix=self.augmix, generator=gen, view_batch=self.view_batch)
        ok = finite_samples(feats)
        if adapt and bool(ok.any()):
            self.cache, self.space = cache, space.fingerprint  # built for this space on first use (rebuilt while empty)
        out = []
        for b in range(feats.shape[0]):
            if adapt and not ok[b]:
                self.skipped_steps += 1  # non-finite features never enter the caches
            out.append(self._sample(feats[b], head, cache, adapt and bool(ok[b])))
        return torch.stack(out)

    @torch.no_grad()
    def adapt(self, images: Tensor, space: LabelSpace) -> Tensor:
        """Update the caches with each image in turn, then predict it (update-before-predict). ``[B, C]``."""
        return self._run(images, space, adapt=True)

    @torch.no_grad()
    def predict(self, images: Tensor, space: LabelSpace) -> Tensor:
        """The same read with the current caches; changes nothing (views from a copy of the generator)."""
        return self._run(images, space, adapt=False)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The base state, both caches as fixed-capacity tensors, their label space and the view generator."""
        return {**super().state_dict(), "generator": self.generator.get_state(),
                "cache": self.cache.state_dict() if self.cache is not None else None, "space": self.space}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dev = self.model.device if self.model is not None else None
        cache = DualCache.from_state(state["cache"], self.cfg, dev) if state["cache"] is not None else None
        self.generator.set_state(state["generator"].clone())
        self.cache, self.space = cache, state.get("space")
