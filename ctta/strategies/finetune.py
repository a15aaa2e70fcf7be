"""Naive fine-tuning: the lower bound every continual method is measured against.

Trains the whole CLIP (or chosen parameter groups) with cross-entropy on the current task, AdamW and a cosine
schedule with warm-up, as ZSCL's "Continual FT" baseline (Thunderbeee/ZSCL ``mtil/src/models/finetune.py``):
logits ``exp(logit_scale)·f(x)·g(prompts)^T`` over the training label space (all seen classes in a
class-incremental stream), prompts from each class's first template, the text tower trained too when selected.
The optimizer and schedule are rebuilt at each task, as the reference does.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from ctta.merging import check_alpha, interpolate_
from ctta.model import Clip
from ctta.optim import adamw_cosine
from ctta.stream import LabelSpace, Task
from ctta.strategy import Strategy


def class_features(model: Clip, space: LabelSpace, text_trainable: bool) -> Tensor:
    """Class text features for training: through the (trainable) text tower with grad, else the cached head."""
    return model.encode_text(class_prompts(space)) if text_trainable else model.text_head(space)


def setup_finetuning(s: Strategy, model: Clip) -> None:
    """Shared by Finetune, LwF and VR-LwF: unfreeze ``s.params``, note whether the text tower trains, build a
    placeholder optimizer (rebuilt per task) and, for WiSE-FT, snapshot the zero-shot anchor. The runner loads a
    resumed checkpoint after setup, so the anchor is always the zero-shot weights."""
    s._trainable = model.unfreeze(s.params)
    s._text_trainable = any(p.requires_grad for p in model.text_parameters())
    build_optimizer(s, 1)
    if s.wise_alpha is not None:
        s._anchor = model.trainable_state()


def build_optimizer(s: Strategy, total_steps: int) -> None:
    """AdamW + cosine with warm-up over ``total_steps`` on ``s._trainable`` (rebuilt at each task, as ZSCL does)."""
    s.optimizer, s.scheduler = adamw_cosine(s._trainable, total_steps, lr=s.lr, betas=s.betas,
                                            weight_decay=s.weight_decay, warmup=s.warmup)


def class_prompts(space: LabelSpace) -> list[str]:
    """One training prompt per class: its first template (ZSCL trains with ``templates[0]``)."""
    return [space.class_templates[i][0].replace("{}", c) for i, c in enumerate(space.classnames)]


class Finetune(Strategy):
    """Full or partial fine-tuning with cross-entropy. ``params``: parameter-name prefixes to train
    (``""`` = everything but ``logit_scale``; e.g. ``["visual."]`` for the image tower only). ``wise_alpha``: after each
    task, WiSE-FT interpolation with the zero-shot weights snapshotted at setup, ``θ ← (1−α)·θ_zs + α·θ``
    (`ctta.merging.interpolate_`); ``None`` = off."""

    def __init__(self, params: str | Iterable[str] = "", *, lr: float = 1e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup: int = 0, label_smoothing: float = 0.0,
                 batch_size: int = 64, epochs: int = 1, iterations: int | None = None, grad_clip: float | None = None,
                 amp: bool = False, wise_alpha: float | None = None):
        super().__init__(batch_size=batch_size, epochs=epochs, iterations=iterations, grad_clip=grad_clip, amp=amp)
        self.params = params if isinstance(params, str) else tuple(params)
        self.wise_alpha = check_alpha(wise_alpha)
        self._anchor: dict[str, Tensor] | None = None
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup, self.label_smoothing = warmup, label_smoothing
        self._trainable: list[torch.nn.Parameter] = []

    def setup(self, model: Clip) -> None:
        super().setup(model)
        setup_finetuning(self, model)

    def begin_task(self, task: Task, space: LabelSpace) -> None:
        build_optimizer(self, self.task_steps(task))

    def learn(self, images: Tensor, labels: Tensor, space: LabelSpace) -> dict[str, float]:
        m = self._model()
        m.train()
        with self.autocast():
            logits = m.logits(m.encode_image(images), class_features(m, space, self._text_trainable))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        self.step(loss)
        m.eval()
        return {"loss": float(loss.detach())}

    def end_task(self, task: Task, space: LabelSpace) -> None:
        if self._anchor is not None:
            interpolate_(self._model(), self._anchor, self.wise_alpha)
