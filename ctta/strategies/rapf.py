"""RAPF: Adaptive Representation Adjustment and Parameter Fusion.

Paper: Huang et al., "Class-Incremental Learning with CLIP: Adaptive Representation Adjustment and Parameter
Fusion", ECCV 2024. Reference code: linlany/RAPF (``main.py``, ``continual_clip/models.py``, ``configs/class/*.yaml``,
commit 81d41dfb). Algorithm as in design/methods.md §3:

- both CLIP towers frozen; one linear adapter ``nn.Linear(D, D, bias=False)`` (PyTorch's default kaiming-uniform
  init, *not* identity) on the raw pooled image feature; logits ``s · normalize(adapter(f)) · tᵀ`` with ``t`` the
  normalised text features of every class of the training/evaluation space;
- after each task: per-class mean and covariance (+1e-4·I) of the frozen, pre-adapter, un-normalised features;
- from the second task on, every batch is extended with Gaussian pseudo-features of ``replay_classes`` old classes
  (taken cyclically from a list reshuffled every epoch), ``10·β`` each, trained with the same cross-entropy; and for
  every "hard pair" (old class k, new class j with ``||t_k − t_j|| < threshold``) ``20·β`` pseudo-features of k enter
  the hinge ``relu(−<h, t_k> + <h, t_j> + 0.1)``;
- after each task t ≥ 1, decomposed parameter fusion of the adapter (`fuse_weights`).

The frozen encoder and the eval transform make image features deterministic, so they are computed once per image
and reused across the 15 epochs, the statistics pass and every evaluation (`ctta.cache.FeatureCache`).

Deliberate choices and deviations (all exact-result neutral unless said):
- ``logit_scale=100.0`` (default) pins the softmax temperature of training at the value the reference trains with:
  its code reads CLIP's ``self.logit_scale.exp()``, which is 100 for the OpenAI weights it uses (methods.md: "hard-
  coded 100"). A model with a smaller learned scale (the micro-CLIP: ~15-30) would otherwise train RAPF at another
  temperature than the recipe was tuned for. ``None`` uses the model's ``exp(logit_scale)``. Argmax predictions do
  not depend on it.
- Covariances and their Cholesky factors are computed in float64 (the reference: float32 Cholesky of the fp32 cov)
  and stored in float32; the sampling distribution is the same, the factorisation just cannot fail on round-off.
- Cholesky factors of the old classes are computed once per task (the reference re-factorises every batch).
- MultiStepLR milestones are given in epochs, as in the reference, and converted to optimizer steps (our scheduler
  steps per batch).
- Per-class statistics are keyed by class name; a class seen again later (domain-incremental streams) has its
  statistics replaced. Old classes absent from the current training space (scope "own") are not replayed.
- A class with a single training image gets covariance ``ridge·I`` (``torch.cov`` would be NaN).
- ``replay_classes=None`` replays ``ceil(#old / steps per epoch)`` old classes per batch, so that every epoch visits
  every old class at least once — the intent the reference states in ``main.py`` ("Ensure an epoch traverses all
  classes at least once"), which its hard-coded 2/4/5/10 per batch meets on its datasets (e.g. CIFAR-100: 50
  batches × 2 ≥ 90 old classes) but a small dataset does not (the built-in world: 5 batches × 2 = 10 of 90).
- Hard pairs use the label space's template-averaged text head (one template = the reference's single prompt).
- Under torchrun (the reference is single-GPU): statistics are reduced from every rank's shard (equal to one
  process); the replayed pseudo-features are drawn identically on every rank and enter each rank's loss, so replay
  weighs a little more against the real samples than in one process with the same global batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctta.cache import FeatureCache, encode_raw
from ctta.checks import check_logit_scale, check_number, check_optimizer
from ctta.data import check_labels, iter_batches
from ctta.model import Clip
from ctta.strategy import Strategy
from ctta.stream import LabelSpace, Task


# --------------------------------------------------------------------------------------------- pure functions
def fuse_weights(w_old: Tensor, w_new: Tensor, bias: float) -> Tensor:
    """Decomposed parameter fusion (reference ``mix_matrix``): express both weights in the left-singular basis
    ``U`` of ``w_old`` (``P = Uᵀ W``), keep each coordinate's new value in proportion to its relative change,
    ``M = min(1, |P_new − P_old| / max|P_new − P_old| + bias)``, and return ``U (M ⊙ P_new + (1 − M) ⊙ P_old)``."""
    if w_old.shape != w_new.shape or w_old.dim() != 2:
        raise ValueError(f"fusion needs two matrices of one shape, got {tuple(w_old.shape)} and {tuple(w_new.shape)}")
    U = torch.linalg.svd(w_old.double(), full_matrices=True)[0]
    p_old, p_new = U.T @ w_old.double(), U.T @ w_new.double()  # U^T W_old = diag(S) Vh
    d = (p_new - p_old).abs()
    if d.max() == 0:  # nothing changed (the reference would divide 0 by 0)
        return w_new.clone()
    m = (d / d.max() + bias).clamp(max=1.0)
    return (U @ (m * p_new + (1 - m) * p_old)).to(w_new.dtype)


def hard_pairs(text_old: Tensor, text_new: Tensor, threshold: float) -> Tensor:
    """``[P, 2]`` (old index, new index) pairs whose L2-normalised text features are closer than ``threshold``
    in Euclidean distance (old-major order, as ``torch.nonzero`` on the reference's [old, new] distance matrix)."""
    dist = torch.cdist(F.normalize(text_old.float(), dim=-1), F.normalize(text_new.float(), dim=-1))
    return torch.nonzero(dist < threshold)


def hinge_loss(h: Tensor, t_pos: Tensor, t_neg: Tensor, margin: float = 0.1) -> Tensor:
    """Representation adjustment: mean of ``relu(−<h, t_pos> + <h, t_neg> + margin)`` over rows (``h`` are
    normalised adapted pseudo-features of an old class, ``t_pos`` its text feature, ``t_neg`` the text feature of
    the new class it is confused with). The reference hard-codes ``margin = 0.1`` (its cfg ``margin`` is unused)."""
    return F.relu(-(h * t_pos).sum(-1) + (h * t_neg).sum(-1) + margin).mean()


def class_moments(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, Σx, Σxxᵀ)`` of one class's features ``[N, D]`` in float64: sums, so that ranks' shards add up."""
    x = features.double()
    return torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), x.sum(0), x.T @ x


def statistics_from_moments(count: Tensor, total: Tensor, outer: Tensor, ridge: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``+ ridge·I`` from `class_moments` (a single sample: ``ridge·I``)."""
    n = float(count)
    mean = total / n
    eye = torch.eye(mean.shape[0], dtype=mean.dtype, device=mean.device)
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1) if n > 1 else torch.zeros_like(eye)
    return mean, (cov + cov.T) / 2 + ridge * eye


