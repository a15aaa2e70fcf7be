"""TENT: fully test-time adaptation by entropy minimisation.

Paper: Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully Test-Time Adaptation by Entropy Minimization",
ICLR 2021. Reference code: DequanWang/tent (``tent.py``, ``cfgs/tent.yaml``, commit fc5705f / 7d236b4).

Per batch: forward, loss = mean over the batch of the softmax entropy ``H(p) = -Σ_c p_c log p_c`` of each
prediction, one optimizer step on the normalisation layers' affine parameters (scale and shift) only; the
returned prediction is the one of that forward pass, made *before* the update (the reference's
``forward_and_adapt``). Reference defaults (CIFAR-10-C): Adam, lr 1e-3, betas (0.9, 0.999), weight decay 0,
1 step per batch, no reset between batches (``episodic=False``).

The adapted parameters are the affine parameters of the normalisation layers of the **image tower**; the text tower
stays frozen, so the class text head is computed once and cached.

- **BatchNorm tower** (open_clip ``ModifiedResNet``, CLIP RN50/RN101: the reference's setting). The reference's
  ``configure_model`` puts the model in train mode, sets ``track_running_stats=False`` and drops the running
  statistics, so every forward, adapting or predicting, normalises with the statistics of its own batch; its
  ``collect_params`` adapts the BatchNorm scales and shifts only. Here `Clip.batch_statistics` switches the image
  tower's BatchNorms to batch statistics in every mode (`ctta.batchnorm`), which is the same function, with one
  difference of form: the running buffers are kept, unused and unchanged, instead of being deleted, so the model's
  ``state_dict`` keys stay those of its checkpoint and a reset (`ctta.OnlineAdapter`) restores the BatchNorm
  affine parameters (with their untouched running buffers, `Clip.trainable_state`) and the optimizer state.
  ``predict`` therefore depends on the batch it is given, as the reference's does (it stays free of side effects);
  it needs batches of at least 2 images when a BatchNorm sees a 1×1 feature map (a clear error says so;
  `min_batch` tells callers, and ``ctta serve`` pads a lone request with earlier images, predicting only).
  ``Clip.freeze`` (a later strategy's ``setup``) switches the batch statistics off again.
- **ViT tower** (deliberate deviation: a ViT has no BatchNorm): the LayerNorms' affine parameters. LayerNorm
  normalises per token, so there are no batch statistics to re-estimate and batch size 1 works.
Also:
- logits are CLIP's ``exp(logit_scale) · cos(image, class text)`` over the label space given to ``adapt``.
- resetting (episodic evaluation, or resets at domain shifts) is the caller's policy: `ctta.OnlineAdapter` and
  `ctta.loop.run_samples` restore the snapshot of these parameters and the Adam state taken after ``setup``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ctta.checks import check_optimizer
from ctta.model import Clip
from ctta.stream import LabelSpace
from ctta.strategy import Strategy


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-row entropy (nats) of ``softmax(logits)``: ``[B, C] -> [B]``."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def norm_parameters(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the affine weights and biases of every LayerNorm / BatchNorm / GroupNorm below."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            for pn, p in m.named_parameters(recurse=False):
                out.append((f"{prefix}{name}.{pn}" if name else f"{prefix}{pn}", p))
    return out


class Tent(Strategy):
    """Entropy minimisation on the image tower's normalisation parameters (see the module docstring)."""

    learns = False

    def __init__(self, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 steps: int = 1, eval_batch_size: int = 256, grad_clip: float | None = None, amp: bool = False):
        super().__init__(eval_batch_size=eval_batch_size, grad_clip=grad_clip, amp=amp)
        if steps < 1:
            raise ValueError(f"TENT needs at least one step per batch, got steps={steps}")
        check_optimizer("TENT", lr, weight_decay, betas)
        self.lr, self.betas, self.weight_decay, self.steps_per_batch = lr, tuple(betas), weight_decay, steps

    def setup(self, model: Clip) -> None:
        super().setup(model)
        named = norm_parameters(model.net.visual, "visual.")
        if not named:
            raise ValueError("TENT found no normalisation layers in the image tower")
        for _, p in named:
            p.requires_grad_(True)
        # BatchNorm towers: normalise with each batch's statistics in adapt and predict alike (reference TENT)
        self.batch_norms = model.batch_statistics(True, "visual.")
        self.param_names = [n for n, _ in named]
        self.optimizer = torch.optim.Adam([p for _, p in named], lr=self.lr, betas=self.betas,
                                          weight_decay=self.weight_decay)

    @property
    def min_batch(self) -> int:
        """2 on a BatchNorm tower (``batch_norms`` switched to batch statistics by ``setup``), else 1.

        The reference normalises every forward with its own batch's statistics and only ever sees large batches
        (64 or 200 images); one image has no batch statistics where a BatchNorm sees a 1x1 feature map (the last
        stage of the micro-CLIP's ModifiedResNet), so `ctta.batchnorm` refuses it, and where the map is larger the
        "batch" statistics would be one image's own spatial ones, a regime TENT was not designed for. A ViT tower
        adapts LayerNorms, which normalise per token: no batch statistics, any batch size."""
        return 2 if getattr(self, "batch_norms", None) else 1

    def loss(self, logits: Tensor) -> Tensor:
        """Mean softmax entropy of the batch (the reference's ``softmax_entropy(outputs).mean(0)``)."""
        return softmax_entropy(logits.float()).mean()

    @torch.enable_grad()  # adapt may be called under no_grad by a serving stack
    def adapt(self, images: Tensor, space: LabelSpace) -> Tensor:
        m = self._model()
        head = m.text_head(space)  # frozen text tower: cached
        for _ in range(self.steps_per_batch):
            with self.autocast():
                logits = m.logits(m.encode_image(images), head)
            self.step(self.loss(logits))
        return logits.detach()
