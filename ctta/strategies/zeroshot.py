"""Zero-shot CLIP: the Continual-CLIP baseline.

Paper: Thengane et al., "CLIP model is an Efficient Continual Learner" (2022); reference code
vgthengane/Continual-CLIP. Frozen CLIP, no training; at each step the text classifier holds every class of the
evaluation space (all seen classes in class-incremental streams). With ``templates`` given, they replace the label
space's own (e.g. Continual-CLIP's "a bad photo of a {}." for CIFAR-100, or a template ensemble: the class embedding
is then the normalised mean of the normalised template embeddings, as in CLIP).

With ``cache=True`` (default) image features come from a `ctta.cache.FeatureCache`: the tower is frozen, so each
distinct test image is encoded once per run however often the accuracy matrix and retention hooks evaluate it
(memory: D·4 bytes per distinct image; ``cache_size`` bounds the entries, least recently used evicted).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ctta.cache import FeatureCache
from ctta.stream import LabelSpace
from ctta.strategy import Strategy


class ZeroShot(Strategy):
    learns = False

    def __init__(self, templates: Sequence[str] | None = None, *, eval_batch_size: int = 256, cache: bool = True,
                 cache_size: int | None = None):
        super().__init__(eval_batch_size=eval_batch_size)
        self.templates = tuple(templates) if templates is not None else None
        self.cache = FeatureCache(cache_size) if cache else None

    @torch.no_grad()
    def predict(self, images: Tensor, space: LabelSpace) -> Tensor:
        if self.templates is not None:
            space = space.with_templates(self.templates)
        if self.cache is None:
            return super().predict(images, space)
        m = self._model()
        return m.logits(F.normalize(self.cache.encode(m, images), dim=-1), m.text_head(space))
