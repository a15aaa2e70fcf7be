"""Shared fixtures: a tiny random CLIP (fast, any open_clip code path) and small generated streams."""
from __future__ import annotations

import pytest
import torch

from ctta import Clip, ImageTensorDataset, LabelSpace, class_incremental

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def make_tiny_clip(seed: int = 0) -> Clip:
    torch.manual_seed(seed)
    return Clip.from_config(TINY_CONFIG, name="tiny-test")


@pytest.fixture
def tiny_clip() -> Clip:
    """A fresh random 2-layer CLIP (16x16 images) per test."""
    return make_tiny_clip()


def make_dataset(n: int, num_classes: int, seed: int = 0, size: int = 16) -> ImageTensorDataset:
    labels = torch.arange(n) % num_classes
    # class-dependent mean colour (the same for every split) so that learning is possible
    base = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    images = (base[labels] + 0.15 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return ImageTensorDataset(images, labels)


@pytest.fixture
def tiny_stream():
    """6 classes in 3 class-incremental tasks of 2 (train 60, test 30 images)."""
    space = LabelSpace([f"class {i}" for i in range(6)])
    return class_incremental(space, make_dataset(60, 6, seed=1), make_dataset(30, 6, seed=2), increment=2, seed=1)
