"""ZERO: test-time augmentation with zero temperature (a majority vote of the confident views).

Paper: Farina, Franchi, Iacca, Mancini, Ricci, "Frustratingly Easy Test-Time Adaptation of Vision-Language Models",
NeurIPS 2024. Official code: FarinaMatteo/zero (commit c609f7c), followed exactly: ``ttas/zero.py`` (``Zero.zero``),
``ttas/base.py`` (``confidence_filter``), ``utils/tools.py`` (``greedy_break``, ``break_sample_tie``),
``data/augs.py`` (``MultiViewCropAndFlip``: the original + 63 random resized crops + flips, no AugMix).

Per sample: ``l = cos(view, class text)`` for the 64 views; ``p = softmax(l · 100)`` (the official temperature
``1 / logit_scale.exp()``); keep the ``int(64·γ) = 19`` lowest-entropy views (γ = 0.3 in the code; TPT's 0.1 is a
trap); each kept view votes for its argmax (softmax at zero temperature) and the votes are summed. A tie on the top
count is broken greedily: walk the views ``l[k:]`` (k = int(64·γ), original view order, as the official
``greedy_break(ties, l[k:])``) and take the first whose argmax is a tied class; that class gets one more vote.
The output is the vote count vector (the official ``p_bar``): its argmax is the prediction, its softmax is not a
calibrated probability. Nothing is learned and no state carries over between samples but the view generator, so
the strategy is episodic by default (``default_reset = "episodic"``).

``logit_scale=100.0`` is the official scale (it sets the entropies that select the views); ``None`` uses the
model's learned scale.

Deliberate deviations:
- ``vote_temperature=0.0`` (default) votes with exact one-hot argmaxes, the paper's zero temperature. The official
  code runs under fp16 autocast and divides by ``finfo(fp16).eps`` ≈ 9.8e-4, which leaves a vote soft when the two
  best cosines of a view differ by less than about 0.01; ``vote_temperature=9.765625e-4`` reproduces that;
- the fallback of the tie-break (no view of ``l[k:]`` votes for a tied class) is the argmax of ``l[k]`` over the
  tied classes, as intended: the official ``break_sample_tie`` indexes with ``~ties`` on an int tensor (a bitwise
  NOT, i.e. negative indices); with ``k = V`` (γ = 1) there is no such view and the lowest tied class wins;
- views from `ctta.views` on the model's device (kornia, bilinear without antialiasing), fp32 features;
- entropies from ``log_softmax`` (the official ``p·log p`` gives nan for a probability that underflows to 0);
- a batch of B images is B independent samples.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ctta.checks import check_logit_scale, check_number
from ctta.losses import entropy
from ctta.model import Clip
from ctta.stream import LabelSpace
from ctta.strategy import Strategy
from ctta.strategies._cache import encode_views, fork_generator


def zero_vote(cos: Tensor, gamma: float = 0.3, scale: float = 100.0, vote_temperature: float = 0.0) -> Tensor:
    """ZERO's output for one sample's views ``cos [V, C]`` (unscaled cosines): the vote counts ``[C]`` of the
    ``int(V·γ)`` lowest-entropy views (entropy of ``softmax(scale·cos)``), ties broken greedily (module docstring)."""
    v, c = cos.shape
    k = int(v * gamma)
    keep = torch.argsort(entropy(scale * cos), stable=True)[:k]
    if vote_temperature > 0:
        votes = (cos[keep] / vote_temperature).softmax(-1).sum(0)
    else:
        votes = torch.zeros(c, dtype=cos.dtype, device=cos.device).index_add_(
            0, cos[keep].argmax(-1), torch.ones(len(keep), dtype=cos.dtype, device=cos.device))
    top = votes.max()
    tied = (votes == top).nonzero().flatten()
    if len(tied) > 1:
        rest = cos[k:].argmax(-1)
        hits = rest[torch.isin(rest, tied)]
        if len(hits):
            pred = int(hits[0])
        elif k < v:
            pred = int(tied[cos[k, tied].argmax()])
        else:
            pred = int(tied[0])
        votes[pred] += 1
    return votes


class ZERO(Strategy):
    """Zero-temperature vote of the confident views (see the module docstring)."""

    learns = False
    views_from_source = True  # its views are cropped from the image as given (`ctta.views`)
    sample_episodes = True        # each sample is its own episode (nothing is adapted)
    default_reset = "episodic"    # the official protocol; there is no state to carry anyway

    def __init__(self, *, n_views: int = 63, gamma: float = 0.3, augmix: bool = False, vote_temperature: float = 0.0,
                 logit_scale: float | None = 100.0, view_batch: int = 256, seed: int = 1, amp: bool = False,
                 eval_batch_size: int = 256):
        super().__init__(eval_batch_size=eval_batch_size, amp=amp)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma (the share of views that vote) must be in (0, 1], got {gamma}")
        if n_views < 0 or view_batch < 1:
            raise ValueError(f"bad n_views={n_views} or view_batch={view_batch}")
        check_number("ZERO", "vote_temperature", vote_temperature)
        check_logit_scale("ZERO", logit_scale)
        self.n_views, self.gamma, self.augmix, self.vote_temperature = n_views, gamma, augmix, vote_temperature
        self.logit_scale, self.view_batch, self.seed = logit_scale, view_batch, seed
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, model: Clip) -> None:
        super().setup(model)  # frozen CLIP; the class text features are cached by the Clip

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.generator.manual_seed(seed)

    def _run(self, images: Tensor, space: LabelSpace, generator: torch.Generator) -> Tensor:
        m = self._model()
        head = m.text_head(space)
        feats = encode_views(self, images, self.n_views, augmix=self.augmix, generator=generator,
                             view_batch=self.view_batch)
        scale = float(m.logit_scale) if self.logit_scale is None else self.logit_scale
        return torch.stack([zero_vote(f @ head.t(), self.gamma, scale, self.vote_temperature) for f in feats])

    @torch.no_grad()
    def adapt(self, images: Tensor, space: LabelSpace) -> Tensor:
        """Vote counts ``[B, C]`` (argmax = prediction). Only the view generator advances."""
        return self._run(images, space, self.generator)

    @torch.no_grad()
    def predict(self, images: Tensor, space: LabelSpace) -> Tensor:
        """The same vote with views from a copy of the generator: changes nothing."""
        return self._run(images, space, fork_generator(self.generator))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"].clone())
