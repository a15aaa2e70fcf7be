"""`TaskLoRA`: the one training path of the continual LoRA strategies (fixed-rank LoRA and CoDyRA).

Per task, as CoDyRA's reference (Lu et al., arXiv 2412.01004; Artificer-AI-Lab/CoDyRA ``models/codyra.py``,
``loralib/codyra.py``, ``runner_codyra.sh``) trains its adapters and the "LoRA r=16" baseline of its tables:

- a fresh rank-r LoRA on the chosen targets of both towers (`ctta.adapters.inject.inject_lora`; gated for CoDyRA);
- AdamW on the LoRA factors (and gates) with a cosine schedule over the task's steps, rebuilt every task;
- the loss `ctta.losses.seen_masked_clip_loss`: image→text CE over [seen; current] classes with the seen columns at
  −inf, plus the text→image soft CE; current-class text features recomputed every step through the LoRA'd text tower
  from the first template, seen-class features computed once at the start of the task (no grad);
- after the task: zero-gate ranks pruned (gated LoRA only), the rest merged into the base weights
  (`merge_and_remove`), recorded in a `MergeHistory`, and a fresh LoRA injected. Inference is plain CLIP.

A strategy holds one `TaskLoRA`, hands the optimizer and scheduler it builds to ``Strategy.optimizer`` /
``scheduler`` (so `Strategy.step` runs them) and adds only what is its own: CoDyRA its proximal step on the gates.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from ctta.adapters.inject import inject_lora, merge_and_remove
from ctta.adapters.lora import TARGETS, TOWERS, LoRA
from ctta.checks import check_logit_scale, check_number, check_optimizer
from ctta.finetuning import class_prompts
from ctta.losses import seen_masked_clip_loss
from ctta.model import Clip
from ctta.optim import lr_schedule
from ctta.stream import LabelSpace


class TaskLoRA:
    """A fresh LoRA per task, trained with CoDyRA's loss and merged after the task (module docstring).

    ``gated``: per-rank gates ``w ~ N(0, 1)`` (CoDyRA) or none (plain LoRA). ``text_to_image``: add the text→image
    term (``None``: when the image tower is adapted, as the reference). ``logit_scale``: the loss's scale
    (``None``: the model's ``exp(logit_scale)``, 100 for OpenAI weights, as the reference)."""

    def __init__(self, *, rank: int, gated: bool, scaling: float = 1.0, targets: Sequence[str] = TARGETS,
                 towers: Sequence[str] = TOWERS, layers: Sequence[int] | Mapping | None = None, lr: float,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.9999), warmup: int = 0,
                 text_to_image: bool | None = None, logit_scale: float | None = None):
        if rank <= 0 or warmup < 0:
            raise ValueError(f"need rank > 0 and warmup >= 0, got rank={rank}, warmup={warmup}")
        check_optimizer("LoRA", lr, weight_decay, betas)
        check_number("LoRA", "scaling", scaling, low_open=True)
        check_logit_scale("LoRA", logit_scale)
        self.rank, self.gated, self.scaling = int(rank), bool(gated), float(scaling)
        self.targets, self.towers, self.layers = tuple(targets), tuple(towers), layers
        self.lr, self.weight_decay, self.betas, self.warmup = float(lr), float(weight_decay), tuple(betas), int(warmup)
        # the reference adds the text→image term whenever the image tower is adapted ('vision' or 'all')
        self.text_to_image = ("visual" in self.towers) if text_to_image is None else bool(text_to_image)
        self.logit_scale = logit_scale
        self.model: Clip | None = None
        self.loras: list[LoRA] = []
        self.history = MergeHistory()
        self.optimizer: torch.optim.AdamW | None = None  # None between tasks
        self.scheduler: LambdaLR | None = None
        self.seen: Tensor | None = None  # T_seen of this task (None: no seen classes)
        self.block: slice | None = None  # where the current classes sit in the training label space
        self.current: LabelSpace | None = None

    def attach(self, model: Clip) -> None:
        """Inject the first LoRA: the structure after `attach` equals the one after `end_task` (merged base + fresh
        LoRA), so a checkpoint written at a task's end loads into a freshly set-up strategy."""
        self.model = model
        self._inject()

    def _inject(self) -> None:
        self.loras = inject_lora(self.model, self.targets, self.layers, self.towers, self.rank, gated=self.gated,
                                 scaling=self.scaling)

    @property
    def started(self) -> bool:
        """Has the current task been started (optimizer built)?"""
        return self.optimizer is not None

    def gates(self) -> list[Tensor]:
        """The gates of the current LoRA (empty without gates)."""
        return [lora.gate for lora in self.loras if lora.gate is not None]

    def begin_task(self, space: LabelSpace, current: LabelSpace, total_steps: int
                   ) -> tuple[torch.optim.AdamW, LambdaLR]:
        """Start training ``current``, a contiguous block of the training space ``space``: encode the seen classes
        once and build AdamW + cosine over ``total_steps`` on the LoRA parameters."""
        m = self._model()
        self.block = space.locate(current)
        seen = [i for i in range(len(space)) if not self.block.start <= i < self.block.stop]
        self.current = space.subset(range(self.block.start, self.block.stop))
        with torch.no_grad(), m.eval_mode():  # T_seen: once per task, through the current (merged) text tower
            self.seen = m.encode_text(class_prompts(space.subset(seen))) if seen else None
        params = [p for lora in self.loras for p in lora.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, "cosine", total_steps, self.warmup)
        return self.optimizer, self.scheduler

    def learn(self, images: Tensor, labels: Tensor, step: Callable[[Tensor], bool],
              autocast: AbstractContextManager) -> tuple[Tensor, bool]:
        """One training step: the loss on a batch whose labels index the training space, then ``step(loss)`` (the
        owning strategy's `Strategy.step`). Returns the loss and whether the optimizer stepped."""
        m = self._model()
        if not self.started:
            raise RuntimeError("TaskLoRA.begin_task() has not been called for this task")
        m.train()
        with autocast:
            feats = m.encode_image(images)
            cur = m.encode_text(class_prompts(self.current))  # with grad through the text LoRA
            scale = m.logit_scale if self.logit_scale is None else self.logit_scale
            seen = self.seen if self.seen is not None else cur.new_zeros(0, cur.shape[1])
            loss = seen_masked_clip_loss(feats, seen, cur, labels - self.block.start, scale, self.text_to_image)
        stepped = step(loss)
        m.eval()
        return loss, stepped

    def end_task(self, task_name: str) -> None:
        """Prune zero-gate ranks (gated only), record and merge the task's LoRA, inject a fresh one."""
        ranks = {lora.name: lora.prune() for lora in self.loras}  # a gate-less LoRA keeps every rank
        self.history.record_task(task_name, self.loras, ranks, self.rank)
        merge_and_remove(self._model())
        self._inject()
        self.optimizer, self.scheduler, self.seen, self.block, self.current = None, None, None, None, None

    def _model(self) -> Clip:
        if self.model is None:
            raise RuntimeError("TaskLoRA.attach(model) has not been called")
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """The merge history (the merged weights are the model's; the optimizer exists only within a task)."""
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state.get("history", {}))


