"""Putting LoRA into open_clip towers and taking it out: `inject_lora` wraps the chosen linear maps and attention
projections of chosen blocks (`ctta.adapters.lora` holds the wrappers), `merge_and_remove` folds the updates into
the base weights, `remove_lora` drops them.

Towers: open_clip's transformers (ViT image tower, text tower: ``transformer.resblocks``), and ``ModifiedResNet``
image towers (CLIP RN50/RN101), whose one attention layer is the attention pool: there ``q``, ``k``, ``v``, ``out``
adapt ``attnpool.q_proj`` / ``k_proj`` / ``v_proj`` / ``c_proj`` (`LoRAAttentionPool`) and ``fc`` / ``proj`` are
skipped (the convolutional stages have no MLP); the pool counts as the tower's only block (layer 0 or -1)."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ctta.adapters.lora import (_ATTN, POOL_TARGETS, TARGETS, TOWERS, LoRA, LoRAAttention, LoRAAttentionPool,
                                LoRALinear, _LoRAWrapper)


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
                                  "transformers and ModifiedResNet's attention pool only (not timm / Hugging Face "
                                  "towers)")
    return blocks


def attention_pool(model: nn.Module, tower: str) -> nn.Module | None:
    """The attention pool of a ``ModifiedResNet`` image tower (wrapped or not); ``None`` for any other tower."""
    if tower != "visual":
        return None
    pool = getattr(_net(model).visual, "attnpool", None)
    if isinstance(pool, LoRAAttentionPool) or (
            pool is not None and all(isinstance(getattr(pool, a, None), nn.Linear) for a in POOL_TARGETS.values())):
        return pool
    return None


def _inject_pool(model: nn.Module, targets: tuple[str, ...], layers, rank: int, gated: bool,
                 scaling: float) -> list[LoRA]:
    """LoRA on the attention pool of a ``ModifiedResNet`` image tower (module docstring)."""
    visual = _net(model).visual
    kind = f"a {type(visual).__name__} (convolutional, CLIP RN50 family)"
    chosen = [t for t in POOL_TARGETS if t in targets]
    if not chosen:
        raise ValueError(f"the visual tower is {kind}: its only attention is the attention pool, where LoRA supports "
                         f"targets {tuple(POOL_TARGETS)} (fc / proj have no counterpart there); got targets "
                         f"{list(targets)}. Add an attention target or leave 'visual' out of towers")
    if not _layer_indices(layers, "visual", 1, f" ({kind}: its one attention layer, the attention pool, is 0 or -1)"):
        return []
    pool = visual.attnpool
    if isinstance(pool, LoRAAttentionPool):
        raise RuntimeError("visual.attnpool already carries LoRA; call merge_and_remove() before injecting again")
    loras = {}
    for t in chosen:
        lin = getattr(pool, POOL_TARGETS[t])
        loras[t] = LoRA(lin.in_features, lin.out_features, rank, gated=gated, scaling=scaling,
                        name=f"visual.attnpool.{t}", device=lin.weight.device, dtype=lin.weight.dtype)
    visual.attnpool = LoRAAttentionPool(pool, loras)
    return list(visual.attnpool.lora.values())


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


def _layer_indices(layers, tower: str, n: int, hint: str = "") -> list[int]:
    sel = layers.get(tower) if isinstance(layers, Mapping) else layers
    if sel is None:
        return list(range(n))
    out = []
    for i in sel:
        if not -n <= int(i) < n:
            raise IndexError(f"layer {i} out of range for the {tower} tower with {n} blocks{hint}")
        out.append(int(i) % n)
    return sorted(set(out))


def inject_lora(model: nn.Module, targets: Iterable[str] = TARGETS, layers: Sequence[int] | Mapping | None = None,
                towers: Iterable[str] = TOWERS, rank: int = 16, gated: bool = False,
                scaling: float = 1.0) -> list[LoRA]:
    """Wrap the selected targets of the selected blocks with fresh LoRAs; returns them (named ``tower.layer.target``).

    ``layers``: block indices for every tower (negative allowed), a mapping ``{tower: indices}``, or ``None`` for
    all blocks. Only the new LoRA parameters are trainable afterwards if the model was frozen before. On a
    ``ModifiedResNet`` image tower only the attention pool is adapted (``q``, ``k``, ``v``, ``out``; ``fc`` / ``proj``
    skipped there, and refused if nothing else is asked for).
    """
    targets = tuple(dict.fromkeys(targets))
    towers = tuple(dict.fromkeys((towers,) if isinstance(towers, str) else towers))
    bad = sorted(set(targets) - set(TARGETS))
    if bad or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {list(targets)}")
    out: list[LoRA] = []
    for tower in towers:
        if attention_pool(model, tower) is not None:
            out += _inject_pool(model, targets, layers, rank, gated, scaling)
            continue
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
