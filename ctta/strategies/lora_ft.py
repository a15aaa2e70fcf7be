"""Fixed-rank LoRA, merged after every task: the "LoRA r=16" baseline of CoDyRA's tables.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); as a continual baseline in
Lu et al., CoDyRA (arXiv 2412.01004; Artificer-AI-Lab/CoDyRA, "LoRA r4 / r16" rows). Reference LoRA code:
microsoft/LoRA ``loralib``, huggingface/peft.

Identical to `ctta.strategies.rank_lora.RankSelectiveLoRA` except for the gates: a fresh rank-r LoRA (no gates, no
thresholding, ``ΔW = scaling·B·A``) on q, k, v, out, fc, proj of both towers, the same loss
(`ctta.losses.seen_masked_clip_loss`), optimizer and schedule, merged into the base weights after every task and
replaced by a fresh one. Every rank stays in use, so the effective rank is ``r`` per module and task.
``scaling`` defaults to 1 (LoRA's α = r), the scale CoDyRA's own adapters use, so the two differ only in the gates.
Without ``begin_task`` (hidden boundary) the whole training space is treated as the current task.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ctta.adapters.lora import TARGETS, TOWERS, MergeHistory, inject_lora, merge_and_remove
from ctta.adapters.lora import LoRA as LoRAModule
from ctta.losses import seen_masked_clip_loss
from ctta.model import Clip
from ctta.optim import adamw_cosine, steps_per_task
from ctta.strategies.finetune import class_prompts
from ctta.strategy import Strategy
from ctta.stream import LabelSpace, Task


class MergeHistoryState:
    """Report and checkpoint entries of a LoRA strategy's ``self.history`` (`MergeHistory`); mixed in before
    `Strategy` by LoRA and CoDyRA."""

    history: MergeHistory

    def summary(self) -> dict[str, Any]:
        """Per-task effective ranks and drift ‖θ_t − θ_0‖, and the last task's headline numbers."""
        return self.history.summary()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history.load_state_dict(state.get("history", {}))


class LoRA(MergeHistoryState, Strategy):
    """Fixed-rank continual LoRA (see the module docstring); ``summary()`` reports ranks and ``||θ_t − θ_0||_F``."""

    def __init__(self, *, rank: int = 16, scaling: float = 1.0, targets: Sequence[str] = TARGETS,
                 towers: Sequence[str] = TOWERS, layers: Sequence[int] | Mapping | None = None, lr: float = 5e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.9999), warmup: int = 0,
                 text_to_image: bool | None = None, logit_scale: float | None = None, batch_size: int = 64,
                 epochs: int = 1, iterations: int | None = 500, grad_clip: float | None = None, amp: bool = False):
        super().__init__(batch_size=batch_size, epochs=epochs, iterations=iterations, grad_clip=grad_clip, amp=amp)
        self.rank, self.scaling = rank, scaling
        self.targets, self.towers, self.layers = tuple(targets), tuple(towers), layers
        self.lr, self.weight_decay, self.betas, self.warmup = lr, weight_decay, tuple(betas), warmup
        self.text_to_image = ("visual" in self.towers) if text_to_image is None else text_to_image
        self.logit_scale = logit_scale
        self.loras: list[LoRAModule] = []
        self.history = MergeHistory()
        self._seen: Tensor | None = None
        self._cur_space: LabelSpace | None = None
        self._block: slice | None = None

    def _inject(self) -> None:
        self.loras = inject_lora(self._model(), self.targets, self.layers, self.towers, self.rank, gated=False,
                                 scaling=self.scaling)

    def setup(self, model: Clip) -> None:
        super().setup(model)
        self._inject()  # same structure as after end_task, so a resumed run loads into it

    def _start(self, space: LabelSpace, current: LabelSpace, n_train: int) -> None:
        m = self._model()
        self._block = space.locate(current)
        seen = [i for i in range(len(space)) if not self._block.start <= i < self._block.stop]
        self._cur_space = space.subset(range(self._block.start, self._block.stop))
        with torch.no_grad():
            was = m.training
            m.eval()
            self._seen = m.encode_text(class_prompts(space.subset(seen))) if seen else None
            m.train(was)
        total = max(1, steps_per_task(n_train, self.batch_size, self.epochs, self.iterations))
        params = [p for lora in self.loras for p in lora.parameters()]
        self.optimizer, self.scheduler = adamw_cosine(params, total, lr=self.lr, betas=self.betas,
                                                      weight_decay=self.weight_decay, warmup=self.warmup)

    def begin_task(self, task: Task, space: LabelSpace) -> None:
        self._start(space, task.space, len(task.train) if task.train is not None else 0)

    def learn(self, images: Tensor, labels: Tensor, space: LabelSpace) -> dict[str, float]:
        m = self._model()
        if self.optimizer is None:
            self._start(space, space, self.batch_size * (self.iterations or 100))
        m.train()
        with self.autocast():
            feats = m.encode_image(images)
            cur = m.encode_text(class_prompts(self._cur_space))
            scale = m.logit_scale if self.logit_scale is None else self.logit_scale
            seen = self._seen if self._seen is not None else cur.new_zeros(0, cur.shape[1])
            loss = seen_masked_clip_loss(feats, seen, cur, labels - self._block.start, scale, self.text_to_image)
        self.step(loss)
        m.eval()
        return {"loss": float(loss.detach())}

    def end_task(self, task: Task, space: LabelSpace) -> None:
        ranks = {lora.name: lora.rank for lora in self.loras}
        self.history.record_task(task.name, self.loras, ranks, self.rank)
        merge_and_remove(self._model())
        self._inject()
        self.optimizer, self.scheduler, self._seen, self._block = None, None, None, None

