"""TDA's positive and negative caches (`DualCache`), their settings, and the choice of the cache for a label space
(`dual_cache_for`). TDA and BoostAdapter (a TDA) use them; the per-batch frame and the state are `TDA`'s."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ctta.checks import check_band, check_number
from ctta.stream import LabelSpace
from ctta.strategies._cache import (ClassCache, Policy, affinity_logits, ensure_space, normalized_entropy)


@dataclass(frozen=True)
class DualCacheConfig:
    """TDA's cache settings (official ``configs/*.yaml``; the negative ones are the same for every dataset)."""

    pos_alpha: float = 2.0
    pos_beta: float = 5.0
    pos_capacity: int = 3
    neg_alpha: float = 0.117
    neg_beta: float = 1.0
    neg_capacity: int = 2
    neg_entropy: tuple[float, float] = (0.2, 0.5)  # strict band on the normalised entropy
    neg_mask: tuple[float, float] = (0.03, 1.0)    # strict band on the stored probabilities, applied at read time
    pos_enabled: bool = True
    neg_enabled: bool = True
    entropy_norm: str = "log2"
    neg_policy: Policy = "entropy"  # BoostAdapter's negative cache is "fifo"
    owner: str = "TDA"  # named in error messages

    def __post_init__(self):
        if self.pos_capacity < 1 or self.neg_capacity < 1:
            raise ValueError(f"cache capacities must be >= 1, got {self.pos_capacity} and {self.neg_capacity}")
        for name in ("pos_alpha", "pos_beta", "neg_alpha", "neg_beta"):
            check_number(self.owner, name, getattr(self, name))
        for name in ("neg_entropy", "neg_mask"):  # as tuples of floats (a config may hand in lists)
            object.__setattr__(self, name, check_band(self.owner, name, getattr(self, name)))
        normalized_entropy(0.0, 2, self.entropy_norm)  # validates the switch


class DualCache:
    """TDA's positive cache (items ``(f, H)``, always offered) and negative cache (items ``(f, H, p)``, offered
    when ``lo < H/norm(C) < hi``), and their read ``z + α_p·A_pos(f) − α_n·A_neg(f)``."""

    def __init__(self, n_classes: int, dim: int, cfg: DualCacheConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.pos = ClassCache(n_classes, cfg.pos_capacity, dim, device=device)
        self.neg = ClassCache(n_classes, cfg.neg_capacity, dim, policy=cfg.neg_policy, with_probs=True,
                              device=device)

    @property
    def n_classes(self) -> int:
        return self.pos.n_classes

    def __len__(self) -> int:
        return len(self.pos) + len(self.neg)

    def update(self, f: Tensor, h: Tensor | float, p: Tensor, pred: int) -> None:
        """Offer one query (feature, entropy in nats, probabilities, pseudo-label) to both caches."""
        cfg = self.cfg
        if cfg.pos_enabled:
            self.pos.insert(pred, f, h)
        lo, hi = cfg.neg_entropy
        if cfg.neg_enabled and lo < normalized_entropy(h, self.n_classes, cfg.entropy_norm) < hi:
            self.neg.insert(pred, f, h, p)

    def read(self, f: Tensor, z: Tensor, pos_items: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``z + α_p·Σ_pos exp(−β_p(1 − f·k))·onehot − α_n·Σ_neg exp(−β_n(1 − f·k))·1[lo < p_k < hi]`` (official
        ``run_test_tda``); ``pos_items = (keys, classes)`` replaces the positive items (BoostAdapter)."""
        cfg, c = self.cfg, z.shape[-1]
        out = z.clone()
        if cfg.pos_enabled:
            keys, classes = pos_items if pos_items is not None else self.pos.items()[:2]
            out += affinity_logits(f, keys, None, classes, cfg.pos_alpha, cfg.pos_beta, c)
        if cfg.neg_enabled:
            keys, _, _, probs = self.neg.items()
            lo, hi = cfg.neg_mask
            mask = ((probs > lo) & (probs < hi)).to(f.dtype)
            out -= affinity_logits(f, keys, mask, None, cfg.neg_alpha, cfg.neg_beta, c)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos.state_dict(), "neg": self.neg.state_dict()}

    @classmethod
    def from_state(cls, state: dict[str, Any], cfg: DualCacheConfig, device: torch.device | str | None = None
                   ) -> "DualCache":
        out = cls.__new__(cls)
        out.cfg = cfg
        out.pos = ClassCache.from_state(state["pos"], device=device)
        out.neg = ClassCache.from_state(state["neg"], policy=cfg.neg_policy, with_probs=True, device=device)
        if (out.pos.capacity, out.neg.capacity) != (cfg.pos_capacity, cfg.neg_capacity):
            raise ValueError(f"cache state of capacities ({out.pos.capacity}, {out.neg.capacity}) does not fit "
                             f"({cfg.pos_capacity}, {cfg.neg_capacity})")
        return out


def dual_cache_for(s: Any, head: Tensor, space: LabelSpace, adapt: bool) -> DualCache:
    """The `DualCache` of strategy ``s`` to use for ``space`` (class head ``head [C, D]``): the held one if it was
    built for that space, else a new empty one (see `ensure_space`: adapting on another space raises once the held
    cache is non-empty)."""
    current = s.cache
    n = current.n_classes if current is not None else 0
    if not ensure_space(s.space, n, current is None or len(current) == 0, space, type(s).__name__, adapt):
        return current
    return DualCache(head.shape[0], head.shape[1], s.cfg, head.device)
