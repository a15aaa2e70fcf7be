"""LoRA for the residual blocks of both open_clip towers, in PEFT's vocabulary (`base_layer`, `lora_A`, `lora_B`,
`scaling`, `merge`, `unmerge`, `get_delta_weight`), plus an optional per-rank gate for CoDyRA.

Targets per residual block (names used by ``targets=``):

- ``q``, ``k``, ``v``: the row blocks ``[0:d]``, ``[d:2d]``, ``[2d:3d]`` of the attention's fused ``in_proj_weight``
  (open_clip keeps q/k/v fused in ``nn.MultiheadAttention``; the CoDyRA reference splits them into three Linear
  layers, which is the same function: a LoRA on a row block only changes those output rows);
- ``out``: ``attn.out_proj``; ``fc``: ``mlp.c_fc``; ``proj``: ``mlp.c_proj``.

Each target gets one `LoRA` (``ΔW = scaling · B · diag(gate) · A``; A kaiming-uniform(a=√5), B zeros, so a fresh
adapter leaves the model's outputs unchanged). Two wrappers replace the wrapped modules in their parent:
`LoRALinear` (``mlp.c_fc`` / ``mlp.c_proj``: base output + the low-rank path ``B·diag(g)·A·x``) and
`LoRAAttention` (``attn``: ``nn.MultiheadAttention.forward`` reads ``in_proj_weight`` and ``out_proj.weight``
directly, never calling ``out_proj``'s forward, so the wrapper runs the untouched base module with the effective
weights ``W + ΔW`` substituted through ``torch.func.functional_call``: open_clip's forward and torch's attention
kernels stay exactly as they are). `ctta.adapters.inject` puts them into a tower (`inject_lora`); its
`merge_and_remove` folds every delta into the base weights and puts the original modules back, so the result has
exactly the base model's parameters, modules and forward cost.

On open_clip's ``ModifiedResNet`` image tower (CLIP RN50/RN101) the only attention is the attention pool
(``attnpool``: separate ``q_proj``, ``k_proj``, ``v_proj`` and ``c_proj`` Linear layers that its forward hands to
``F.multi_head_attention_forward`` as weights, never calling them): targets ``q``, ``k``, ``v``, ``out`` map onto those
four matrices through `LoRAAttentionPool`, the same substitution as `LoRAAttention`. The convolutional stages have no
counterpart of ``fc`` / ``proj`` (no MLP), so those targets adapt nothing on that tower (`ctta.adapters.inject`).

Supported: open_clip 3.x ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` with ``_qkv_same_embed_dim``) and
``CustomResidualAttentionBlock`` (open_clip's own ``Attention``, also a fused ``in_proj_weight [3d, d]`` and an
``out_proj`` Linear), and ``ModifiedResNet``'s ``AttentionPool2d``. Anything else (timm or Hugging Face towers,
separate q/k/v projections) raises a ``NotImplementedError`` naming the module, rather than silently adapting
nothing.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS: tuple[str, ...] = ("q", "k", "v", "out", "fc", "proj")
TOWERS: tuple[str, ...] = ("visual", "text")
_ATTN = ("q", "k", "v", "out")
POOL_TARGETS: dict[str, str] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "c_proj"}  # ModifiedResNet


class LoRA(nn.Module):
    """The low-rank update of one weight matrix (or one row block of it): ``ΔW = scaling · B · diag(gate) · A``.

    ``gate`` (CoDyRA's per-rank importance weights, N(0, 1) at init) is ``None`` for plain LoRA. ``name`` is a
    readable address such as ``"visual.3.q"``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, gated: bool = False, scaling: float = 1.0,
                 name: str = "", device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.name = name
        self.scaling = float(scaling)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT / loralib default; B = 0 makes ΔW = 0
        self.gate = nn.Parameter(torch.randn(rank, device=device, dtype=dtype)) if gated else None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def effective_rank(self) -> int:
        """Ranks in use: non-zero gates (all ranks without a gate)."""
        return self.rank if self.gate is None else int(torch.count_nonzero(self.gate.detach()))

    def get_delta_weight(self) -> Tensor:
        """``ΔW [out, in]``, differentiable."""
        B = self.lora_B * self.gate if self.gate is not None else self.lora_B  # B·diag(g): scale B's columns
        return (B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """``ΔW · x`` through the rank-r bottleneck (cheaper than forming ΔW for large batches)."""
        h = F.linear(x, self.lora_A)
        if self.gate is not None:
            h = h * self.gate
        return F.linear(h, self.lora_B) * self.scaling

    @torch.no_grad()
    def prune(self) -> int:
        """Drop the ranks whose gate is exactly zero (they contribute nothing); returns the ranks kept. The factors
        become new `nn.Parameter` objects, so rebuild any optimizer that held the old ones."""
        if self.gate is None:
            return self.rank
        keep = self.gate != 0
        self.lora_A = nn.Parameter(self.lora_A[keep].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(self.lora_B[:, keep].clone(), requires_grad=self.lora_B.requires_grad)
        self.gate = nn.Parameter(self.gate[keep].clone(), requires_grad=self.gate.requires_grad)
        return self.rank

    def extra_repr(self) -> str:
        g = f", gated (effective {self.effective_rank})" if self.gate is not None else ""
        return f"{self.name!r}: in={self.lora_A.shape[1]}, out={self.lora_B.shape[0]}, rank={self.rank}{g}, " \
               f"scaling={self.scaling:g}"


class _LoRAWrapper(nn.Module):
    """Shared merge / unmerge logic: ``base_layer`` plus one `LoRA` per target in ``lora``."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora = nn.ModuleDict()
        self.merged = False

    def _target(self, name: str) -> tuple[nn.Parameter, slice]:
        """The base parameter a target updates and the rows it owns."""
        raise NotImplementedError

    def _attach(self, loras: Mapping[str, LoRA], allowed: Sequence[str], what: str) -> None:
        """Register ``loras`` after checking their names against ``allowed``, in ``allowed``'s fixed order (so
        state_dict keys do not depend on the caller's order)."""
        unknown = sorted(set(loras) - set(allowed))
        if unknown:
            raise ValueError(f"{what} targets must be among {tuple(allowed)}, got {unknown}")
        for n in allowed:
            if n in loras:
                self.lora[n] = loras[n]

    def get_delta_weight(self, name: str) -> Tensor:
        return self.lora[name].get_delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W + ΔW`` for every target; idempotent. The original rows are kept (non-persistent buffers, so
        they follow ``.to()`` but not ``state_dict``) until `unmerge`, which then restores them bit-exactly."""
        if self.merged:
            return
        for name, lora in self.lora.items():
            w, rows = self._target(name)
            self.register_buffer(f"_unmerged_{name}", w[rows].clone(), persistent=False)
            w[rows] += lora.get_delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` exactly (restores the saved rows rather than subtracting a possibly retrained ΔW)."""
        if not self.merged:
            return
        for name in self.lora:
            w, rows = self._target(name)
            w[rows] = getattr(self, f"_unmerged_{name}")
            delattr(self, f"_unmerged_{name}")
        self.merged = False


class LoRALinear(_LoRAWrapper):
    """``base_layer(x) + ΔW·x`` for an ``nn.Linear`` (``mlp.c_fc``, ``mlp.c_proj``); one target, ``lora["w"]``."""

    def __init__(self, base_layer: nn.Linear, lora: LoRA):
        super().__init__(base_layer)
        self.lora["w"] = lora

    # open_clip reads ``mlp.c_fc.weight.dtype`` (get_cast_dtype); keep the Linear's attributes visible
    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    def _target(self, name: str) -> tuple[nn.Parameter, slice]:
        return self.base_layer.weight, slice(None)

    def get_delta_weight(self, name: str = "w") -> Tensor:
        return super().get_delta_weight(name)

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if not torch.is_grad_enabled():
            # inference: one matmul with W + ΔW (forming ΔW costs out·r·in, far less than the bottleneck's
            # tokens·r·(in + out)); training keeps the bottleneck, whose backward never needs a dense weight grad
            return F.linear(x, base.weight + self.get_delta_weight().to(base.weight.dtype), base.bias)
        out = base(x)
        return out + self.lora["w"](x).to(out.dtype)


class LoRAAttention(_LoRAWrapper):
    """An attention module with a fused ``in_proj_weight [3d, d]`` and ``out_proj``, run with effective weights.
    Targets: any of ``q``, ``k``, ``v`` (row blocks of ``in_proj_weight``) and ``out`` (``out_proj.weight``)."""

    def __init__(self, base_layer: nn.Module, loras: Mapping[str, LoRA]):
        super().__init__(base_layer)
        self._attach(loras, _ATTN, "attention")

    def _target(self, name: str) -> tuple[nn.Parameter, slice]:
        if name == "out":
            return self.base_layer.out_proj.weight, slice(None)
        d = self.base_layer.in_proj_weight.shape[1]
        i = "qkv".index(name)
        return self.base_layer.in_proj_weight, slice(i * d, (i + 1) * d)

    def forward(self, *args, **kwargs):
        base = self.base_layer
        if self.merged or not len(self.lora):
            return base(*args, **kwargs)
        params: dict[str, Tensor] = {}
        if any(n in self.lora for n in "qkv"):
            W = base.in_proj_weight
            d = W.shape[1]
            # a q/k/v delta touches only its own rows: build [W_q + ΔW_q; W_k + ΔW_k; W_v + ΔW_v]
            rows = [W[i * d:(i + 1) * d] + self.lora[n].get_delta_weight().to(W.dtype) if n in self.lora
                    else W[i * d:(i + 1) * d] for i, n in enumerate("qkv")]
            params["in_proj_weight"] = torch.cat(rows)
        if "out" in self.lora:
            Wo = base.out_proj.weight
            params["out_proj.weight"] = Wo + self.lora["out"].get_delta_weight().to(Wo.dtype)
        return torch.func.functional_call(base, params, args, kwargs)


class LoRAAttentionPool(_LoRAWrapper):
    """``ModifiedResNet``'s attention pool run with effective weights: targets ``q``, ``k``, ``v``, ``out`` update the
    whole weight of ``q_proj``, ``k_proj``, ``v_proj``, ``c_proj`` (separate Linear layers whose weights the pool's
    forward reads directly, so a wrapper around each Linear would never be called; the untouched pool is run
    through ``torch.func.functional_call`` with ``W + ΔW`` substituted instead)."""

    def __init__(self, base_layer: nn.Module, loras: Mapping[str, LoRA]):
        super().__init__(base_layer)
        self._attach(loras, tuple(POOL_TARGETS), "attention-pool")

    def _target(self, name: str) -> tuple[nn.Parameter, slice]:
        return getattr(self.base_layer, POOL_TARGETS[name]).weight, slice(None)

    def forward(self, *args, **kwargs):
        base = self.base_layer
        if self.merged or not len(self.lora):
            return base(*args, **kwargs)
        params = {}
        for n, lora in self.lora.items():
            w = getattr(base, POOL_TARGETS[n]).weight
            params[f"{POOL_TARGETS[n]}.weight"] = w + lora.get_delta_weight().to(w.dtype)
        return torch.func.functional_call(base, params, args, kwargs)
