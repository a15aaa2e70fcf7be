"""Loss functions shared by more than one strategy, as pure functions of tensors."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def distillation(teacher_logits: Tensor, student_logits: Tensor, T: float = 2.0) -> Tensor:
    """Hinton distillation as ZSCL writes it (``mtil/src/models/helpers.py::distillation``, used by ZSCL, LwF and
    LwF-VR): ``CE(student/T, softmax(teacher/T)) · T²``, the soft cross-entropy averaged over rows.

    Rows are the distributions: ``[N, K]`` logits give N distributions over K entries; pass the transposes for the
    other direction (text→image). The T² factor keeps the gradient magnitude independent of T (Hinton et al.
    2015). The teacher gets no gradient. Note this is the cross-entropy, i.e. KL plus the teacher's entropy: the same
    gradient as KL, a different value."""
    if teacher_logits.shape != student_logits.shape or teacher_logits.dim() != 2:
        raise ValueError(f"distillation needs two [N, K] logit tensors of one shape, got "
                         f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}")
    if T <= 0:
        raise ValueError(f"distillation temperature must be positive, got {T}")
    target = torch.softmax(teacher_logits.detach().float() / T, dim=-1)
    log_p = torch.log_softmax(student_logits.float() / T, dim=-1)
    return -(target * log_p).sum(-1).mean() * T * T


# ----------------------------------------------------------------------------------------- test-time entropy losses (TPT)
def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along the last dimension."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def select_confident(logits: Tensor, p: float = 0.1) -> Tensor:
    """Indices of the ``int(V · p)`` lowest-entropy rows of ``logits [V, C]`` (at least one), most confident first.

    TPT's confidence selection (azshue/TPT ``select_confident_samples``): with 64 views and ``p = 0.1`` it keeps 6,
    and the original view competes like any other. A stable sort makes ties deterministic."""
    if logits.dim() != 2:
        raise ValueError(f"select_confident expects logits [V, C], got shape {tuple(logits.shape)}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"selection fraction must be in (0, 1], got {p}")
    k = max(1, int(logits.shape[0] * p))
    return torch.argsort(entropy(logits.detach().float()), stable=True)[:k]


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the *averaged probability* over the rows of ``logits [V, C]`` (not the mean of per-row entropies):
    ``p̄ = mean_i softmax(z_i)``, loss ``H(p̄)``.

    Computed in log space as TPT's ``avg_entropy``: ``log p̄ = logsumexp_i log_softmax(z_i) − log V``, clamped at the
    dtype's most negative finite value so that a class of zero probability adds 0 rather than ``0 · (−inf) = nan``."""
    if logits.dim() != 2:
        raise ValueError(f"marginal_entropy expects logits [V, C], got shape {tuple(logits.shape)}")
    logp = logits.log_softmax(-1)
    avg = logp.logsumexp(0) - math.log(logits.shape[0])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


def atfd(text_features: Tensor) -> Tensor:
    """Average text-feature dispersion of C-TPT (Yoon et al., ICLR 2024; hee-suk-yoon/C-TPT
    ``l2_norm_mean_training``): ``(1/C) Σ_c ||t_c − t̄||₂`` over the L2-normalised class features ``t_c`` and their
    mean ``t̄``. The features are normalised here (a no-op for already normalised ones)."""
    if text_features.dim() != 2:
        raise ValueError(f"atfd expects text features [C, D], got shape {tuple(text_features.shape)}")
    t = torch.nn.functional.normalize(text_features.float(), dim=-1)
    return (t - t.mean(0, keepdim=True)).norm(dim=-1).mean()


def info_nce(query: Tensor, positive: Tensor, temperature: float = 0.1) -> Tensor:
    """InfoNCE with in-batch negatives, one direction, as the ``info-nce-pytorch`` package computes it without
    explicit negatives (used by DPE's prototype alignment, ``InfoNCE(temperature=0.01)``): rows L2-normalised,
    ``logits = q·kᵀ / τ``, cross-entropy against the diagonal, mean over rows. Zero for a single row."""
    if query.dim() != 2 or query.shape != positive.shape:
        raise ValueError(f"info_nce expects two [N, D] tensors of one shape, got {tuple(query.shape)} and "
                         f"{tuple(positive.shape)}")
    q = torch.nn.functional.normalize(query, dim=-1)
    k = torch.nn.functional.normalize(positive, dim=-1)
    labels = torch.arange(q.shape[0], device=q.device)
    return torch.nn.functional.cross_entropy(q @ k.t() / temperature, labels)


# ----------------------------------------------------------------------------------------- continual LoRA (CoDyRA)
def seen_masked_clip_loss(image_features: Tensor, seen_text: Tensor, current_text: Tensor, labels: Tensor,
                          scale: float | Tensor, text_to_image: bool = True) -> Tensor:
    """CoDyRA's supervised loss (Artificer-AI-Lab/CoDyRA ``models/codyra.py::train_model``), shared by the
    rank-selective and the fixed-rank LoRA strategies.

    ``logits = scale · f_img @ [T_seen; T_cur]^T`` with the seen columns set to −inf, ``CE(logits, labels + |seen|)``
    (``labels`` index ``current_text``); plus, if ``text_to_image``, ``CE(scale · [T_seen; T_cur] @ f_img^T, M)``
    with the *unnormalised* soft targets ``M[c, i] = 1[label_i = c]``: a class present k times in the batch has a
    target row summing to k, and classes absent from the batch (all seen ones) have all-zero rows that add 0 but
    still count in the mean over rows — exactly the reference's ``F.cross_entropy(t_logits, mask)``."""
    if image_features.dim() != 2 or current_text.dim() != 2 or seen_text.dim() != 2:
        raise ValueError("seen_masked_clip_loss expects 2-D features [B, D], [S, D], [C, D]")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(current_text)):
        raise ValueError(f"labels must index the {len(current_text)} current classes, got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    n_seen = len(seen_text)
    text = torch.cat([seen_text.to(current_text.dtype), current_text])
    logits = scale * image_features.float() @ text.float().t()
    if n_seen:
        logits = logits.masked_fill(torch.arange(len(text), device=logits.device) < n_seen, float("-inf"))
    y = labels + n_seen
    loss = torch.nn.functional.cross_entropy(logits, y)
    if text_to_image:
        t_logits = scale * text.float() @ image_features.float().t()  # [S + C, B]
        target = (y.view(1, -1) == torch.arange(len(text), device=y.device).view(-1, 1)).float()
        loss = loss + torch.nn.functional.cross_entropy(t_logits, target)
    return loss
