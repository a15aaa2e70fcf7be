"""Learnable prompt context over open_clip's text tower (CoOp / TPT prompt learner).

Prompt of class ``c``: ``[SOS] ctx_1 … ctx_n  <tokens of c>  <suffix> [EOS] [pad …]``, with the class token at the
end as in TPT (azshue/TPT ``clip/custom_clip.py::PromptLearner``, ``class_token_position="end"``). The context is
initialised from a phrase: ``ctx_init="a photo of a"`` gives ``n_ctx = 4`` vectors equal to the token embeddings of
those words, so the untuned prompt is exactly the text ``"a photo of a {c}."``. Without a phrase the context is
drawn from N(0, 0.02²) (CoOp's random init). ``class_specific=True`` gives every class its own context.

Only the context is trainable; the token table and the text tower stay frozen. The text forward
- trims padding to the longest prompt of the label space (exact: CLIP's text tower is causally masked and pools at
  the end-of-text token, so later positions never reach the pooled feature; ``trim=False`` runs the full context);
- runs the classes in chunks of ``chunk_size``; with gradients enabled and more classes than one chunk, every chunk
  runs under activation checkpointing: its forward keeps no activations, and the backward recomputes one chunk at a
  time and back-propagates that chunk's slice of the feature gradient. The context gradient is identical and the
  peak memory is set by the chunk size instead of the number of classes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ctta.model import Clip
from ctta.stream import LabelSpace

_PLACEHOLDER = "X"  # stands in for the context tokens when tokenising (its embedding is replaced)


class PromptLearner(nn.Module):
    """Learnable context vectors ``ctx [n_ctx, W]`` (or ``[n_classes, n_ctx, W]`` class-specific)."""

    def __init__(self, model: Clip, ctx_init: str | None = "a photo of a", *, n_ctx: int | None = None,
                 class_specific: bool = False, n_classes: int | None = None, suffix: str = ".",
                 chunk_size: int | None = 256):
        super().__init__()
        object.__setattr__(self, "model", model)  # a reference, not a submodule: the CLIP is not ours to save
        width = model.token_embedding.weight.shape[1]
        if ctx_init:
            words = ctx_init.replace("_", " ").strip()
            tok = model.tokenize([words])[0]
            k = int(model.eot_positions(tok[None])[0]) - 1  # tokens between SOS and EOT
            if k <= 0:
                raise ValueError(f"ctx_init {ctx_init!r} tokenises to no tokens")
            if n_ctx is not None and n_ctx != k:
                raise ValueError(f"n_ctx={n_ctx} contradicts ctx_init {ctx_init!r}, which has {k} tokens")
            with torch.no_grad():
                init = model.token_embedding(tok[1:1 + k]).detach().float().clone()
        else:
            if not n_ctx or n_ctx <= 0:
                raise ValueError("a random context needs n_ctx > 0 (or give ctx_init)")
            k = n_ctx
            init = torch.randn(k, width, device=model.device) * 0.02
        if class_specific:
            if not n_classes or n_classes <= 0:
                raise ValueError("class_specific context needs n_classes")
            init = init[None].repeat(n_classes, 1, 1)
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        self.ctx = nn.Parameter(init)
        self.n_ctx, self.class_specific, self.suffix, self.chunk_size = k, class_specific, suffix, chunk_size
        self.ctx_init = ctx_init
        self._cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    # ----------------------------------------------------------------------------------------- frozen parts
    def prompt_texts(self, classnames: Sequence[str]) -> list[str]:
        """The tokenised text of each class; the context positions hold placeholders."""
        lead = " ".join([_PLACEHOLDER] * self.n_ctx)
        return [f"{lead} {c.replace('_', ' ')}{self.suffix}" for c in classnames]

    def _frozen(self, classnames: tuple[str, ...], trim: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(SOS embeddings ``[C, 1, W]``, class+suffix+EOS(+pad) embeddings ``[C, L-1-n_ctx, W]``, eot ``[C]``),
        cached per label space while the token table is unchanged."""
        m = self.model
        w = m.token_embedding.weight
        key = (classnames, trim, id(w), w._version, w.device, w.dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        texts = self.prompt_texts(classnames)
        enc = getattr(m.tokenizer, "encode", None)
        ctx_len = getattr(m.tokenizer, "context_length", None)
        if enc is not None and ctx_len is not None:
            too_long = [c for c, t in zip(classnames, texts) if len(enc(t)) + 2 > ctx_len]
            if too_long:
                raise ValueError(f"prompts of {len(too_long)} classes exceed the text context of {ctx_len} tokens "
                                 f"(e.g. {too_long[0]!r}); shorten the class names or the context")
        tokens = m.tokenize(texts)
        eot = m.eot_positions(tokens)
        if trim:
            tokens = tokens[:, : int(eot.max()) + 1]
        with torch.no_grad():
            emb = m.token_embedding(tokens).detach()
        out = (emb[:, :1], emb[:, 1 + self.n_ctx:], eot)
        if len(self._cache) > 16:  # label spaces come and go in long streams; keep the cache small
            self._cache.clear()
        self._cache[key] = out
        return out

    # ----------------------------------------------------------------------------------------- forward
    def _embed(self, ctx: Tensor, prefix: Tensor, suffix: Tensor) -> Tensor:
        n = prefix.shape[0]
        c = ctx if ctx.dim() == 3 else ctx[None].expand(n, -1, -1)
        return torch.cat([prefix, c.to(prefix.dtype), suffix], dim=1)

    def _chunk_forward(self, ctx: Tensor, prefix: Tensor, suffix: Tensor, eot: Tensor) -> Tensor:
        return self.model.text_forward(self._embed(ctx, prefix, suffix), eot)

    def forward(self, space: LabelSpace | Sequence[str], *, trim: bool = True) -> Tensor:
        """L2-normalised prompt-conditioned class features ``[C, D]`` (differentiable w.r.t. ``ctx``)."""
        names = tuple(space.classnames if isinstance(space, LabelSpace) else space)
        if self.class_specific and len(names) != self.ctx.shape[0]:
            raise ValueError(f"class-specific context holds {self.ctx.shape[0]} classes, label space has {len(names)}")
        prefix, suffix, eot = self._frozen(names, trim)
        step = self.chunk_size or len(names)
        grad = torch.is_grad_enabled() and self.ctx.requires_grad
        outs = []
        for i in range(0, len(names), step):
            sl = slice(i, i + step)
            ctx = self.ctx[sl] if self.class_specific else self.ctx
            args = (ctx, prefix[sl], suffix[sl], eot[sl])
            if grad and len(names) > step:  # bounded memory: activations of one chunk at a time
                outs.append(checkpoint(self._chunk_forward, *args, use_reentrant=False))
            else:
                outs.append(self._chunk_forward(*args))
        return torch.cat(outs) if len(outs) > 1 else outs[0]
