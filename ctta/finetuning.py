"""`FineTuning`: the part of a strategy that fine-tunes CLIP's own weights, composed into Finetune, LwF and VR-LwF.

It owns four decisions those strategies share and nothing else (their losses stay in the strategies):

- the trainable set: parameter-name prefixes, ``""`` = every parameter but ``logit_scale`` (ZSCL's
  ``train-mode=whole``), and whether the text tower is in it (then class features are encoded with grad);
- the optimizer: AdamW, rebuilt at every revealed task boundary as ZSCL does (Thunderbeee/ZSCL
  ``mtil/src/models/finetune.py`` builds a new optimizer per task), or kept with its moments across tasks;
- the per-task learning-rate schedule (`ctta.optim.lr_schedule`: cosine with linear warm-up as ZSCL / WiSE-FT's
  ``cosine_lr``, or constant after the warm-up);
- WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022; mlfoundations/wise-ft; ZSCL's
  continual baseline ``--wise_merge``): the zero-shot anchor snapshotted when attached, and after every task
  ``θ ← (1−α)·θ_zs + α·θ`` (`ctta.merging.interpolate_`).

The optimizer and schedule it builds are handed to the strategy's ``optimizer`` / ``scheduler`` because
`Strategy.step` is the one place that runs them; `Strategy.state_dict` therefore saves their state (the schedule's
length included, see `ctta.optim`) and this part's `state_dict` holds only what is its own: the WiSE anchor.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from ctta.checks import check_optimizer
from ctta.merging import check_alpha, interpolate_
from ctta.model import Clip
from ctta.optim import check_schedule, lr_schedule
from ctta.stream import LabelSpace


def class_prompts(space: LabelSpace) -> list[str]:
    """One training prompt per class: its first template (ZSCL and CoDyRA train with ``templates[0]``)."""
    return [space.class_templates[i][0].replace("{}", c) for i, c in enumerate(space.classnames)]


class FineTuning:
    """Trainable set, AdamW, per-task schedule and WiSE-FT anchor of a fine-tuning strategy (module docstring).

    ``params``: parameter-name prefixes to train (``""`` = all but ``logit_scale``; ``["visual."]`` = image tower).
    ``schedule``: ``"cosine"`` (decay to 0 over the task's steps) or ``"constant"``, both after ``warmup`` linear
    warm-up steps. ``reset_optimizer_per_task``: a fresh AdamW at every revealed task boundary (ZSCL; default), or
    one AdamW whose moments carry over (the schedule still restarts at ``lr`` per task). ``wise_alpha``: WiSE-FT
    interpolation with the weights seen at `attach` after every task; ``None`` = off.
    """

    def __init__(self, params: str | Iterable[str] = "", *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup: int = 0, schedule: str = "cosine",
                 reset_optimizer_per_task: bool = True, wise_alpha: float | None = None):
        check_optimizer("fine-tuning", lr, weight_decay, betas)
        betas = tuple(float(b) for b in betas)
        check_schedule(schedule, warmup)
        self.params = params if isinstance(params, str) else tuple(params)
        self.lr, self.weight_decay, self.betas = float(lr), float(weight_decay), betas
        self.warmup, self.schedule = int(warmup), schedule
        self.reset_optimizer_per_task = bool(reset_optimizer_per_task)
        self.wise_alpha = check_alpha(wise_alpha, "wise_alpha")
        self.trainable: list[nn.Parameter] = []
        self.text_trainable = False
        self.anchor: dict[str, Tensor] | None = None  # WiSE-FT's zero-shot weights (only with wise_alpha)
        self.optimizer: torch.optim.AdamW | None = None
        self.scheduler: LambdaLR | None = None

    def attach(self, model: Clip) -> tuple[torch.optim.AdamW, LambdaLR]:
        """Unfreeze the trainable set of a frozen ``model``, snapshot the WiSE anchor and build a placeholder
        optimizer and one-step schedule (a revealed task boundary rebuilds the schedule; a resumed run loads into
        the placeholder). The loop attaches before it loads a checkpoint, so the anchor is the zero-shot model;
        a checkpoint brings its own anchor anyway (`load_state_dict`). Caution: a stream that never reveals a
        boundary trains on this one-step schedule, so with ``"cosine"`` the lr is 0 after the first step (kept as
        it was; ``"constant"`` does not have the problem)."""
        self.trainable = model.unfreeze(self.params)  # refuses a selection that matches nothing
        self.text_trainable = any(p.requires_grad for p in model.text_parameters())
        self.optimizer = None
        if self.wise_alpha is not None:
            self.anchor = model.trainable_state()
        return self.begin_task(1)

    def begin_task(self, total_steps: int) -> tuple[torch.optim.AdamW, LambdaLR]:
        """The optimizer and schedule for a task of ``total_steps`` optimizer steps: a new AdamW unless it is kept
        across tasks, and always a new schedule from ``lr``."""
        if not self.trainable:
            raise RuntimeError("FineTuning.attach(model) has not been called")
        if self.optimizer is None or self.reset_optimizer_per_task:
            self.optimizer = torch.optim.AdamW(self.trainable, lr=self.lr, betas=self.betas,
                                               weight_decay=self.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, self.schedule, total_steps, self.warmup)
        return self.optimizer, self.scheduler

    def class_logits(self, model: Clip, image_features: Tensor, space: LabelSpace) -> Tensor:
        """Training logits over ``space``: class prompts (first template) through the text tower with grad when it
        trains, else the cached template-averaged head (`Clip.text_head`), as the zero-shot classifier."""
        head = model.encode_text(class_prompts(space)) if self.text_trainable else model.text_head(space)
        return model.logits(image_features, head)

    def end_task(self, model: Clip) -> None:
        """WiSE-FT after a task: interpolate with the anchor (nothing when ``wise_alpha`` is None)."""
        if self.anchor is not None:
            interpolate_(model, self.anchor, self.wise_alpha)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The WiSE anchor (the optimizer and schedule are saved by `Strategy.state_dict`)."""
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the anchor; refused, changing nothing, if it does not match this part's trainable set."""
        anchor = state.get("anchor")
        if (anchor is None) != (self.wise_alpha is None):
            raise ValueError(f"the saved fine-tuning state {'has' if anchor is not None else 'lacks'} a WiSE anchor "
                             f"but this strategy has wise_alpha={self.wise_alpha}")
        if anchor is not None:
            mine = self.anchor or {}
            bad = sorted(k for k in set(anchor) | set(mine)
                         if k not in anchor or k not in mine or anchor[k].shape != mine[k].shape)
            if bad:
                raise ValueError(f"the saved WiSE anchor does not match the trainable parameters: {bad[:5]}")
            self.anchor = {k: v.detach().clone().to(mine[k].device) for k, v in anchor.items()}
