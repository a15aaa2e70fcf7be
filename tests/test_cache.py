"""FeatureCache: exact features, one encoder pass per distinct image, invalidation, bounds, persistence."""
import pytest
import torch
import torch.nn.functional as F

from ctta import AccuracyMatrix, run
from ctta.cache import FeatureCache, encode_raw, image_keys
from ctta.strategies import ZeroShot
from ctta.strategies.rapf import RAPF
from tests.conftest import make_tiny_clip


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class ImageCounter:
    """Counts images through the image tower, independently of the cache's own counters."""

    def __init__(self, model):
        self.n = 0
        model.net.visual.register_forward_pre_hook(lambda mod, args: setattr(self, "n", self.n + args[0].shape[0]))


def test_cached_features_equal_fresh_raw_features_and_normalise_to_encode_image(tiny_clip):
    x = images(5)
    cache = FeatureCache()
    first, again = cache.encode(tiny_clip, x), cache.encode(tiny_clip, x)
    raw = encode_raw(tiny_clip, x)
    assert torch.allclose(first, raw, atol=1e-6) and torch.equal(first, again)
    assert torch.allclose(F.normalize(first, dim=-1), tiny_clip.encode_image(x), atol=1e-6)
    assert raw.norm(dim=-1).sub(1).abs().max() > 1e-3  # raw: not normalised
    assert cache.stats()["hits"] == 5 and cache.stats()["misses"] == 5 and cache.forwards == 1


def test_only_unseen_images_are_encoded_and_duplicates_in_a_batch_once(tiny_clip):
    count = ImageCounter(tiny_clip)
    cache = FeatureCache()
    x = images(6)
    cache.encode(tiny_clip, x[:4])
    assert count.n == 4
    out = cache.encode(tiny_clip, torch.cat([x[2:], x[5:6], x[5:6]]))  # 2 hits, 2 new, one new image 3 times
    assert count.n == 6 and cache.encoded == 6 and len(cache) == 6
    assert torch.allclose(out, encode_raw(tiny_clip, torch.cat([x[2:], x[5:6], x[5:6]])), atol=1e-6)


def test_keys_are_content_addressed():
    x = images(3)
    k = image_keys(x)
    assert len(set(k)) == 3 and image_keys(x.clone()) == k
    y = x.clone()
    y[1, 0, 0, 0] = torch.nextafter(y[1, 0, 0, 0], torch.tensor(2.0))  # one ulp in one pixel
    assert image_keys(y)[1] != k[1] and image_keys(y)[0] == k[0]
    big = torch.rand(5, 3, 224, 224, generator=torch.Generator().manual_seed(1))  # hashed on the thread pool
    assert image_keys(big) == [image_keys(big[i:i + 1])[0] for i in range(5)]


def test_encoder_runs_once_per_sample_across_epochs_tasks_and_evaluations(tiny_stream):
    def count(cache: bool) -> tuple[int, RAPF]:
        model = make_tiny_clip()
        counter = ImageCounter(model)
        strategy = RAPF(epochs=3, batch_size=8, cache=cache)
        run(model, strategy, tiny_stream, [AccuracyMatrix()])
        return counter.n, strategy

    n_cached, s = count(True)
    n_plain, _ = count(False)
    distinct = 60 + 30  # train + test images of the stream
    assert n_cached == distinct + 1  # + the one probe image setup() uses to read the feature size
    assert s.cache.encoded == distinct and s.cache.invalidations == 0
    # without the cache: 3 epochs + statistics pass over train, 3 x 3 evaluations over test sets of 10
    assert n_plain == 60 * 4 + 3 * 30 + 1


def test_visual_weight_change_invalidates_text_change_does_not(tiny_clip):
    x = images(4)
    cache = FeatureCache()
    before = cache.encode(tiny_clip, x)
    with torch.no_grad():
        next(p for p in tiny_clip.text_parameters()).add_(1.0)
    cache.encode(tiny_clip, x)
    assert cache.invalidations == 0 and cache.forwards == 1
    with torch.no_grad():
        tiny_clip.net.visual.conv1.weight.mul_(1.5)  # in place: the version counter moves
    after = cache.encode(tiny_clip, x)
    assert cache.invalidations == 1 and cache.forwards == 2
    assert not torch.allclose(after, before) and torch.allclose(after, encode_raw(tiny_clip, x), atol=1e-6)
    proj = tiny_clip.net.visual.proj
    proj.data = proj.data * 2  # rebinding storage keeps the version counter; the storage pointer changes
    assert torch.allclose(cache.encode(tiny_clip, x), encode_raw(tiny_clip, x), atol=1e-6)
    assert cache.invalidations == 2
    other = make_tiny_clip(seed=1)  # another model: another cache state
    assert torch.allclose(cache.encode(other, x), encode_raw(other, x), atol=1e-6) and cache.invalidations == 3


def test_features_are_eval_mode_and_model_mode_is_restored():
    model = make_tiny_clip()
    model.net.visual.transformer.resblocks[0].attn.dropout = 0.5  # make train mode visibly different
    model.net.train()
    x = images(3)
    out = FeatureCache().encode(model, x)
    assert model.net.training
    model.net.eval()
    assert torch.allclose(out, encode_raw(model, x))


def test_bounded_cache_evicts_least_recently_used_and_stays_exact(tiny_clip):
    x = images(6)
    cache = FeatureCache(max_items=4)
    cache.encode(tiny_clip, x[:4])
    cache.encode(tiny_clip, x[0:1])  # touch 0: now 1 is the least recently used
    out = cache.encode(tiny_clip, x[4:6])
    assert len(cache) == 4 and cache.evictions == 2 and cache._store.shape[0] == 4
    cache.encode(tiny_clip, x[0:1])
    assert cache.encoded == 6  # 0 survived
    cache.encode(tiny_clip, x[1:2])
    assert cache.encoded == 7  # 1 was evicted
    big = cache.encode(tiny_clip, images(9, seed=3))  # more misses than capacity in one batch
    assert torch.allclose(big, encode_raw(tiny_clip, images(9, seed=3)), atol=1e-6) and len(cache) == 4
    assert torch.allclose(out, encode_raw(tiny_clip, x[4:6]), atol=1e-6)


def test_save_and_load_round_trip_and_refuse_other_weights(tiny_clip, tmp_path):
    x = images(5)
    cache = FeatureCache()
    ref = cache.encode(tiny_clip, x)
    path = cache.save(tmp_path / "feats.pt", tiny_clip)
    fresh = FeatureCache()
    assert fresh.load(path, tiny_clip) == 5
    assert torch.equal(fresh.encode(tiny_clip, x), ref) and fresh.forwards == 0
    with pytest.raises(ValueError, match="other image-encoder weights"):
        FeatureCache().load(path, make_tiny_clip(seed=3))


def test_zeroshot_cache_gives_identical_predictions_and_encodes_each_test_image_once(tiny_stream):
    results, counts = {}, {}
    for cache in (True, False):
        model = make_tiny_clip()
        counter = ImageCounter(model)
        results[cache] = run(model, ZeroShot(cache=cache), tiny_stream, [AccuracyMatrix()])["accuracy_matrix"]
        counts[cache] = counter.n
    assert results[True] == results[False]
    assert counts[True] == 30 and counts[False] == 3 * 30


def test_bad_input_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="max_items"):
        FeatureCache(max_items=0)
    with pytest.raises(TypeError, match="float"):
        FeatureCache().encode(tiny_clip, (images(2) * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="16x16"):
        FeatureCache().encode(tiny_clip, torch.rand(2, 3, 8, 8))
