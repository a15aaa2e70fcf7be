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
kernels stay exactly as they are). `merge_and_remove` folds every delta into the base weights and puts the original
modules back, so the result has exactly the base model's parameters, modules and forward cost.

Supported: open_clip 3.x ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` with ``_qkv_same_embed_dim``) and
``CustomResidualAttentionBlock`` (open_clip's own ``Attention``, also a fused ``in_proj_weight [3d, d]`` and an
``out_proj`` Linear). Anything else (timm or Hugging Face towers, separate q/k/v projections) raises a
``NotImplementedError`` naming the module, rather than silently adapting nothing.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS: tuple[str, ...] = ("q", "k", "v", "out", "fc", "proj")
TOWERS: tuple[str, ...] = ("visual", "text")
_ATTN = ("q", "k", "v", "out")


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
        unknown = sorted(set(loras) - set(_ATTN))
        if unknown:
            raise ValueError(f"attention targets must be among {_ATTN}, got {unknown}")
        for n in _ATTN:  # fixed order, so state_dict keys do not depend on the caller's order
            if n in loras:
                self.lora[n] = loras[n]

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


# ----------------------------------------------------------------------------------------------- injection
def _net(model: nn.Module) -> nn.Module:
    return getattr(model, "net", model)  # a ctta.Clip or a bare open_clip model


def tower_blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    """The residual blocks of ``"visual"`` or ``"text"`` (open_clip ``CLIP`` keeps the text parts on the model
    itself, ``CustomTextCLIP`` under ``.text``)."""
    net = _net(model)
    if tower == "visual":
        owner = net.visual
    elif tower == "text":
        owner = net.text if hasattr(net, "text") else net
    else:
        raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")
    blocks = getattr(getattr(owner, "transformer", None), "resblocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise NotImplementedError(f"the {tower} tower ({type(owner).__name__}) has no open_clip "
                                  "transformer.resblocks; LoRA injection supports open_clip's own ViT and text "
                                  "transformers only (not timm / Hugging Face towers)")
    return blocks


def _check_attention(attn: nn.Module, where: str) -> None:
    if isinstance(attn, LoRAAttention):
        raise RuntimeError(f"{where} already carries LoRA; call merge_and_remove() before injecting again")
    if isinstance(attn, nn.MultiheadAttention) and not attn._qkv_same_embed_dim:
        raise NotImplementedError(f"{where}: nn.MultiheadAttention with separate q/k/v weights is not supported")
    w, out = getattr(attn, "in_proj_weight", None), getattr(attn, "out_proj", None)
    if not (isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[0] == 3 * w.shape[1]
            and isinstance(out, nn.Linear)):
        raise NotImplementedError(
            f"{where} is a {type(attn).__module__}.{type(attn).__name__}; LoRA needs a fused in_proj_weight "
            "[3d, d] and an out_proj Linear (open_clip 3.x ResidualAttentionBlock / CustomResidualAttentionBlock). "
            "Pin open_clip_torch<4 or extend ctta.adapters.lora for this attention layout.")


def _layer_indices(layers, tower: str, n: int) -> list[int]:
    sel = layers.get(tower) if isinstance(layers, Mapping) else layers
    if sel is None:
        return list(range(n))
    out = []
    for i in sel:
        if not -n <= int(i) < n:
            raise IndexError(f"layer {i} out of range for the {tower} tower with {n} blocks")
        out.append(int(i) % n)
    return sorted(set(out))


def inject_lora(model: nn.Module, targets: Iterable[str] = TARGETS, layers: Sequence[int] | Mapping | None = None,
                towers: Iterable[str] = TOWERS, rank: int = 16, gated: bool = False,
                scaling: float = 1.0) -> list[LoRA]:
    """Wrap the selected targets of the selected blocks with fresh LoRAs; returns them (named ``tower.layer.target``).

    ``layers``: block indices for every tower (negative allowed), a mapping ``{tower: indices}``, or ``None`` for
    all blocks. Only the new LoRA parameters are trainable afterwards if the model was frozen before.
    """
    targets = tuple(dict.fromkeys(targets))
    towers = tuple(dict.fromkeys((towers,) if isinstance(towers, str) else towers))
    bad = sorted(set(targets) - set(TARGETS))
    if bad or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {list(targets)}")
    out: list[LoRA] = []
    for tower in towers:
        blocks = tower_blocks(model, tower)
        for i in _layer_indices(layers, tower, len(blocks)):
            block, where = blocks[i], f"{tower}.{i}"
            attn_t = [t for t in _ATTN if t in targets]
            if attn_t:
                _check_attention(block.attn, f"{where}.attn")
                W = block.attn.in_proj_weight
                d = W.shape[1]
                loras = {t: LoRA(d, block.attn.out_proj.out_features if t == "out" else d, rank, gated=gated,
                                 scaling=scaling, name=f"{where}.{t}", device=W.device, dtype=W.dtype)
                         for t in attn_t}
                block.attn = LoRAAttention(block.attn, loras)
                out += list(block.attn.lora.values())
            for t, child in (("fc", "c_fc"), ("proj", "c_proj")):
                if t not in targets:
                    continue
                lin = getattr(block.mlp, child, None)
                if isinstance(lin, LoRALinear):
                    raise RuntimeError(f"{where}.mlp.{child} already carries LoRA; call merge_and_remove() first")
                if not isinstance(lin, nn.Linear):
                    raise NotImplementedError(f"{where}.mlp.{child} is {type(lin).__name__}, not nn.Linear")
                lora = LoRA(lin.in_features, lin.out_features, rank, gated=gated, scaling=scaling,
                            name=f"{where}.{t}", device=lin.weight.device, dtype=lin.weight.dtype)
                setattr(block.mlp, child, LoRALinear(lin, lora))
                out.append(lora)
    return out


def lora_wrappers(model: nn.Module) -> list[tuple[nn.Module, str, _LoRAWrapper]]:
    """``(parent, attribute, wrapper)`` for every LoRA wrapper in the model, in module order."""
    return [(parent, name, child) for parent in _net(model).modules()
            for name, child in parent.named_children() if isinstance(child, _LoRAWrapper)]


def lora_modules(model: nn.Module) -> list[LoRA]:
    """Every `LoRA` in the model, in module order."""
    return [m for m in _net(model).modules() if isinstance(m, LoRA)]


@torch.no_grad()
def merge_and_remove(model: nn.Module) -> int:
    """Fold every LoRA into its base weight and put the original modules back (PEFT's ``merge_and_unload``).
    Afterwards the model has exactly the base model's parameters and modules. Returns the wrappers removed."""
    found = lora_wrappers(model)
    for parent, name, wrapper in found:
        wrapper.merge()
        for key in [k for k in wrapper._buffers if k.startswith("_unmerged_")]:
            delattr(wrapper, key)  # the backup for unmerge is not needed once the wrapper is gone
        setattr(parent, name, wrapper.base_layer)
    return len(found)


def remove_lora(model: nn.Module) -> int:
    """Discard every LoRA (unmerging first) and put the original modules back. Returns the wrappers removed."""
    found = lora_wrappers(model)
    for parent, name, wrapper in found:
        wrapper.unmerge()
        setattr(parent, name, wrapper.base_layer)
    return len(found)