def class_statistics(features: Tensor, ridge: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``+ ridge·I`` ``[D, D]`` of one class's features ``[N, D]`` (float64)."""
    return statistics_from_moments(*class_moments(features), ridge=ridge)


def shrink_covariance(cov: Tensor) -> Tensor:
    """The reference's ``shrink_cov``: add the mean diagonal to the diagonal and the mean non-zero off-diagonal
    entry to every off-diagonal entry."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    off = cov * (1 - eye)
    nonzero = off != 0
    off_mean = off.sum() / nonzero.sum().clamp(min=1)
    return cov + cov.diagonal().mean() * eye + off_mean * (1 - eye)


def sample_features(mean: Tensor, chol: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` samples of ``N(mean, L Lᵀ)``: ``mean + ε Lᵀ`` with ``ε ~ N(0, I)``."""
    eps = torch.randn(n, mean.shape[-1], generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + eps @ chol.T


# --------------------------------------------------------------------------------------------- strategy
class RAPF(Strategy):
    """RAPF with the CIFAR-100 B0-Inc10 defaults of the reference configs (see ``configs/strategy/rapf*.yaml``)."""

    def __init__(self, *, lr: float = 1e-3, weight_decay: float = 0.0, epochs: int = 15,
                 milestones: Sequence[int] = (4, 10), gamma: float = 0.1, batch_size: int = 100, beta: float = 2.0,
                 threshold: float = 0.55, shrinkage: bool = False, mix_bias: float = 0.6, replay_classes: int | None = 2,
                 margin: float = 0.1, ridge: float = 1e-4, templates: Sequence[str] | None = None,
                 logit_scale: float | None = 100.0, cache: bool = True, cache_size: int | None = None,
                 eval_batch_size: int = 256):
        super().__init__(batch_size=batch_size, epochs=epochs, eval_batch_size=eval_batch_size)
        if replay_classes is not None and replay_classes < 0:
            raise ValueError(f"RAPF: replay_classes must be >= 0 or null, got {replay_classes}")
        check_optimizer("RAPF", lr, weight_decay)
        for name, value, low_open in (("gamma", gamma, True), ("beta", beta, True), ("threshold", threshold, False),
                                      ("margin", margin, False), ("ridge", ridge, True)):
            check_number("RAPF", name, value, low_open=low_open)
        check_number("RAPF", "mix_bias", mix_bias, high=1.0)
        check_logit_scale("RAPF", logit_scale)
        self.lr, self.weight_decay, self.milestones, self.gamma = lr, weight_decay, tuple(milestones), gamma
        self.beta, self.threshold, self.shrinkage, self.mix_bias = beta, threshold, shrinkage, mix_bias
        self.replay_classes, self.margin, self.ridge = replay_classes, margin, ridge
        self.templates = tuple(templates) if templates is not None else None
        self.scale = logit_scale
        self.cache = FeatureCache(cache_size) if cache else None
        self.adapter: nn.Linear | None = None
        self.stats: dict[str, tuple[Tensor, Tensor]] = {}  # class name -> (mean, covariance), float32
        self.tasks_done = 0
        self._old_weight: Tensor | None = None
        self._space: LabelSpace | None = None

    # ----------------------------------------------------------------------------------------- features
    def image_features(self, images: Tensor) -> Tensor:
        """Frozen, pre-adapter, un-normalised image features (cached when ``cache=True``)."""
        m = self._model()
        return self.cache.encode(m, images) if self.cache is not None else encode_raw(m, images)

    def _text(self, space: LabelSpace) -> Tensor:
        m = self._model()
        return m.text_head(space.with_templates(self.templates) if self.templates else space)

    def _scale(self) -> Tensor | float:
        return self.scale if self.scale is not None else self._model().logit_scale.detach()

    def _logits(self, h: Tensor, text: Tensor) -> Tensor:
        return self._scale() * F.normalize(h, dim=-1) @ text.T

    # ----------------------------------------------------------------------------------------- lifecycle
    def setup(self, model: Clip) -> None:
        super().setup(model)
        dim = encode_raw(model, torch.zeros(1, 3, model.image_size, model.image_size)).shape[1]
        self.adapter = nn.Linear(dim, dim, bias=False, device=model.device)  # default init, as the reference
        self._build_optimizer(1)

    def _build_optimizer(self, steps_per_epoch: int) -> None:
        self.optimizer = torch.optim.Adam(self.adapter.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, [m * steps_per_epoch for m in self.milestones], gamma=self.gamma)

    def begin_task(self, task: Task, space: LabelSpace) -> None:
        n = len(task.train) if task.train is not None else 0
        self._steps_per_epoch = max(1, -(-n // self.batch_size))
        self._build_optimizer(self._steps_per_epoch)  # fresh Adam + schedule per task, as the reference
        self._batch, self._space, self._head = 0, space, self._text(space)
        self._old_weight = self.adapter.weight.detach().clone() if self.tasks_done > 0 else None
        new = set(task.space.classnames)
        known = set(space.classnames)
        old = [c for c in self.stats if c not in new and c in known]
        self._old_names = old
        self._old_labels = torch.tensor([space.index(c) for c in old], dtype=torch.long, device=self._head.device)
        self._means = torch.stack([self.stats[c][0] for c in old]) if old else None
        covs = [self.stats[c][1].double() for c in old]
        self._chols = torch.stack([torch.linalg.cholesky(shrink_covariance(c) if self.shrinkage else c).float()
                                   for c in covs]) if old else None
        new_labels = torch.arange(len(task.space), device=self._head.device) + space.locate(task.space).start
        pairs = hard_pairs(self._head[self._old_labels], self._head[new_labels], self.threshold) if old else \
            torch.empty(0, 2, dtype=torch.long)
        self._pairs = pairs.to(self._head.device)  # (position in old list, position in new list)
        self._pair_new_labels = new_labels[self._pairs[:, 1]] if len(pairs) else None
        self._order: Tensor | None = None

    def _pseudo(self, which: Tensor, per: int) -> Tensor:
        """``per`` pseudo-features for each entry of ``which`` (positions in the old-class list), grouped."""
        out = torch.empty(len(which) * per, self._means.shape[1], device=self._means.device)
        for k in which.unique().tolist():
            slots = (which == k).nonzero().flatten()
            rows = (slots[:, None] * per + torch.arange(per, device=slots.device)).flatten()
            out[rows] = sample_features(self._means[k], self._chols[k], len(rows))
        return out

    def learn(self, images: Tensor, labels: Tensor, space: LabelSpace) -> dict[str, float]:
        if self._space is None or space != self._space:
            raise RuntimeError("RAPF needs revealed task boundaries: begin_task was not called for this label space")
        check_labels(labels, len(images), len(space))
        f = self.image_features(images)
        y, n_ce = labels.to(f.device), len(labels)
        parts, n_old = [f], len(self._old_names)
        k = self.replay_classes if self.replay_classes is not None else -(-n_old // self._steps_per_epoch)
        if n_old and k:
            i = self._batch % self._steps_per_epoch
            if i == 0 or self._order is None:  # the reference reshuffles the old classes every epoch
                self._order = torch.randperm(n_old).to(f.device)
            pos = (i * k + torch.arange(k, device=f.device)) % n_old
            which = self._order[pos]
            per = int(10 * self.beta)
            parts.append(self._pseudo(which, per))
            y = torch.cat([y, self._old_labels[which].repeat_interleave(per)])
            n_ce += len(which) * per
        n_edge = int(20 * self.beta) if len(self._pairs) else 0
        if n_edge:
            parts.append(self._pseudo(self._pairs[:, 0], n_edge))
        self._batch += 1
        h = F.normalize(self.adapter(torch.cat(parts)), dim=-1)
        loss_ce = F.cross_entropy(self._scale() * h[:n_ce] @ self._head.T, y)
        loss_hinge = torch.zeros((), device=f.device)
        if n_edge:
            he = h[n_ce:]
            t_pos = self._head[self._old_labels[self._pairs[:, 0]]].repeat_interleave(n_edge, 0)
            t_neg = self._head[self._pair_new_labels].repeat_interleave(n_edge, 0)
            loss_hinge = hinge_loss(he, t_pos, t_neg, self.margin)
        loss = loss_ce + loss_hinge
        self.step(loss)
        return {"loss": float(loss.detach()), "loss_ce": float(loss_ce.detach()),
                "loss_hinge": float(loss_hinge.detach()), "hard_pairs": float(len(self._pairs))}

    @torch.no_grad()
    def predict(self, images: Tensor, space: LabelSpace) -> Tensor:
        return self._logits(self.adapter(self.image_features(images)), self._text(space))

    @torch.no_grad()
    def end_task(self, task: Task, space: LabelSpace) -> None:
        if task.train is not None and len(task.train) > 0:
            self._store_statistics(task)
            if self._old_weight is not None:  # fusion after every task but the first
                self.adapter.weight.copy_(fuse_weights(self._old_weight, self.adapter.weight, self.mix_bias))
            self.tasks_done += 1
        self._old_weight = None
        self._space = None

    def _store_statistics(self, task: Task) -> None:
        """Per-class mean and covariance of the task's training features. Under torchrun (``self.comm``, installed by
        the loop) each rank encodes its shard and the per-class sums are added up, so every rank stores the
        statistics of the whole task; in one process ``comm`` is the identity."""
        dev = self._model().device
        rows = self.comm.shard(len(task.train))
        feats, labels = [], []
        for images, y, _ in iter_batches(task.train, self.eval_batch_size, indices=rows):
            feats.append(self.image_features(images.to(dev)))
            labels.append(y.to(dev))
        dim = self.adapter.in_features
        x = torch.cat(feats) if feats else torch.zeros(0, dim, device=dev)
        y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=dev)
        for c in range(len(task.space)):  # every rank walks every class: the all-reduces line up
            count, total, outer = class_moments(x[y == c])
            flat = self.comm.sum_(torch.cat([count[None], total, outer.flatten()]), "RAPF statistics")
            count, total, outer = flat[0], flat[1:dim + 1], flat[dim + 1:].view(dim, dim)
            if count > 0:
                mean, cov = statistics_from_moments(count, total, outer, self.ridge)
                # The covariance stays float64: rounding it to float32 breaks positive definiteness once the features
                # are large (a ResNet tower's attention pool gives entries in the thousands: float32 rounding then
                # exceeds the ridge and Cholesky fails; 2x the memory of float32, D^2 x 8 bytes a class).
                self.stats[task.space.classnames[c]] = (mean.float(), cov)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        names = list(self.stats)
        return {**super().state_dict(), "adapter": self.adapter.state_dict(), "tasks_done": self.tasks_done,
                "class_names": names,
                "means": torch.stack([self.stats[c][0] for c in names]) if names else None,
                "covs": torch.stack([self.stats[c][1] for c in names]) if names else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.adapter.load_state_dict(state["adapter"])
        self.tasks_done = int(state["tasks_done"])
        names = list(state["class_names"])
        dev = self.adapter.weight.device
        self.stats = {c: (state["means"][i].to(dev), state["covs"][i].to(dev)) for i, c in enumerate(names)}
