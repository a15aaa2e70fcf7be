"""Fixed-rank LoRA, merged after every task: the "LoRA r=16" baseline of CoDyRA's tables.

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022); as a continual baseline in
Lu et al., CoDyRA (arXiv 2412.01004; Artificer-AI-Lab/CoDyRA, "LoRA r4 / r16" rows). Reference LoRA code:
microsoft/LoRA ``loralib``, huggingface/peft.

Identical to `ctta.strategies.rank_lora.RankSelectiveLoRA` except for the gates: both run the one training path
`ctta.task_lora.TaskLoRA` (a fresh rank-r LoRA on q, k, v, out, fc, proj of both towers, the loss
`ctta.losses.seen_masked_clip_loss`, AdamW + cosine, merged into the base weights after every task and replaced by a
fresh one); here without gates or thresholding, ``ΔW = scaling·B·A``. Every rank stays in use, so the effective
rank is ``r`` per module and task. ``scaling`` defaults to 1 (LoRA's α = r), the scale CoDyRA's own adapters use,
so the two differ only in the gates.
Without ``begin_task`` (hidden boundary) the whole training space is treated as the current task.

On a ``ModifiedResNet`` image tower (CLIP RN50/RN101; the reference code adapts ViT towers only, so this mapping is
ours) the image side of the LoRA is the attention pool, its only attention: ``q``, ``k``, ``v``, ``out`` adapt
``attnpool.q_proj`` / ``k_proj`` / ``v_proj`` / ``c_proj``; ``fc`` and ``proj`` have no counterpart there and are
skipped on that tower (a target list of only ``fc`` / ``proj`` with the image tower is refused, naming the tower and
the supported targets); the pool counts as the tower's one block (``layers`` 0 or -1). The convolutional stages stay
frozen, their BatchNorms on their running statistics even while training (`ctta.batchnorm`), and merging after a
task gives the unmerged adapter's outputs (``tests/test_resnet_tower``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor

from ctta.adapters.lora import TARGETS, TOWERS
from ctta.adapters.lora import LoRA as LoRAModule
from ctta.model import Clip
from ctta.optim import steps_per_task
from ctta.strategy import Strategy
from ctta.stream import LabelSpace, Task
from ctta.task_lora import TaskLoRA


class LoRA(Strategy):
    """Fixed-rank continual LoRA (see the module docstring); ``summary()`` reports ranks and ``||θ_t − θ_0||_F``.
    It owns the per-task LoRA lifecycle and state; `RankSelectiveLoRA` (CoDyRA) is a LoRA with gates
    (``gated = True``) and a proximal step after each optimizer step (`_after_step`)."""

    gated = False  # per-rank gates ΔW = B·diag(w)·A (CoDyRA); without them ΔW = scaling·B·A

    def __init__(self, *, rank: int = 16, scaling: float = 1.0, targets: Sequence[str] = TARGETS,
                 towers: Sequence[str] = TOWERS, layers: Sequence[int] | Mapping | None = None, lr: float = 5e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.9999), warmup: int = 0,
                 text_to_image: bool | None = None, logit_scale: float | None = None, batch_size: int = 64,
                 epochs: int = 1, iterations: int | None = 500, grad_clip: float | None = None, amp: bool = False):
        super().__init__(batch_size=batch_size, epochs=epochs, iterations=iterations, grad_clip=grad_clip, amp=amp)
        self.task_lora = TaskLoRA(rank=rank, gated=self.gated, scaling=scaling, targets=targets, towers=towers,
                                  layers=layers, lr=lr, weight_decay=weight_decay, betas=betas, warmup=warmup,
                                  text_to_image=text_to_image, logit_scale=logit_scale)

    @property
    def loras(self) -> list[LoRAModule]:
        """The current task's LoRA modules."""
        return self.task_lora.loras

    def setup(self, model: Clip) -> None:
        super().setup(model)
        self.task_lora.attach(model)

    def _start(self, space: LabelSpace, current: LabelSpace, total: int) -> None:
        """A fresh LoRA and optimizer for a task of ``total`` steps on ``current`` (``space``: all seen classes)."""
        self.optimizer, self.scheduler = self.task_lora.begin_task(space, current, total)

    def begin_task(self, task: Task, space: LabelSpace) -> None:
        self._start(space, task.space, self.task_steps(task))

    def learn(self, images: Tensor, labels: Tensor, space: LabelSpace) -> dict[str, float]:
        if not self.task_lora.started:  # no begin_task (hidden boundary): the whole training space is the task
            self._start(space, space, max(1, steps_per_task(self.batch_size * (self.iterations or 100),
                                                            self.batch_size, self.epochs, self.iterations)))
        loss, stepped = self.task_lora.learn(images, labels, self.step, self.autocast())
        return {"loss": float(loss.detach()), **self._after_step(stepped)}

    def _after_step(self, stepped: bool) -> dict[str, float]:
        """Called after each training batch (``stepped``: the optimizer stepped); returns extra values to log."""
        return {}

    def end_task(self, task: Task, space: LabelSpace) -> None:
        self.task_lora.end_task(task.name)
        self.optimizer, self.scheduler = None, None  # the next task builds its own

    def summary(self) -> dict[str, Any]:
        """Per-task effective ranks and drift ‖θ_t − θ_0‖, and the last task's headline numbers."""
        return self.task_lora.history.summary()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lora": self.task_lora.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.task_lora.load_state_dict(state.get("lora", {}))
