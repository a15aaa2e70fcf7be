"""What goes into and comes out of an adapter call: the model and label space a deployment hands over, input
checks and preprocessing, class subsets, and the `Prediction` returned."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ctta.data import check_images, pil_to_rgb
from ctta.model import Clip
from ctta.state import short
from ctta.stream import DEFAULT_TEMPLATES, LabelSpace, repeated
from ctta.views import check_source_side, eval_view, shrink_to

SOURCE_SIDE = 512  # whole images for view-cropping strategies: shrunk only above this shorter side (a cost bound;
#                    the ImageNet recipes' ``source_side``, which most ImageNet photographs, ~500x375, stay under)


@dataclass
class Prediction:
    """What one call returns. Tensors are detached, on the model's device."""

    logits: Tensor        # [B, C]
    probs: Tensor         # [B, C] softmax of logits
    index: Tensor         # [B] predicted class indices into the label space used
    classnames: list[str]  # [B] predicted class names
    entropy: Tensor       # [B] prediction entropy (nats)
    adapted: bool         # did the strategy adapt on this call (False while paused)
    skipped: int          # updates skipped on this call because the loss or gradient was non-finite
    reset: bool           # was the adapted state reset during this call (policy or drift signal)

    def head(self, n: int) -> "Prediction":
        """The first ``n`` rows (the per-image fields cut, the per-call ones kept): a padded call's own images."""
        return replace(self, logits=self.logits[:n], probs=self.probs[:n], index=self.index[:n],
                       classnames=self.classnames[:n], entropy=self.entropy[:n])


def as_clip(model: Clip | nn.Module, tokenizer: Callable | None = None) -> Clip:
    """A `Clip` as is, or an open_clip CLIP module (``open_clip.create_model...``) wrapped with its normalisation
    (``visual.image_mean/std``, OpenAI's otherwise) and ``tokenizer`` (default: CLIP's BPE at the model's context
    length; pass ``open_clip.get_tokenizer(arch)`` for models with another tokenizer)."""
    if isinstance(model, Clip):
        return model
    if not (isinstance(model, nn.Module) and hasattr(model, "encode_image") and hasattr(model, "visual")):
        raise TypeError(f"expected a ctta.Clip or an open_clip CLIP model, got {type(model).__name__}")
    import open_clip
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    if tokenizer is None:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=getattr(model, "context_length", 77))
    device = next(model.parameters()).device
    return Clip(model.eval(), tokenizer, mean=mean, std=std, source={"arch": type(model).__name__}).to(device)


