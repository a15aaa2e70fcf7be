"""Helpers for the training-free test-time strategies' tests: a stub CLIP whose features are set by the pixels,
so that cache admissions and reads can be computed by hand, and a deep state comparison."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ctta import LabelSpace


class StubClip:
    """A frozen 'CLIP' on 4×4 images: the image feature is ``normalize(2·x[:, :, 0, 0] − 1)`` (D = 3, set by the
    top-left pixel), the class head is a fixed ``[C, 3]`` matrix, ``logit_scale`` 100 (as the official codes)."""

    image_size = 4

    def __init__(self, head: Tensor):
        self.head = F.normalize(head.float(), dim=-1)
        self.device = torch.device("cpu")
        self.text_calls = 0

    def freeze(self) -> None:
        pass

    def text_head(self, space: LabelSpace) -> Tensor:
        self.text_calls += 1
        return self.head[: len(space)]

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(2 * images[:, :, 0, 0].float() - 1, dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        return torch.tensor(100.0)

    def logits(self, feats: Tensor, head: Tensor) -> Tensor:
        return self.logit_scale * feats @ head.t()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    @property
    def training(self) -> bool:
        return False


def images_for(features: list[list[float]]) -> Tensor:
    """4×4 images whose stub features are ``normalize(features)`` (each feature coordinate in [−1, 1])."""
    f = torch.tensor(features, dtype=torch.float32)
    return ((f + 1) / 2)[:, :, None, None].expand(-1, 3, 4, 4).contiguous()


def same_state(a: Any, b: Any) -> bool:
    """Deep equality of two state dicts (tensors compared exactly)."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def round_trip_check(make, model, space: LabelSpace, first: Tensor, rest: Tensor) -> None:
    """Adapt on ``first``; save the state; the remaining predictions of ``rest`` (one sample per call) equal those
    of a fresh strategy loaded with that state, of the original after reloading it, and of a torch.save round-trip
    with ``weights_only=True``."""
    import io
    s = make()
    s.setup(model)
    s.adapt(first, space)
    state = s.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    ref = torch.cat([s.adapt(rest[i:i + 1], space) for i in range(len(rest))])
    for st in (state, loaded):
        t = make()
        t.setup(model)
        t.load_state_dict(st)
        assert torch.allclose(torch.cat([t.adapt(rest[i:i + 1], space) for i in range(len(rest))]), ref, atol=1e-6)
    s.load_state_dict(state)  # the saved state was not aliased by the live one
    assert torch.allclose(torch.cat([s.adapt(rest[i:i + 1], space) for i in range(len(rest))]), ref, atol=1e-6)


@contextlib.contextmanager
def no_change(strategy):
    """Asserts that the strategy's state is the same after the block."""
    before = strategy.state_dict()
    import copy
    before = copy.deepcopy(before)
    yield
    assert same_state(before, strategy.state_dict())


def wrap_check(make, space: LabelSpace) -> None:
    """Through `ctta.wrap` with each reset policy: finite logits of the right shape, two resets give identical
    predictions, and an adapter's saved state (weights_only) loaded into a fresh adapter continues identically."""
    import io

    from ctta.online import wrap
    from tests.conftest import make_tiny_clip
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for reset in ("never", "episodic", 2):
        a = wrap(make_tiny_clip(), make(), space, reset=reset)
        for i in range(3):
            out = a(x[i:i + 1]).logits
            assert out.shape == (1, len(space)) and torch.isfinite(out).all(), reset
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        nxt = a(x[3:]).logits
        b = wrap(make_tiny_clip(), make(), space, reset=reset)
        buf.seek(0)
        b.load_state_dict(torch.load(buf, weights_only=True))
        assert torch.allclose(b(x[3:]).logits, nxt, atol=1e-5), reset
        a.reset()
        first = a.predict(x).logits
        a.reset()
        assert torch.equal(a.predict(x).logits, first), reset
        for adapter in (a, b):
            if hasattr(adapter, "close"):
                adapter.close()


def label_space_check(make) -> None:
    """The label-space rule every cache strategy shares (`ctta.strategies._cache.ensure_space`), on the stub with
    head ``eye(3)``: state built on space A (2 classes) is keyed by A's fingerprint; predicting on another space
    (of another size, or of the same size with other names) answers exactly as a fresh strategy does and leaves
    the held state untouched; adapting there raises; the key survives a state round trip."""
    import pytest
    a, same_size, bigger = LabelSpace(["a", "b"]), LabelSpace(["c", "d"]), LabelSpace(["a", "b", "c"])
    x = images_for([[1.0, 0.2, 0.0], [0.1, 1.0, 0.0]])
    s = make()
    s.adapt(x, a)
    s.adapt(images_for([[0.9, 0.0, 0.3]]), a)
    for other in (same_size, bigger):
        with no_change(s):
            got = s.predict(x, other)
        assert torch.equal(got, make().predict(x, other)), other
        with pytest.raises(ValueError, match="2-class label space.*reset"), no_change(s):
            s.adapt(x, other)
    held = s.predict(x, a)
    assert not torch.equal(held, make().predict(x, a))  # the state does change the prediction on A
    t = make()
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.predict(x, a), held)
    with pytest.raises(ValueError, match="reset"):
        t.adapt(x, same_size)
