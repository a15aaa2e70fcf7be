"""Shared parts of the training-free test-time strategies (TDA, DMN, DPE, BoostAdapter, ZERO).

- `ClassCache`: a per-class cache of fixed capacity held in tensors (keys ``[C, K, D]``, entropies ``[C, K]``,
  optional probability vectors ``[C, K, C]``, fill counts ``[C]``), with the two admission rules the official
  codes use: ``"entropy"`` (TDA's ``update_cache``: append while there is room, else replace the worst item if
  the newcomer's entropy is strictly lower; items kept sorted by ascending entropy, stable) and ``"fifo"``
  (BoostAdapter's negative cache: append, drop the oldest beyond capacity).
- `affinity_logits`: the cache read of Tip-Adapter/TDA, ``α · exp(−β(1 − q·k)) @ V``.
- `confident_query`: TDA's ``get_clip_logits`` (mean feature / logits of the 10 % most confident views).
- `normalized_entropy`: TDA's ``get_entropy`` with its log2 quirk as a switch.
- (`ctta.strategies._dual_cache`: TDA's positive + negative caches and the per-batch frame TDA and BoostAdapter
  share.)
- `encode_views`, `class_logits`, `fork_generator`, `ensure_space`, `finite_samples`: view encoding, the 100·cos
  logit convention, pure prediction with a copy of a strategy's generator, the label-space check every cache
  strategy makes, and the guard that keeps non-finite features out of every cache.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from ctta.losses import entropy, marginal_entropy, select_confident
from ctta.stream import LabelSpace
from ctta.views import tpt_views

Policy = Literal["entropy", "fifo"]


def normalized_entropy(h: Tensor | float, n_classes: int, base: str = "log2") -> float:
    """Entropy in nats divided by ``log2(C)`` (``base="log2"``: the official TDA/DPE/BoostAdapter ``get_entropy``,
    whose thresholds 0.2/0.5/0.1 are calibrated to this quirk) or by ``ln(C)`` (``base="ln"``: a true [0, 1]
    normalisation; the thresholds then select other samples)."""
    if base not in ("log2", "ln"):
        raise ValueError(f"entropy normalisation must be 'log2' (official) or 'ln', got {base!r}")
    if n_classes < 2:
        return 0.0
    return float(h) / (math.log2(n_classes) if base == "log2" else math.log(n_classes))


def class_logits(model: Any, feats: Tensor, head: Tensor, logit_scale: float | None) -> Tensor:
    """``logit_scale · feats @ head.T``; ``logit_scale=None`` uses the model's own (learned) scale and bias."""
    if logit_scale is None:
        return model.logits(feats, head)
    return logit_scale * feats @ head.t()


def affinity_logits(query: Tensor, keys: Tensor, values: Tensor | None, classes: Tensor | None, alpha: float,
                    beta: float, n_classes: int) -> Tensor:
    """TDA's ``compute_cache_logits``: ``α · Σ_i exp(−β(1 − q·k_i)) · v_i`` over the cached items.

    ``values [N, C]`` (the negative cache's masks) or ``classes [N]`` (one-hot values, added by index: the same sum
    as the one-hot matmul without materialising it). Returns ``[C]`` (zeros for an empty cache)."""
    if keys.shape[0] == 0:
        return query.new_zeros(n_classes)
    w = torch.exp(-beta * (1.0 - keys @ query))  # [N]
    if values is not None:
        return alpha * (w @ values)
    return alpha * query.new_zeros(n_classes).index_add_(0, classes, w)


def confident_query(feats: Tensor, logits: Tensor, p: float = 0.1) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """TDA's ``get_clip_logits`` for one sample's views ``feats [V, D]``, ``logits [V, C]``.

    One view: ``(f_0, z_0, H(softmax z_0), softmax z_0, argmax z_0)``. Several: the ``int(V·p)`` lowest-entropy views
    S (at least one; the original competes), ``f = mean_S f_i`` (**not** re-normalised), ``z = mean_S z_i``,
    ``H = entropy(mean_S softmax z_i)`` (``avg_entropy``), ``p̄ = mean_S softmax z_i``, ``argmax z``."""
    if feats.shape[0] == 1:
        z = logits[0]
        return feats[0], z, entropy(z), z.softmax(-1), int(z.argmax())
    sel = select_confident(logits, p)
    z = logits[sel].mean(0)
    return feats[sel].mean(0), z, marginal_entropy(logits[sel]), logits[sel].softmax(-1).mean(0), int(z.argmax())


