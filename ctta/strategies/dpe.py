"""DPE: dual prototype evolving (textual prototypes averaged along the stream, visual prototypes from a TDA-style
cache, both refined per sample by one step on zero-initialised residuals).

Paper: Zhang, Wang, Cheng, Zhou, Chen, Shi, Ye, Zhang, "Dual Prototype Evolving for Test-Time Generalization of
Vision-Language Models", NeurIPS 2024. Official code: zhangce01/DPE-CLIP (commit fecae5a), followed exactly:
``main_dpe.py`` (``run_test_dpe``, ``update_cache``, ``cache_key_value``, ``compute_cache_logits``, ``TextResidue``,
``PositiveCacheResidue``, ``InfoNCELoss``), ``utils.py`` (``get_clip_logits``, ``get_entropy``, ``avg_entropy``),
``configs/*.yaml`` (α, β, learning rates, λ_align per dataset).

State: the textual prototypes ``t̄ [C, D]`` (the text head at first, **not** re-normalised as they evolve), the
evolution counter ``n``, the positive cache (TDA's rule, capacity 3, items ``(f, H / log2 C)``), the view generator.
Per sample, with ``logits = 100·cos`` (``logit_scale``):

1. ``t = normalize(t̄ + r_t)`` with a fresh zero residual ``r_t``; TDA's query on the views (1 + 63 AugMix views on
   ImageNet and its variants, 1 view on the cross-domain sets): ``f``, ``z``, ``H``, pseudo-label.
2. the cache takes ``(f, H / log2 C)`` (before the optimisation); the visual prototypes are the per-class means of
   the cached features (classes present, sorted), ``v' = normalize(v + r_v)`` with a fresh zero residual ``r_v``.
3. one AdamW step (lr ``lr_text`` / ``lr_image``, eps 1e-3, weight decay 0.1, a fresh optimizer every sample) on
   ``H(softmax(z + α·Σ_c exp(−β(1 − f·v'_c))·onehot_c)) + λ_align·InfoNCE(v', t[cached classes])`` (one direction,
   temperature 0.01; zero with one cached class). α is not multiplied by 100.
4. prediction with ``t* = normalize(t̄ + r_t)``: ``z* = 100·f_0·t*`` of the original view (``final_query="view0"``)
   or, on ImageNet-A (``"confident"``), the query re-selected over all views with ``t*``; ``final = z* +
   α·Σ exp(−β(1 − f*·normalize(v + r_v)))·onehot``.
5. textual evolution: if ``H(softmax(final)) / log2 C < 0.1``: ``n += 1``, ``t̄ ← t̄·n/(n+1) + t*/(n+1)`` (the initial
   text head counts as one member of the running mean). ``r_t`` and ``r_v`` are then dropped.

Defaults are the ImageNet row (α 6, β 5, lr 6e-4, λ 0.5); other datasets in ``configs/experiment/dpe_*.yaml``.
``entropy_norm`` switches TDA's log2 quirk (the 0.1 threshold is tuned to it); ``logit_scale=None`` uses the model's
learned scale. The ImageNet-A ``"sh"`` file filter of the official loader belongs to the stream, not here.

Label spaces: the state is built for the first label space adapted on and keyed by its fingerprint
(`LabelSpace.fingerprint`); adapting on another space raises ValueError once the state is non-empty (reset first),
and predicting on another space answers from empty state without touching the held one (see `ensure_space`).

Deliberate deviations:
- fp32 residuals and logits (official: fp16 residual parameters under ``torch.cuda.amp.autocast``);
- the image features are computed once without a graph: the official code back-propagates through the image
  encoder for nothing (the residuals' gradients are the same); on ImageNet-A the final re-selection reuses these
  features instead of re-encoding the same views (same values);
- the class text features are the label space's (`Clip.text_head`); the official ones add CuPL GPT-3 sentences;
- views from `ctta.views` (kornia); confident views by a stable sort; a batch is processed in stream order;
- `predict` is the prediction of the current prototypes and cache (step 4 with zero residuals, no insertion, no
  optimisation step, no evolution);
- a sample with non-finite features (an fp16 overflow, a corrupt input) is not admitted to the state; it is
  counted in ``skipped_steps`` (the official code would store the NaNs).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ctta.checks import check_logit_scale, check_number
from ctta.losses import entropy, info_nce
from ctta.model import Clip
from ctta.stream import LabelSpace
from ctta.strategy import Strategy
from ctta.strategies._cache import (ClassCache, class_logits, confident_query, encode_views, ensure_space,
                                    finite_samples, fork_generator, normalized_entropy)


def class_prototypes(cache: ClassCache) -> tuple[Tensor, Tensor]:
    """The official ``cache_key_value``: per class present in the cache (sorted), the mean of its cached features
    (not normalised). Returns ``(prototypes [n, D], classes [n])``."""
    keys, classes, _, _ = cache.items()
    present = torch.unique(classes)
    sums = keys.new_zeros(cache.n_classes, keys.shape[1]).index_add_(0, classes, keys)
    return sums[present] / cache.count[present, None].to(keys.dtype), present


class DPE(Strategy):
    """Dual prototype evolving (see the module docstring)."""

    learns = False  # nothing is trained on labelled data; the per-sample step is part of adapt
    views_from_source = True  # its views are cropped from the image as given (`ctta.views`)
    holds_label_space = True  # prototypes and residuals keyed by class

    def __init__(self, *, alpha: float = 6.0, beta: float = 5.0, lr_text: float = 6e-4, lr_image: float = 6e-4,
                 align: float = 0.5, shot_capacity: int = 3, text_threshold: float = 0.1,
                 final_query: str = "view0", n_views: int = 63, augmix: bool = True, selection_p: float = 0.1,
                 nce_temperature: float = 0.01, adam_eps: float = 1e-3, weight_decay: float = 0.1,
                 entropy_norm: str = "log2", logit_scale: float | None = 100.0, view_batch: int = 256, seed: int = 1,
                 amp: bool = False, eval_batch_size: int = 256):
        super().__init__(eval_batch_size=eval_batch_size, amp=amp)
        if final_query not in ("view0", "confident"):
            raise ValueError(f"final_query must be 'view0' or 'confident' (ImageNet-A), got {final_query!r}")
        if shot_capacity < 1 or n_views < 0 or view_batch < 1:
            raise ValueError(f"bad shot_capacity={shot_capacity}, n_views={n_views} or view_batch={view_batch}")
        for name, value in dict(alpha=alpha, beta=beta, lr_text=lr_text, lr_image=lr_image, align=align,
                                text_threshold=text_threshold, weight_decay=weight_decay).items():
            check_number("DPE", name, value)
        for name, value in dict(nce_temperature=nce_temperature, adam_eps=adam_eps).items():
            check_number("DPE", name, value, low_open=True)
        check_logit_scale("DPE", logit_scale)
        if not 0.0 < selection_p <= 1.0:
            raise ValueError(f"selection_p must be in (0, 1], got {selection_p}")
        normalized_entropy(0.0, 2, entropy_norm)  # validates the switch
        self.alpha, self.beta, self.lr_text, self.lr_image, self.align = alpha, beta, lr_text, lr_image, align
        self.shot_capacity, self.text_threshold, self.final_query = shot_capacity, text_threshold, final_query
        self.n_views, self.augmix, self.selection_p = n_views, augmix, selection_p
        self.nce_temperature, self.adam_eps, self.weight_decay = nce_temperature, adam_eps, weight_decay
        self.entropy_norm, self.logit_scale, self.view_batch, self.seed = entropy_norm, logit_scale, view_batch, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.text: Tensor | None = None   # t̄ [C, D], the evolving textual prototypes
        self.n_avg = 0                    # members of the running mean besides the initial text head
        self.cache: ClassCache | None = None
        self.space: str | None = None  # fingerprint of the label space the state was built for

    def setup(self, model: Clip) -> None:
        super().setup(model)
        self.text, self.n_avg, self.cache, self.space = None, 0, None, None

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.generator.manual_seed(seed)

    # ----------------------------------------------------------------------------------------- the method
    def _state_for(self, head: Tensor, space: LabelSpace, adapt: bool) -> tuple[Tensor, ClassCache, bool]:
        """``(t̄, cache, fresh)`` for ``space`` with class head ``head``: fresh state (the text head and an empty
        cache) while nothing has been adapted or when predicting on another space, else the held one (adapting on
        another space raises; `ensure_space`)."""
        n = self.text.shape[0] if self.text is not None else 0
        empty = self.text is None or (self.n_avg == 0 and len(self.cache) == 0)
        if ensure_space(self.space, n, empty, space, type(self).__name__, adapt):
            return head.clone(), ClassCache(head.shape[0], self.shot_capacity, head.shape[1], device=head.device), True
        return self.text, self.cache, False

    def cache_term(self, f: Tensor, protos: Tensor, present: Tensor, n_classes: int) -> Tensor:
        """``α·Σ_c exp(−β(1 − f·v_c))·onehot_c`` over the (normalised) visual prototypes ``[C]``."""
        w = torch.exp(-self.beta * (1.0 - protos @ f))
        return self.alpha * f.new_zeros(n_classes).index_add(0, present, w)

    def _scores(self, feats: Tensor, text: Tensor) -> Tensor:
        return class_logits(self._model(), feats, F.normalize(text, dim=-1), self.logit_scale)

    def _final(self, feats: Tensor, text: Tensor, protos: Tensor, present: Tensor) -> Tensor:
        """Step 4: the prediction with textual prototypes ``text`` (un-normalised) and visual ``protos``."""
        if self.final_query == "confident":
            f, z = confident_query(feats, self._scores(feats, text), self.selection_p)[:2]
        else:
            f, z = feats[0], self._scores(feats[:1], text)[0]
        return z + self.cache_term(f, F.normalize(protos, dim=-1), present, text.shape[0])

    @torch.enable_grad()
    def residual_step(self, feats: Tensor, text: Tensor, cache: ClassCache) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Steps 1-3 for one sample's view features ``[V, D]``: updates ``cache``; returns ``(r_t, r_v, v, present)``
        after the AdamW step (the residuals and the visual prototypes they apply to)."""
        c = text.shape[0]
        r_t = torch.zeros_like(text, requires_grad=True)
        f, z, h, _, pred = confident_query(feats, self._scores(feats, text + r_t), self.selection_p)
        cache.insert(pred, f, normalized_entropy(h.detach(), c, self.entropy_norm))
        protos, present = class_prototypes(cache)
        r_v = torch.zeros_like(protos, requires_grad=True)
        v = F.normalize(protos + r_v, dim=-1)
        loss = entropy(z + self.cache_term(f, v, present, c))
        if self.align:
            loss = loss + self.align * info_nce(v, F.normalize(text + r_t, dim=-1)[present], self.nce_temperature)
        # a fresh AdamW every sample (official): its first step is ≈ −lr·g/(|g| + eps), almost a sign step. Through
        # `Strategy.step` (backward, non-finite guard); the optimizer is dropped afterwards, so it is never state.
        self.optimizer = torch.optim.AdamW([{"params": [r_t], "lr": self.lr_text},
                                            {"params": [r_v], "lr": self.lr_image}],
                                           eps=self.adam_eps, weight_decay=self.weight_decay)
        try:
            self.step(loss)
        finally:
            self.optimizer = None
        return r_t.detach(), r_v.detach(), protos, present

    def _sample(self, feats: Tensor, text: Tensor, cache: ClassCache) -> tuple[Tensor, Tensor]:
        """One adapted sample: returns ``(final logits [C], new t̄)``."""
        r_t, r_v, protos, present = self.residual_step(feats, text, cache)
        t_star = F.normalize(text + r_t, dim=-1)
        out = self._final(feats, t_star, protos + r_v, present)
        if normalized_entropy(entropy(out), text.shape[0], self.entropy_norm) < self.text_threshold:
            self.n_avg += 1  # cumulative mean; the official code does not re-normalise it
            text = text * (self.n_avg / (self.n_avg + 1)) + t_star / (self.n_avg + 1)
        return out, text

    @torch.no_grad()
    def adapt(self, images: Tensor, space: LabelSpace) -> Tensor:
        """Cache, residual step, prediction and textual evolution for each image in stream order. ``[B, C]``."""
        head = self._model().text_head(space)  # frozen text tower: cached by the Clip
        text, cache, fresh = self._state_for(head, space, adapt=True)
        feats = encode_views(self, images, self.n_views, augmix=self.augmix, generator=self.generator,
                             view_batch=self.view_batch)
        ok = finite_samples(feats)
        if fresh and bool(ok.any()):
            self.text, self.cache, self.n_avg, self.space = text, cache, 0, space.fingerprint
        out = []
        for f, fine in zip(feats, ok.tolist()):
            if not fine:  # non-finite features: no cache entry, no step, no evolution
                self.skipped_steps += 1
                protos, present = class_prototypes(cache)
                out.append(self._final(f, text, protos, present))
                continue
            logits, text = self._sample(f, text, cache)
            self.text = text
            out.append(logits)
        return torch.stack(out)

    @torch.no_grad()
    def predict(self, images: Tensor, space: LabelSpace) -> Tensor:
        """The current prototypes' prediction (no residual step, no cache insertion, no evolution)."""
        text, cache, _ = self._state_for(self._model().text_head(space), space, adapt=False)
        n = self.n_views if self.final_query == "confident" else 0
        feats = encode_views(self, images, n, augmix=self.augmix, generator=fork_generator(self.generator),
                             view_batch=self.view_batch)
        protos, present = class_prototypes(cache)
        return torch.stack([self._final(f, text, protos, present) for f in feats])

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(generator=self.generator.get_state(), n_avg=self.n_avg,
                     text=self.text.clone() if self.text is not None else None,
                     cache=self.cache.state_dict() if self.cache is not None else None, space=self.space)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dev = self.model.device if self.model is not None else None
        text = state["text"].clone().to(dev) if state["text"] is not None else None
        cache = ClassCache.from_state(state["cache"], device=dev) if state["cache"] is not None else None
        self.generator.set_state(state["generator"].clone())
        self.n_avg, self.text, self.cache, self.space = int(state["n_avg"]), text, cache, state.get("space")
