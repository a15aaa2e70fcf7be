"""LwF for CLIP: fine-tuning plus distillation from the model before the current task, on current-task logits.

Paper: Li & Hoiem, "Learning without Forgetting" (ECCV 2016). The CLIP form follows ZSCL's LwF baseline (Zheng et al.,
"Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models", ICCV 2023; reference
code Thunderbeee/ZSCL ``mtil/scripts/lwf.sh`` running ``mtil/src/models/finetune.py`` with ``--method ZSCL
--ref-dataset <current task> --ref-model <previous checkpoint>``):

- teacher = the model before the current task (zero-shot CLIP for the first task), frozen;
- reference texts = the current task's class prompts, encoded by the TEACHER; its features are used on BOTH sides:
  ``ℓ_s = scale·f_student(x)·g_teacher(prompts)ᵀ``, ``ℓ_t = scale·f_teacher(x)·g_teacher(prompts)ᵀ`` (so the student's
  text tower gets no distillation gradient, only the cross-entropy one);
- ``L = CE(ℓ_student-head, y; label smoothing 0.2) + w_img·D(ℓ_t, ℓ_s) + w_txt·D(ℓ_tᵀ, ℓ_sᵀ)`` with
  ``D = ctta.losses.distillation`` (T = 2, T² scaling), image→text and text→image, weight 1 each;
- whole model trained except ``logit_scale``; AdamW (wd 0), cosine schedule with 100 warm-up steps, 1000 iterations
  per task, lr 1e-5 (5e-5 for some MTIL datasets), batch 64.

Deliberate deviations (all exact-or-cheaper, none changes the objective's expectation):
- "Current-task logits" are the logits the task trains: the training label space (the task's own classes in
  MTIL-style streams, all seen classes in a class-incremental one, which is what old-task heads mean in LwF).
- ZSCL draws the reference images from a second, independently shuffled loader over the same training set with the
  eval transform. Our runner hands the strategy un-augmented images, so we distil on the training batch itself and
  reuse the student's image features of the cross-entropy term (one image forward less per step).
- The teacher's text features are constant during a task, so they are computed once in `begin_task` (ZSCL re-encodes
  them every step); only the teacher's IMAGE tower is kept, as a frozen copy (for ViT-B/16: +86 M parameters, ~0.35 GB
  in fp32; no copy at all when the image tower is not trained). The live model equals the teacher at `begin_task`.
- ZSCL runs its LwF and LwF-VR baselines with ``--fair``: each task's training set is expanded with a 100-class
  ImageNet subset (50 images a class, their class names added to the head), to match ZSCL's ImageNet reference
  data. That is a property of the benchmark, not the method; we train on the task's data only.
- ``distill_scale=100.0`` (default) pins the distillation logits' scale at the value ZSCL trains with: its code
  reads CLIP's ``logit_scale.exp()``, 100 for the OpenAI weights. A model with a smaller learned scale (the
  micro-CLIP: ~25) would otherwise distil through a much flatter softmax (at T = 2, nearly uniform over similar
  texts) than the recipe was tuned for. ``None`` uses the model's scale. The cross-entropy keeps the model's scale.
- ``wise_alpha`` (off by default, as in ZSCL's LwF) adds WiSE-FT interpolation with the zero-shot weights after
  every task (`ctta.merging.interpolate_`).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.losses import distillation
from ctta.merging import check_alpha, interpolate_
from ctta.model import Clip
from ctta.strategies.finetune import build_optimizer, class_features, class_prompts, setup_finetuning
from ctta.stream import LabelSpace, Task
from ctta.strategy import Strategy

_CHUNK = 256  # reference texts per no-grad text forward


class FrozenImageTower:
    """The model's image tower as it is now, frozen: a deep copy of ``model.net.visual`` when the strategy trains any
    image parameter (it will drift), otherwise the live tower itself (it cannot). Not an ``nn.Module`` attribute of
    the strategy on purpose: it is rebuilt at each task and never saved."""

    def __init__(self, model: Clip):
        self.model = model
        visual = model.net.visual
        self.tower: nn.Module | None = None
        if any(p.requires_grad for p in visual.parameters()):
            self.tower = copy.deepcopy(visual).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """L2-normalised teacher image features ``[B, D]`` (same normalisation as `Clip.encode_image`)."""
        tower = self.tower if self.tower is not None else self.model.net.visual
        return F.normalize(tower(self.model.normalize(images)).float(), dim=-1)


@torch.no_grad()
def encode_frozen(model: Clip, encode, items, chunk: int = _CHUNK) -> Tensor:
    """Text features of ``items`` (prompts or token rows) with the model in eval mode and no grad, in chunks."""
    was = model.net.training
    model.net.eval()
    out = torch.cat([encode(items[i:i + chunk]) for i in range(0, len(items), chunk)])
    model.net.train(was)
    return out


def lwf_terms(model: Clip, student_image: Tensor, teacher_image: Tensor, teacher_text: Tensor,
              T: float, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """ZSCL's two distillation terms with the teacher's text features on both sides: image→text (rows = images)
    and text→image (rows = texts, the transposed logits). Logits are ``scale · f·gᵀ`` (``None``: the model's
    ``exp(logit_scale)``, which is what ZSCL reads: 100 for the OpenAI weights)."""
    def logits(image: Tensor) -> Tensor:
        return model.logits(image, teacher_text) if scale is None else scale * image @ teacher_text.t()
    s = logits(student_image)
    with torch.no_grad():
        t = logits(teacher_image)
    return distillation(t, s, T), distillation(t.t(), s.t(), T)


def configure_distillation(s: Strategy, temperature: float, image_loss: float, text_loss: float,
                           scale: float | None) -> None:
    """Check and set the distillation settings shared by LwF and VR-LwF on strategy ``s``."""
    if temperature <= 0 or image_loss < 0 or text_loss < 0 or (scale is not None and scale <= 0):
        raise ValueError(f"need temperature > 0, non-negative loss weights and a positive distill_scale, got "
                         f"T={temperature}, image_loss={image_loss}, text_loss={text_loss}, distill_scale={scale}")
    s.temperature, s.image_loss, s.text_loss = float(temperature), float(image_loss), float(text_loss)
    s.distill_scale = None if scale is None else float(scale)


def distill_learn(s: Strategy, images: Tensor, labels: Tensor, space: LabelSpace, teacher_text: Tensor
                  ) -> dict[str, float]:
    """One step of CE (label smoothing) + ZSCL's two distillation terms against ``teacher_text`` (LwF: the current
    classes' prompts; VR-LwF: the replayed vocabulary), both encoded by the task's teacher."""
    m = s._model()
    m.train()
    with s.autocast():
        img = m.encode_image(images)
        ce = F.cross_entropy(m.logits(img, class_features(m, space, s._text_trainable)).float(), labels,
                             label_smoothing=s.label_smoothing)
        l_img, l_txt = lwf_terms(m, img, s.teacher(images), teacher_text, s.temperature, s.distill_scale)
        loss = ce + s.image_loss * l_img + s.text_loss * l_txt
    s.step(loss)
    m.eval()
    return {"loss": float(loss.detach()), "ce": float(ce.detach()), "distill_image": float(l_img.detach()),
            "distill_text": float(l_txt.detach())}


class LwF(Strategy):
    """LwF with the previous-task model as teacher, on the current task's class logits (see module docstring)."""

    def __init__(self, params: str | Iterable[str] = "", *, lr: float = 1e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup: int = 100, label_smoothing: float = 0.2,
                 temperature: float = 2.0, image_loss: float = 1.0, text_loss: float = 1.0,
                 distill_scale: float | None = 100.0, wise_alpha: float | None = None, batch_size: int = 64,
                 epochs: int = 1, iterations: int | None = 1000, grad_clip: float | None = None, amp: bool = False):
        super().__init__(batch_size=batch_size, epochs=epochs, iterations=iterations, grad_clip=grad_clip, amp=amp)
        configure_distillation(self, temperature, image_loss, text_loss, distill_scale)
        self.params = params if isinstance(params, str) else tuple(params)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup, self.label_smoothing = warmup, label_smoothing
        self.wise_alpha = check_alpha(wise_alpha)
        self._trainable: list[nn.Parameter] = []
        self._anchor: dict[str, Tensor] | None = None
        self.teacher: FrozenImageTower | None = None
        self._ref: Tensor | None = None  # teacher text features of the current task's class prompts
        self._ref_space: LabelSpace | None = None
        self.reference_encodes = 0  # how many times reference text features were computed (once per task)

    def setup(self, model: Clip) -> None:
        super().setup(model)
        setup_finetuning(self, model)

    def begin_task(self, task: Task, space: LabelSpace) -> None:
        build_optimizer(self, self.task_steps(task))
        self._freeze_teacher(space)

    def _freeze_teacher(self, space: LabelSpace) -> None:
        """Teacher = the model now (before any step of this task): image tower copy + cached text features."""
        m = self._model()
        self.teacher = FrozenImageTower(m)
        self._ref = encode_frozen(m, m.encode_text, class_prompts(space))
        self._ref_space = space
        self.reference_encodes += 1

    def learn(self, images: Tensor, labels: Tensor, space: LabelSpace) -> dict[str, float]:
        if self.teacher is None:  # hidden first boundary: the model as first seen is the teacher
            self._freeze_teacher(space)
        elif space != self._ref_space:
            raise ValueError(f"LwF teacher was built for label space {self._ref_space!r}, learn() got {space!r}; "
                             "a new label space needs a revealed task boundary (begin_task)")
        return distill_learn(self, images, labels, space, self._ref)

    def end_task(self, task: Task, space: LabelSpace) -> None:
        if self._anchor is not None:
            interpolate_(self._model(), self._anchor, self.wise_alpha)
        self.teacher, self._ref, self._ref_space = None, None, None  # free the copy; rebuilt at the next task