@torch.no_grad()
def encode_views(strategy: Any, images: Tensor, n_views: int, *, augmix: bool, generator: torch.Generator,
                 scale: tuple[float, float] = (0.08, 1.0), view_batch: int = 256) -> Tensor:
    """L2-normalised features ``[B, 1 + n_views, D]`` of each image's views (`ctta.views.tpt_views`: view 0 = the
    image, then random resized crops + flips, + AugMix with ``augmix``), encoded in chunks of ``view_batch``."""
    m = strategy._model()
    views = tpt_views(images.to(m.device), m.image_size, n_views, augmix_views=augmix, generator=generator,
                      scale=scale).flatten(0, 1)
    with strategy.autocast():
        feats = torch.cat([m.encode_image(views[i:i + view_batch]) for i in range(0, views.shape[0], view_batch)])
    return feats.float().view(images.shape[0], 1 + n_views, -1)


def finite_samples(feats: Tensor) -> Tensor:
    """``[B]``: whether every view feature of each sample ``feats [B, V, D]`` is finite. A sample that is not (an fp16
    overflow, a corrupt input) is never admitted to a cache or memory: the strategies count it in
    ``skipped_steps``, as `Strategy.step` counts a non-finite loss, and leave their state untouched."""
    return torch.isfinite(feats).flatten(1).all(1)


def fork_generator(generator: torch.Generator) -> torch.Generator:
    """A copy of ``generator`` (same device and state): ``predict`` draws its views from it and stays pure."""
    return torch.Generator(generator.device).set_state(generator.get_state())


def ensure_space(held: str | None, n_held: int, is_empty: bool, space: LabelSpace, who: str, adapt: bool) -> bool:
    """Whether a strategy whose per-class state was built for the label space with fingerprint ``held`` (``n_held``
    classes; ``is_empty``: nothing adapted yet) must use fresh state for ``space``:
    - the state still empty (or none built): fresh (any space; the caller keeps it once it adapts);
    - the same space (by `LabelSpace.fingerprint`, so two spaces of one size are never confused): the held state;
    - another space: adapting raises, since the state is indexed by class and cannot carry over (reset first);
      predicting uses fresh state that is not kept: the strategy has learned nothing about that space, so it
      predicts as from an empty state (what a retention check on control label spaces measures), and the held
      state is untouched. (A non-empty state without a fingerprint, saved before there were any, matches no space.)"""
    if is_empty:
        return True
    if held == space.fingerprint:
        return False
    if not adapt:
        return True
    raise ValueError(f"{who} holds state for a {n_held}-class label space and was asked to adapt on another "
                     f"({len(space)} classes, {space.name or 'unnamed'}): its state is keyed by class index, so it "
                     f"cannot be reused; reset the strategy (OnlineAdapter.reset) before switching label spaces")