class MergeHistory:
    """Every low-rank update merged so far, per module: the concatenated factors ``B·diag(g)·scaling`` and ``A``
    (the reference keeps them as ``old_lora_A/B``). Gives ``θ_t − θ_0 = Σ_t ΔW_t`` exactly without a copy of θ_0.
    Also keeps the per-task report (effective rank per module, drift) that LoRA strategies summarise."""

    def __init__(self) -> None:
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.task_stats: list[dict] = []

    @torch.no_grad()
    def record(self, loras: Iterable[LoRA]) -> None:
        for lora in loras:
            B = lora.lora_B * lora.gate if lora.gate is not None else lora.lora_B
            B, A = (B * lora.scaling).detach().float().cpu(), lora.lora_A.detach().float().cpu()
            if lora.name in self.factors:
                B0, A0 = self.factors[lora.name]
                B, A = torch.cat([B0, B], 1), torch.cat([A0, A], 0)
            self.factors[lora.name] = (B, A)

    def record_task(self, task: str, loras: Iterable[LoRA], ranks: dict[str, int], rank: int) -> None:
        """Record a task's (pruned) updates before they are merged, with its effective ranks and the drift so far."""
        self.record(loras)
        self.task_stats.append({
            "task": task, "effective_rank": ranks, "mean_effective_rank": sum(ranks.values()) / max(1, len(ranks)),
            "active_fraction": sum(ranks.values()) / max(1, rank * len(ranks)), "drift": self.drift()})

    def drift(self) -> float:
        """``||θ_t − θ_0||_F`` over all adapted matrices (disjoint q/k/v row blocks add in squares)."""
        return math.sqrt(sum(float((B @ A).square().sum()) for B, A in self.factors.values()))

    def summary(self) -> dict:
        """Per-task effective ranks and drift, and the last task's headline numbers."""
        out: dict = {"tasks": self.task_stats}
        if self.task_stats:
            last = self.task_stats[-1]
            out.update(mean_effective_rank=last["mean_effective_rank"], drift=last["drift"])
        return out

    def state_dict(self) -> dict:
        return {"factors": {k: (B.clone(), A.clone()) for k, (B, A) in self.factors.items()},
                "task_stats": self.task_stats}

    def load_state_dict(self, state: dict) -> None:
        self.factors = {k: (B.clone(), A.clone()) for k, (B, A) in state.get("factors", {}).items()}
        self.task_stats = list(state.get("task_stats", []))