def as_space(space: LabelSpace | Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> LabelSpace:
    if isinstance(space, LabelSpace):
        return space
    if isinstance(space, str) or not isinstance(space, Sequence):
        raise TypeError(f"space must be a LabelSpace or a list of class names, got {type(space).__name__}")
    return LabelSpace(list(space), templates)


def prepare_images(model: Clip, images: Any) -> Tensor:
    """A float batch ``[B, 3, H, W]`` in [0, 1] on the model's device, from a tensor, a PIL image or a list of PIL
    images (preprocessed with `Clip.preprocess`); anything else is refused with the reason. A tensor of another size
    is resized and centre-cropped to the model's input as `Clip.preprocess` does (`ctta.views.eval_view`). (A
    strategy that crops its own views from the whole image gets `prepare_sources` instead.)"""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty batch")
        if not all(hasattr(im, "convert") for im in images):
            raise TypeError("a list of images must hold PIL images; pass tensors as one [B, 3, H, W] tensor")
        images = torch.stack([model.preprocess(im) for im in images])
    elif hasattr(images, "convert"):  # one PIL image
        images = model.preprocess(images)[None]
    images = _float32(check_images(images))
    size = model.image_size
    if images.shape[-2:] != (size, size):
        images = eval_view(images, size)
    return images.to(model.device)


def _float32(images: Tensor) -> Tensor:
    """Float images of another precision (half, bfloat16, double) as float32, as the model's normalisation takes
    them (CPU resizes have no half-precision kernels)."""
    return images if images.dtype == torch.float32 else images.float()


def prepare_sources(model: Clip, images: Any, source_side: int = SOURCE_SIDE) -> list[Tensor]:
    """Whole images for a strategy that crops its own views from them (`Strategy.views_from_source`), as the
    reference augmenter crops them from the photograph: a PIL image is converted whole (not `Clip.preprocess`'s
    centre crop), aspect kept, and any image is shrunk (bicubic, antialiased) only when its shorter side is above
    ``source_side``. Accepts what `prepare_images` does, and a list of image tensors ``[3, H, W]`` as well. Images
    of different sizes cannot share a batch: the result is the images in order, in runs of equal size, each a float
    batch ``[b, 3, H, W]`` on the model's device."""
    check_source_side(source_side, model.image_size)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty batch")
        for k, im in enumerate(images):
            if not (hasattr(im, "convert") or (isinstance(im, Tensor) and im.dim() == 3)):
                what = f"a tensor of shape {tuple(im.shape)}" if isinstance(im, Tensor) else type(im).__name__
                raise TypeError(f"images[{k}] is {what}: a list of images must hold PIL images or image tensors "
                                f"[3, H, W]")
        items = [pil_to_rgb(im)[None] if hasattr(im, "convert") else im[None] for im in images]
    elif hasattr(images, "convert"):  # one PIL image
        items = [pil_to_rgb(images)[None]]
    else:
        items = [images]
    runs: list[list[Tensor]] = []
    for k, x in enumerate(items):
        x = shrink_to(_float32(check_images(x, what=f"images[{k}]" if len(items) > 1 else "images")), source_side)
        if runs and runs[-1][-1].shape[-2:] == x.shape[-2:]:
            runs[-1].append(x)
        else:
            runs.append([x])
    return [torch.cat(run).to(model.device) for run in runs]


def class_subset(space: LabelSpace, classes: Sequence[str] | None) -> LabelSpace:
    """``space`` restricted to ``classes`` (all of it for None); unknown names are refused."""
    if classes is None:
        return space
    if isinstance(classes, str):
        raise TypeError("classes must be a list of class names, not one string")
    classes = list(classes)  # a generator is read once
    if not classes:
        raise ValueError("classes is empty: name at least one class, or pass None for all of them")
    twice = repeated(classes)
    if twice:
        raise ValueError(f"classes names {twice[:5]!r} more than once")
    unknown = [c for c in classes if c not in space.classnames]
    if unknown:
        raise ValueError(f"unknown classes {unknown[:5]!r}: this adapter's label space is "
                         f"{short(list(space.classnames))}")
    return space.subset([space.index(c) for c in classes])


def make_prediction(logits: Tensor, space: LabelSpace, who: str, *, adapted: bool, skipped: int,
                    reset: bool) -> Prediction:
    """The `Prediction` of ``logits`` over ``space`` (``who``: the strategy, named if its logits are malformed)."""
    if logits.dim() != 2 or logits.shape[1] != len(space):
        raise RuntimeError(f"{who} returned logits of shape {tuple(logits.shape)}; "
                           f"expected [B, {len(space)}]")
    logits = logits.detach().float()
    # NaN or +inf would come back labelled as a class (argmax of NaN is an index); -inf rules a class out. One scan
    # in the common all-finite case; the rows are told apart only when something is not finite.
    bad = None if bool(torch.isfinite(logits).all()) else (
        torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1))
    if bad is not None and bool(bad.any()):
        raise FloatingPointError(
            f"{who} returned non-finite logits for {int(bad.sum())} of {len(logits)} images: its adapted state has "
            "diverged (too large a learning rate?); reset() returns to the anchor")
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    index = probs.argmax(-1)
    return Prediction(logits, probs, index, [space.classnames[i] for i in index.tolist()],
                      -(probs * logp).sum(-1), adapted, skipped, reset)