class ClassCache:
    """Fixed-capacity per-class cache in tensors (see the module docstring for the two admission policies).

    Slots ``[c, :count[c]]`` are filled; under ``"entropy"`` they are sorted by ascending entropy, under ``"fifo"``
    by age (oldest first). ``with_probs`` adds a probability vector per item (TDA's negative cache)."""

    def __init__(self, n_classes: int, capacity: int, dim: int, *, policy: Policy = "entropy",
                 with_probs: bool = False, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1, got {capacity}")
        if policy not in ("entropy", "fifo"):
            raise ValueError(f"cache policy must be 'entropy' or 'fifo', got {policy!r}")
        self.capacity, self.policy, self.with_probs = capacity, policy, with_probs
        self.keys = torch.zeros(n_classes, capacity, dim, device=device)
        self.entropy = torch.zeros(n_classes, capacity, device=device)
        self.probs = torch.zeros(n_classes, capacity, n_classes if with_probs else 0, device=device)
        self.count = torch.zeros(n_classes, dtype=torch.long, device=device)

    @property
    def n_classes(self) -> int:
        return self.keys.shape[0]

    def __len__(self) -> int:
        return int(self.count.sum())

    def insert(self, cls: int, key: Tensor, h: Tensor | float, prob: Tensor | None = None) -> bool:
        """Offer one item to class ``cls``; returns whether it was admitted."""
        if self.with_probs and prob is None:
            raise ValueError("this cache stores a probability vector per item")
        n, k = int(self.count[cls]), self.capacity
        h = float(torch.as_tensor(float(h), dtype=self.entropy.dtype))  # compare in the stored precision
        if self.policy == "fifo":
            if n == k:  # drop the oldest: shift left, the newcomer goes last
                self.keys[cls, :-1] = self.keys[cls, 1:].clone()
                self.entropy[cls, :-1] = self.entropy[cls, 1:].clone()
                self.probs[cls, :-1] = self.probs[cls, 1:].clone()
            slot = min(n, k - 1)
        elif n < k:
            slot = n
        elif h < float(self.entropy[cls, k - 1]):  # strictly better than the worst item: replace it
            slot = k - 1
        else:
            return False
        self.keys[cls, slot] = key
        self.entropy[cls, slot] = h
        if self.with_probs:
            self.probs[cls, slot] = prob
        self.count[cls] = min(n + 1, k)
        if self.policy == "entropy":  # re-sort; stable, so the newcomer stays after items of equal entropy
            m = int(self.count[cls])
            order = torch.argsort(self.entropy[cls, :m], stable=True)
            self.keys[cls, :m] = self.keys[cls, :m][order]
            self.entropy[cls, :m] = self.entropy[cls, :m][order]
            self.probs[cls, :m] = self.probs[cls, :m][order]
        return True

    def items(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Filled items, class by class in slot order: ``keys [N, D]``, ``classes [N]``, ``entropy [N]``,
        ``probs [N, C]`` (``[N, 0]`` without probabilities)."""
        # Memoised until any of the four tensors is replaced or written in place (each write bumps a tensor's
        # _version): past the warm-up most samples are not admitted, and the gather costs as much as the read.
        # Callers get the same tensors again, so they must not write into them (none does).
        version = tuple((id(t), t._version) for t in (self.keys, self.entropy, self.probs, self.count))
        memo = getattr(self, "_items_memo", None)
        if memo is not None and memo[0] == version:
            return memo[1]
        mask = torch.arange(self.capacity, device=self.count.device)[None] < self.count[:, None]  # [C, K]
        classes = torch.arange(self.n_classes, device=self.count.device)[:, None].expand_as(mask)[mask]
        out = (self.keys[mask], classes, self.entropy[mask], self.probs[mask])
        self._items_memo = (version, out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"keys": self.keys.clone(), "entropy": self.entropy.clone(), "probs": self.probs.clone(),
                "count": self.count.clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, policy: Policy = "entropy", with_probs: bool = False,
                   device: torch.device | str | None = None) -> "ClassCache":
        """A cache holding a copy of ``state`` (from `state_dict`; never aliased)."""
        keys = state["keys"]
        out = cls(keys.shape[0], keys.shape[1], keys.shape[2], policy=policy, with_probs=with_probs, device="meta")
        dev = device if device is not None else keys.device
        out.keys, out.entropy = keys.detach().clone().to(dev), state["entropy"].detach().clone().to(dev)
        out.probs, out.count = state["probs"].detach().clone().to(dev), state["count"].detach().clone().to(dev)
        if with_probs and out.probs.shape[-1] != out.n_classes:
            raise ValueError(f"cache state has probability vectors of size {out.probs.shape[-1]} for "
                             f"{out.n_classes} classes")
        return out
