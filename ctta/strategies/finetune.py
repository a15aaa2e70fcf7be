"""Naive fine-tuning: the lower bound every continual method is measured against; with ``wise_alpha``, WiSE-FT.

Trains the whole CLIP (or chosen parameter groups) with cross-entropy on the current task, AdamW and a cosine
schedule with warm-up, as ZSCL's "Continual FT" baseline (Thunderbeee/ZSCL ``mtil/src/models/finetune.py``):
logits ``exp(logit_scale)·f(x)·g(prompts)^T`` over the training label space (all seen classes in a
class-incremental stream), prompts from each class's first template, the text tower trained too when selected.
The optimizer and schedule are rebuilt at each task, as the reference does (``reset_optimizer_per_task``,
``schedule``: see `ctta.finetuning.FineTuning`, which owns the trainable set, optimizer, schedule and WiSE anchor).

WiSE-FT (Wortsman et al., CVPR 2022; mlfoundations/wise-ft): ``wise_alpha`` interpolates with the zero-shot
weights after every task, ``θ ← (1−α)·θ_zs + α·θ``. ZSCL's ``--wise_merge`` (α = ``--wise_ft_alpha``) does the same
with ``--wise_ft_model zeroshot`` and with the task-start weights otherwise; we keep the zero-shot anchor.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from ctta.batchnorm import statistics_of_trainable
from ctta.data import check_labels
from ctta.finetuning import FineTuning
from ctta.model import Clip
from ctta.stream import LabelSpace, Task
from ctta.strategy import Strategy


class Finetune(Strategy):
    """Full or partial fine-tuning with cross-entropy. ``params``: parameter-name prefixes to train
    (``""`` = everything but ``logit_scale``; e.g. ``["visual."]`` for the image tower only). ``schedule``
    (``"cosine"`` | ``"constant"``, after ``warmup`` steps) restarts at every revealed task boundary;
    ``reset_optimizer_per_task=False`` keeps AdamW's moments across tasks. ``wise_alpha``: after each task, WiSE-FT
    interpolation with the zero-shot weights, ``θ ← (1−α)·θ_zs + α·θ``; ``None`` = off."""

    def __init__(self, params: str | Iterable[str] = "", *, lr: float = 1e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup: int = 0, schedule: str = "cosine",
                 reset_optimizer_per_task: bool = True, label_smoothing: float = 0.0, batch_size: int = 64,
                 epochs: int = 1, iterations: int | None = None, grad_clip: float | None = None, amp: bool = False,
                 wise_alpha: float | None = None):
        super().__init__(batch_size=batch_size, epochs=epochs, iterations=iterations, grad_clip=grad_clip, amp=amp)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
        self.tuning = FineTuning(params, lr=lr, weight_decay=weight_decay, betas=betas, warmup=warmup,
                                 schedule=schedule, reset_optimizer_per_task=reset_optimizer_per_task,
                                 wise_alpha=wise_alpha)
        self.label_smoothing = float(label_smoothing)

    def setup(self, model: Clip) -> None:
        super().setup(model)
        self.optimizer, self.scheduler = self.tuning.attach(model)

    def begin_task(self, task: Task, space: LabelSpace) -> None:
        self.optimizer, self.scheduler = self.tuning.begin_task(self.task_steps(task))

    def learn(self, images: Tensor, labels: Tensor, space: LabelSpace) -> dict[str, float]:
        check_labels(labels, len(images), len(space))
        self._before_step(space)
        m = self._model()
        # a skipped step (non-finite loss) must not keep the batch in the running statistics of a trained BatchNorm
        stats = {k: v.clone() for k, v in statistics_of_trainable(m.net).items()}
        m.train()
        with self.autocast():
            img = m.encode_image(images)
            ce = F.cross_entropy(self.tuning.class_logits(m, img, space).float(), labels,
                                 label_smoothing=self.label_smoothing)
            loss, terms = self._regularise(ce, m, images, img)
        if not self.step(loss):
            with torch.no_grad():
                for k, v in statistics_of_trainable(m.net).items():
                    v.copy_(stats[k])
        m.eval()
        out = {"loss": float(loss.detach())}
        if terms:
            out.update(ce=float(ce.detach()), **{k: float(v.detach()) for k, v in terms.items()})
        return out

    # the two hooks a fine-tuning method with a regulariser overrides (LwF, VR-LwF)
    def _before_step(self, space: LabelSpace) -> None:
        """Called before each step's forward pass, with the training label space."""

    def _regularise(self, ce: Tensor, model: Clip, images: Tensor, image_features: Tensor
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to step on, from the cross-entropy term, and its named extra terms (logged)."""
        return ce, {}

    def end_task(self, task: Task, space: LabelSpace) -> None:
        self.tuning.end_task(self._model())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "finetuning": self.tuning.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "finetuning" in state:
            self.tuning.load_state_dict(state["finetuning"])
        super().load_state_dict(state)
