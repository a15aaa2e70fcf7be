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
  micro-CLIP v4: 57.7; v3: ~25) would otherwise distil through a flatter softmax (at T = 2 and scale 25, nearly
  uniform over similar texts) than the recipe was tuned for. ``None`` uses the model's scale. The cross-entropy
  keeps the model's scale.
- ``wise_alpha`` (off by default, as in ZSCL's LwF) adds WiSE-FT interpolation with the zero-shot weights after
  every task (`ctta.merging.interpolate_`).

Composition: `ctta.finetuning.FineTuning` owns the trainable set, AdamW, the per-task schedule (``schedule``,
``reset_optimizer_per_task``) and the WiSE anchor; `ctta.distillation.Distillation` owns the teacher and the two
distillation terms. `LwF` is a `Finetune` (its step, lifecycle and state) that adds the teacher and the terms;
`ctta.strategies.vr_lwf.VRLwF` is an `LwF` that differs only in the reference texts (`reference_features`).
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from ctta.distillation import Distillation, encode_frozen
from ctta.finetuning import class_prompts
from ctta.model import Clip
from ctta.stream import LabelSpace, Task
from ctta.strategies.finetune import Finetune


class LwF(Finetune):
    """LwF with the previous-task model as teacher, on the current task's class logits (see module docstring).
    `Finetune` owns the fine-tuning lifecycle and state; this class adds the teacher and the distillation terms."""

    teacher_per_space = True  # the reference texts are the training classes' prompts: a teacher serves one space

    def __init__(self, params: str | Iterable[str] = "", *, lr: float = 1e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup: int = 100, schedule: str = "cosine",
                 reset_optimizer_per_task: bool = True, label_smoothing: float = 0.2, temperature: float = 2.0,
                 image_loss: float = 1.0, text_loss: float = 1.0, distill_scale: float | None = 100.0,
                 wise_alpha: float | None = None, batch_size: int = 64, epochs: int = 1,
                 iterations: int | None = 1000, grad_clip: float | None = None, amp: bool = False):
        super().__init__(params, lr=lr, weight_decay=weight_decay, betas=betas, warmup=warmup, schedule=schedule,
                         reset_optimizer_per_task=reset_optimizer_per_task, label_smoothing=label_smoothing,
                         batch_size=batch_size, epochs=epochs, iterations=iterations, grad_clip=grad_clip, amp=amp,
                         wise_alpha=wise_alpha)
        self.distillation = Distillation(temperature, image_loss, text_loss, distill_scale)
        self._ref_space: LabelSpace | None = None  # the label space the teacher's reference texts were built for
        self.reference_encodes = 0  # how many times reference text features were computed (once per task)

    def begin_task(self, task: Task, space: LabelSpace) -> None:
        super().begin_task(task, space)
        self._freeze_teacher(space)

    def reference_features(self, model: Clip, space: LabelSpace) -> Tensor:
        """The reference texts' features under ``model`` (no grad): the current classes' prompts."""
        return encode_frozen(model, model.encode_text, class_prompts(space))

    def _freeze_teacher(self, space: LabelSpace) -> None:
        """Teacher = the model now (before any step of this task): image tower copy + its reference text features."""
        m = self._model()
        self.distillation.freeze_teacher(m, self.reference_features(m, space))
        self._ref_space = space
        self.reference_encodes += 1

    def _before_step(self, space: LabelSpace) -> None:
        if not self.distillation.ready:  # hidden first boundary: the model as first seen is the teacher
            self._freeze_teacher(space)
        elif self.teacher_per_space and space != self._ref_space:
            raise ValueError(f"{type(self).__name__} teacher was built for label space {self._ref_space!r}, learn() "
                             f"got {space!r}; a new label space needs a revealed task boundary (begin_task)")

    def _regularise(self, ce: Tensor, model: Clip, images: Tensor, image_features: Tensor
                    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.distillation.add_to(ce, model, images, image_features)

    def end_task(self, task: Task, space: LabelSpace) -> None:
        super().end_task(task, space)
        self.distillation.release()  # free the copy; rebuilt at the next task
        self._ref_space = None
