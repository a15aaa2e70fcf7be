"""`Distillation`: ZSCL's two-way distillation from a frozen teacher, composed into LwF and VR-LwF.

Reference: Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language
Models" (ICCV 2023), code Thunderbeee/ZSCL ``mtil/src/models/finetune.py`` and ``helpers.py::distillation``, whose
LwF and LwF-VR baselines share this term and differ only in the reference texts (the current classes' prompts, or a
replayed vocabulary):

- the teacher is the model as it is at the task's start, frozen: a copy of its image tower (`FrozenImageTower`)
  and the reference texts' features, encoded once (they are constant during the task; ZSCL re-encodes every step);
- the teacher's text features are used on BOTH sides, ``ℓ_s = scale·f_student(x)·g_teacher(T)ᵀ`` and
  ``ℓ_t = scale·f_teacher(x)·g_teacher(T)ᵀ``, so the student's text tower gets no distillation gradient;
- ``L = w_img·D(ℓ_t, ℓ_s) + w_txt·D(ℓ_tᵀ, ℓ_sᵀ)`` with ``D = ctta.losses.distillation`` (T = 2, T² scaling):
  image→text (rows = images) and text→image (rows = texts), weight 1 each.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.checks import check_number
from ctta.losses import distillation
from ctta.model import Clip

_CHUNK = 256  # reference texts per no-grad text forward


class FrozenImageTower:
    """The model's image tower as it is now, frozen: a deep copy of ``model.net.visual`` when any image parameter
    trains (it will drift), otherwise the live tower itself (it cannot). Rebuilt at each task and never saved."""

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
def encode_frozen(model: Clip, encode: Callable[[Sequence], Tensor], items: Sequence, chunk: int = _CHUNK) -> Tensor:
    """Text features of ``items`` (prompts or token rows) with the model in eval mode and no grad, in chunks."""
    with model.eval_mode():
        return torch.cat([encode(items[i:i + chunk]) for i in range(0, len(items), chunk)])


def lwf_terms(model: Clip, student_image: Tensor, teacher_image: Tensor, teacher_text: Tensor,
              T: float, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """ZSCL's two distillation terms with the teacher's text features on both sides: image→text (rows = images)
    and text→image (rows = texts, the transposed logits). Logits are ``scale · f·gᵀ`` (``None``: `Clip.logits`, the
    model's ``exp(logit_scale)``, which is what ZSCL reads: 100 for the OpenAI weights). Pure: writes nothing."""
    def logits(image: Tensor) -> Tensor:
        return model.logits(image, teacher_text) if scale is None else scale * image @ teacher_text.t()
    s = logits(student_image)
    with torch.no_grad():
        t = logits(teacher_image)
    return distillation(t, s, T), distillation(t.t(), s.t(), T)


class Distillation:
    """The distillation term of LwF and VR-LwF (module docstring). ``temperature`` T; ``image_loss`` /
    ``text_loss``: weights of the image→text and text→image terms; ``scale``: the distillation logits' scale
    (``None`` = the model's ``exp(logit_scale)``)."""

    def __init__(self, temperature: float = 2.0, image_loss: float = 1.0, text_loss: float = 1.0,
                 scale: float | None = 100.0):
        check_number("distillation", "temperature", temperature, low_open=True)
        check_number("distillation", "image_loss", image_loss)
        check_number("distillation", "text_loss", text_loss)
        check_number("distillation", "distill_scale", scale, low_open=True, none_ok=True)
        self.temperature, self.image_loss, self.text_loss = float(temperature), float(image_loss), float(text_loss)
        self.scale = None if scale is None else float(scale)
        self.teacher: FrozenImageTower | None = None
        self.text: Tensor | None = None  # the teacher's features of the reference texts, this task

    @property
    def ready(self) -> bool:
        """Is a teacher frozen for the current task?"""
        return self.teacher is not None

    def freeze_teacher(self, model: Clip, text_features: Tensor) -> None:
        """The teacher for the task about to train: ``model`` as it is now (image-tower copy) and ``text_features``
        of the reference texts, encoded by this same model (`encode_frozen`)."""
        self.teacher = FrozenImageTower(model)
        self.text = text_features

    def release(self) -> None:
        """Free the teacher at the end of a task (the image-tower copy is the size of the tower)."""
        self.teacher, self.text = None, None

    def add_to(self, loss: Tensor, model: Clip, images: Tensor, student_image: Tensor
               ) -> tuple[Tensor, dict[str, Tensor]]:
        """``loss + w_img·L_img + w_txt·L_txt`` on a batch whose student image features are ``student_image`` (the
        cross-entropy's own, so the batch is encoded once), and the two terms (``distill_image``, ``distill_text``).
        Summed left to right as ZSCL does (``ce + image term + text term``): float addition is not associative."""
        if self.teacher is None:
            raise RuntimeError("no teacher: call freeze_teacher() at the start of the task")
        l_img, l_txt = lwf_terms(model, student_image, self.teacher(images), self.text, self.temperature, self.scale)
        return loss + self.image_loss * l_img + self.text_loss * l_txt, {"distill_image": l_img, "distill_text": l_txt}
