"""TPT — test-time prompt tuning, episodic or online, with C-TPT's calibration term as an option.

Papers: Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models" (NeurIPS 2022),
reference code azshue/TPT (``tpt_classification.py``, ``clip/custom_clip.py``); Yoon et al., "C-TPT: Calibrated
Test-Time Prompt Tuning" (ICLR 2024), reference code hee-suk-yoon/C-TPT. Online (non-reset) TPT as benchmarked by
TTA-VLM (TomSheng21/tta-vlm ``online_tta.py``) and DynaPrompt (ICLR 2025).

Per test image: 64 views (view 0 = the image, 63 random resized crops + flips, optionally AugMix); the frozen image
tower encodes them once; the ``int(64·0.1) = 6`` lowest-entropy views are kept (the original competes); the loss is
the entropy of their *averaged* probability (``ctta.losses.marginal_entropy``), minus ``λ·ATFD`` for C-TPT; AdamW
(lr 5e-3, torch's default weight decay 0.01) updates only the prompt context (``ctta.adapters.prompts``,
"a photo of a" → 4 vectors); after ``tta_steps`` updates (selection from the first step reused) the prediction is made on
view 0 with the tuned prompt. Resets are the adapter's (`ctta.OnlineAdapter`, the one owner of reset): TPT's
``default_reset`` is ``"episodic"`` with ``sample_episodes``, so every image starts from the initial context and a
fresh AdamW state, as the reference; ``reset="never"`` is online TPT (state carries along the stream), ``k`` resets
every k samples.

Deliberate deviations from the reference code (exact unless noted):
- the image features of the 64 views are computed once per sample and reused across steps and for the final
  prediction (the reference recomputes them: same values, the image tower is frozen);
- the text tower runs on the longest prompt of the label space instead of 77 tokens (exact, causal mask), in
  chunks of classes with activation checkpointing beyond one chunk (same gradient, bounded memory);
- views are made on the model's device with kornia (`ctta.views`: bilinear without antialiasing), not PIL;
- no fp16 GradScaler: ``amp=True`` uses bf16 autocast on CUDA, which needs no loss scaling; a non-finite loss or
  gradient skips the update (`Strategy.step`) instead of the scaler's skip;
- a batch of B images given to ``adapt`` is processed sample after sample in order (sample i+1 sees the update of
  i); the views of the whole batch are made and encoded in one go. Episodic evaluation gives the adapter one image
  per episode, and the adapter rests at the anchor between calls, so ``predict`` is the untuned prompt there, as in
  the reference, where the reset comes first.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctta.adapters.prompts import PromptLearner
from ctta.checks import check_number, check_optimizer
from ctta.losses import atfd, marginal_entropy, select_confident
from ctta.model import Clip
from ctta.stream import LabelSpace
from ctta.strategy import Strategy
from ctta.views import eval_view, tpt_views


class TPT(Strategy):
    """Test-time prompt tuning. ``ctpt_lambda > 0`` turns it into C-TPT (λ = 50 fine-grained, 20 natural shift)."""

    learns = False
    views_from_source = True  # its views are cropped from the image as given (`ctta.views`)
    default_reset = "episodic"  # the paper's protocol: every test image starts from the initial prompt
    sample_episodes = True      # ... each image of a batch too

    def __init__(self, *, ctx_init: str = "a photo of a", n_ctx: int | None = None, class_specific: bool = False,
                 n_classes: int | None = None, suffix: str = ".", lr: float = 5e-3, weight_decay: float = 0.01,
                 tta_steps: int = 1, n_views: int = 63, selection_p: float = 0.1, augmix: bool = False,
                 ctpt_lambda: float = 0.0, chunk_size: int | None = 256,
                 view_batch: int = 256, seed: int = 0, amp: bool = False, eval_batch_size: int = 256):
        super().__init__(eval_batch_size=eval_batch_size, amp=amp)
        if tta_steps < 1:
            raise ValueError(f"tta_steps must be >= 1, got {tta_steps}")
        if not 0.0 < selection_p <= 1.0:
            raise ValueError(f"selection_p must be in (0, 1], got {selection_p}")
        if n_views < 0 or view_batch < 1:
            raise ValueError(f"bad n_views={n_views} or view_batch={view_batch}")
        check_optimizer(type(self).__name__, lr, weight_decay)
        check_number(type(self).__name__, "ctpt_lambda", ctpt_lambda)
        self.ctx_init, self.n_ctx, self.class_specific, self.n_classes = ctx_init, n_ctx, class_specific, n_classes
        self.suffix, self.lr, self.weight_decay, self.tta_steps = suffix, lr, weight_decay, tta_steps
        self.n_views, self.selection_p, self.augmix = n_views, selection_p, augmix
        self.ctpt_lambda, self.chunk_size = ctpt_lambda, chunk_size
        self.view_batch, self.seed = view_batch, seed
        self.prompts: PromptLearner | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self._pred_cache: tuple[tuple, Tensor] | None = None

    # ----------------------------------------------------------------------------------------- lifecycle
    def setup(self, model: Clip) -> None:
        super().setup(model)  # freezes the whole CLIP: only the context learns
        self.prompts = PromptLearner(model, self.ctx_init or None, n_ctx=self.n_ctx,
                                     class_specific=self.class_specific, n_classes=self.n_classes,
                                     suffix=self.suffix, chunk_size=self.chunk_size)
        self.optimizer = torch.optim.AdamW([self.prompts.ctx], lr=self.lr, weight_decay=self.weight_decay)

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.generator.manual_seed(seed)  # the views' crops and flips

    # ----------------------------------------------------------------------------------------- prediction
    def class_features(self, space: LabelSpace) -> Tensor:
        """Prompt-conditioned class features with the current context (no grad; cached while it is unchanged)."""
        p = self._prompts()
        key = (space.classnames, id(p.ctx), p.ctx._version)
        if self._pred_cache is not None and self._pred_cache[0] == key:
            return self._pred_cache[1]
        with torch.no_grad(), self.autocast():
            feats = p(space).float()
        self._pred_cache = (key, feats)
        return feats

    @torch.no_grad()
    def predict(self, images: Tensor, space: LabelSpace) -> Tensor:
        m = self._model()
        head = self.class_features(space)
        images = eval_view(images, m.image_size)  # the eval view of a whole image (views_from_source)
        with self.autocast():
            feats = torch.cat([m.encode_image(images[i:i + self.eval_batch_size])
                               for i in range(0, images.shape[0], self.eval_batch_size)])
        return m.logits(feats.float(), head)

    # ----------------------------------------------------------------------------------------- adaptation
    @torch.no_grad()
    def view_features(self, images: Tensor) -> Tensor:
        """L2-normalised features ``[B, 1 + n_views, D]`` of every image's views (frozen tower: computed once)."""
        m = self._model()
        views = tpt_views(images.to(m.device), m.image_size, self.n_views, augmix_views=self.augmix,
                          generator=self.generator).flatten(0, 1)
        with self.autocast():
            feats = torch.cat([m.encode_image(views[i:i + self.view_batch])
                               for i in range(0, views.shape[0], self.view_batch)])
        return feats.float().view(images.shape[0], 1 + self.n_views, -1)

    def loss(self, logits: Tensor, text_features: Tensor, selected: Tensor) -> Tensor:
        """TPT's marginal entropy over the selected views, minus ``λ·ATFD`` (C-TPT) when ``ctpt_lambda > 0``."""
        loss = marginal_entropy(logits[selected])
        if self.ctpt_lambda:
            loss = loss - self.ctpt_lambda * atfd(text_features)
        return loss

    @torch.enable_grad()
    def tune(self, feats: Tensor, space: LabelSpace) -> dict[str, float]:
        """``tta_steps`` updates of the context on one sample's view features ``[V, D]``."""
        m, p = self._model(), self._prompts()
        selected, last = None, float("nan")
        for _ in range(self.tta_steps):
            with self.autocast():
                text = p(space)
            logits = m.logits(feats, text.float()).float()
            if selected is None:  # the reference selects once and reuses the indices for later steps
                selected = select_confident(logits, self.selection_p)
            loss = self.loss(logits, text, selected)
            self.step(loss)
            last = float(loss.detach())
        return {"loss": last}

    def adapt(self, images: Tensor, space: LabelSpace) -> Tensor:
        """Tune on each image in turn and predict it (view 0) with its tuned prompt. Returns logits ``[B, C]``."""
        m = self._model()
        feats = self.view_features(images)
        out = []
        for b in range(feats.shape[0]):
            self.tune(feats[b], space)
            out.append(m.logits(feats[b, :1], self.class_features(space)))
        return torch.cat(out)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(ctx=self._prompts().ctx.detach().clone(), generator=self.generator.get_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self._prompts().ctx.copy_(state["ctx"])
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    def _prompts(self) -> PromptLearner:
        if self.prompts is None:
            raise RuntimeError("TPT.setup(model) has not been called")
        return self.prompts
