"""A tiny random-init CLIP with open_clip's ``ModifiedResNet`` image tower (the CLIP RN50 family), never downloaded.

Random init leaves every BatchNorm at running mean 0 / variance 1 and the residual ``bn3`` scales at 0, which would
hide statistics bugs; `make_resnet_clip` draws them at random, as a pretrained checkpoint would have them."""
from __future__ import annotations

import torch
from torch import nn

from ctta import Clip
from tests.conftest import TINY_CONFIG, make_dataset

RESNET_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": dict(TINY_CONFIG["text_cfg"]),
}
RESNET_SIZE = 32  # input side: ModifiedResNet downsamples by 32


def make_resnet_clip(seed: int = 0) -> Clip:
    torch.manual_seed(seed)
    clip = Clip.from_config(RESNET_CONFIG, name="tiny-resnet-test")
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in clip.net.visual.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return clip


def resnet_images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, RESNET_SIZE, RESNET_SIZE, generator=torch.Generator().manual_seed(seed))


def resnet_dataset(n: int, num_classes: int, seed: int = 0):
    return make_dataset(n, num_classes, seed=seed, size=RESNET_SIZE)
