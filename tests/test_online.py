"""OnlineAdapter: reset policies, pause, persistence, thread safety, input validation, non-finite guard; TENT."""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from PIL import Image

from ctta import LabelSpace, Strategy
from ctta.io import safe_torch_load
from ctta.online import OnlineAdapter, wrap
from ctta.state import clone_tree
from ctta.strategies.tent import Tent, softmax_entropy
from ctta.strategies.zeroshot import ZeroShot
from tests.conftest import make_tiny_clip

SPACE = LabelSpace([f"class {i}" for i in range(4)])


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def adapter(reset="never", drift=None, lr: float = 5e-2, seed: int = 0) -> OnlineAdapter:
    return wrap(make_tiny_clip(seed), Tent(lr=lr), SPACE, reset=reset, drift=drift)


def trainable(a: OnlineAdapter) -> dict:
    return a.model.trainable_state()


def same(d1: dict, d2: dict) -> bool:
    return d1.keys() == d2.keys() and all(torch.equal(d1[k], d2[k]) for k in d1)


# --------------------------------------------------------------------------------------------- TENT itself
def test_tent_loss_is_mean_softmax_entropy_on_hand_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(1.0), math.log(3.0)]])
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.5623
    assert softmax_entropy(logits).tolist() == pytest.approx([math.log(2), h2])
    assert float(Tent().loss(logits)) == pytest.approx((math.log(2) + h2) / 2)


def test_tent_updates_only_image_tower_norms_and_returns_pre_update_logits():
    clip = make_tiny_clip()
    before = {n: p.detach().clone() for n, p in clip.net.named_parameters()}
    tent = Tent(lr=1e-2)
    tent.setup(clip)
    x = images()
    expected = tent.predict(x, SPACE)
    out = tent.adapt(x, SPACE)
    assert torch.allclose(out, expected, atol=1e-6)  # the reference returns the forward before the update
    changed = {n for n, p in clip.net.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("visual.") and ("ln" in n or "norm" in n) for n in changed), changed
    assert set(tent.param_names) >= changed
    assert tent.optimizer.defaults["lr"] == 1e-2 and Tent().lr == 1e-3 and Tent().betas == (0.9, 0.999)
    assert not torch.equal(tent.predict(x, SPACE), expected)


# --------------------------------------------------------------------------------------------- reset policies
def test_never_keeps_adapting_episodic_restarts_every_call():
    x = images()
    online, episodic = adapter("never"), adapter("episodic")
    o1, o2 = online(x), online(x)
    assert not torch.allclose(o1.logits, o2.logits)  # the state moved
    e1, e2, e3 = episodic(x), episodic(x), episodic(x)
    assert torch.equal(e1.logits, e2.logits) and torch.equal(e2.logits, e3.logits)
    assert torch.equal(e1.logits, o1.logits)
    assert episodic.resets == 3 and online.resets == 0 and e2.reset and not o2.reset


def test_reset_every_k_samples():
    a, b = images(1, 1), images(1, 2)
    ad = adapter(2)
    outs = [ad(x).logits for x in (a, b, a, b, a)]
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3]) and torch.equal(outs[0], outs[4])
    assert not torch.allclose(outs[0], adapter(2)(b).logits)  # sanity: inputs differ
    assert ad.resets == 2 and ad.samples == 5


def test_drift_signal_receives_stats_and_triggers_reset():
    seen = []

    def drift(stats: dict) -> bool:
        seen.append(stats)
        return stats["samples"] == 4

    ad, ref = adapter(drift=drift), adapter()
    x = images()
    p1 = ad(x)
    assert seen[0]["entropy"] == pytest.approx(float(p1.entropy.mean()))
    assert 0 < seen[0]["entropy_normalized"] <= 1 and 0.25 <= seen[0]["confidence"] <= 1
    p2 = ad(x)
    assert p2.reset and ad.resets == 1 and seen[1]["samples_since_reset"] == 4
    assert torch.equal(ad(x).logits, ref(x).logits)  # the call after a drift reset starts from the anchor


def test_reset_restores_small_snapshot_without_aliasing():
    ad = adapter()
    anchor0 = clone_tree(ad._anchor.model_state)
    x = images()
    first = ad(x).logits
    for _ in range(2):
        ad(x)
        ad.reset()
        assert same(trainable(ad), anchor0)
        assert len(ad.strategy.optimizer.state) == 0  # Adam moments back to pristine
        assert torch.equal(ad(x).logits, first)  # two resets give identical outputs
    assert same(ad._anchor.model_state, anchor0)  # adapting after a restore never wrote into the anchor
    snap = sum(v.numel() for v in ad._anchor.model_state.values())
    assert 0 < snap < sum(p.numel() for p in ad.model.parameters()) / 50  # LayerNorm affines, not the CLIP


def test_episodic_rests_at_the_anchor_between_calls_and_says_it_reset():
    x, y = images(), images(2, 7)
    ad = adapter("episodic")
    anchor_pred = ad.predict(x).logits
    out = ad(y)
    assert out.reset and out.adapted
    assert same(trainable(ad), ad._anchor.model_state)  # resting at the anchor, not in the last call's state
    assert torch.equal(ad.predict(x).logits, anchor_pred)
    assert len(ad.strategy.optimizer.state) == 0


def test_a_strategy_never_owns_reset():
    import ctta.strategies as S
    for name in S.__all__:
        cls = getattr(S, name)
        assert not hasattr(cls, "reset"), f"{name} has its own reset(): the adapter is the one owner of reset"
        assert not hasattr(cls, "reset_every") and "reset_every" not in cls.__init__.__code__.co_varnames


def test_two_adapters_on_one_clip_are_refused_until_closed():
    import copy
    clip = make_tiny_clip()
    first = wrap(clip, Tent(), SPACE)
    with pytest.raises(ValueError, match="already held by another OnlineAdapter"):
        wrap(clip, Tent(), SPACE)
    with pytest.raises(ValueError, match="already held"):
        wrap(clip.net, Tent(), SPACE)  # the same network under a new Clip wrapper
    wrap(copy.deepcopy(clip), Tent(), SPACE)  # a copy is fine
    first.close()
    second = wrap(clip, Tent(), SPACE)
    with pytest.raises(ValueError, match="set up on another model"):
        wrap(make_tiny_clip(), second.strategy, SPACE)


def test_bad_policy_is_rejected():
    for bad in ("sometimes", 0, -3, True):
        with pytest.raises(ValueError, match="reset must be"):
            adapter(bad)
    with pytest.raises(ValueError, match="reset must be"):
        adapter(None).__class__(make_tiny_clip(), Tent(), SPACE, reset="sometimes")
    with pytest.raises(TypeError, match="drift"):
        adapter(drift=3)


# --------------------------------------------------------------------------------------------- pause
def test_paused_serves_without_changing_state():
    ad = adapter()
    x = images()
    ad(x)
    before, opt = trainable(ad), clone_tree(ad.strategy.state_dict())
    with ad.paused():
        p = ad(x)
        q = ad.predict(x)
    assert not p.adapted and torch.equal(p.logits, q.logits)
    assert same(trainable(ad), before) and ad.samples == 2 and ad.calls == 1
    assert torch.equal(opt["optimizer"]["state"][0]["exp_avg"], ad.strategy.state_dict()["optimizer"]["state"][0]["exp_avg"])
    assert ad(x).adapted and not same(trainable(ad), before)


# --------------------------------------------------------------------------------------------- persistence
def test_state_round_trip_through_a_weights_only_file(tmp_path):
    x = images()
    ad = adapter()
    for k in range(3):
        ad(images(2, k))
    path = ad.save(tmp_path / "adapted.pt")
    raw = safe_torch_load(path)  # content hash verified, weights_only: no arbitrary unpickling
    assert raw["counters"]["samples"] == 6 and not list(tmp_path.glob(".*tmp"))
    fresh = adapter()
    fresh.load(path)
    assert same(trainable(fresh), trainable(ad)) and fresh.samples == 6
    assert torch.equal(fresh(x).logits, ad(x).logits)  # same outputs, same next update (Adam state restored)
    assert torch.equal(fresh(x).logits, ad(x).logits)
    fresh.reset()  # the anchor is still the pristine model, not the loaded state
    assert torch.equal(fresh(x).logits, adapter()(x).logits)


def test_loading_a_foreign_state_names_the_mismatch():
    state = adapter().state_dict()
    other = wrap(make_tiny_clip(), Tent(lr=5e-2), ["cat", "dog"])
    with pytest.raises(ValueError, match="classnames"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({"model": {}})
    with pytest.raises(ValueError, match=r"config differs: lr 0.05 -> 0.001"):
        wrap(make_tiny_clip(), Tent(), SPACE).load_state_dict(state)


# --------------------------------------------------------------------------------------------- threads
class Racy(Strategy):
    """Read-modify-write of a buffer with a pause in the middle: loses updates unless calls are serialised."""

    learns = False

    def setup(self, model) -> None:
        super().setup(model)
        self.total = torch.zeros(())

    def adapt(self, images, space):
        seen = self.total.clone()
        time.sleep(0.002)
        self.total = seen + images.mean()
        return torch.zeros(len(images), len(space))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.total = state["total"]


def test_concurrent_callers_are_serialised():
    ad = wrap(make_tiny_clip(), Racy(), SPACE)
    batches = [images(1, k) for k in range(40)]
    errors = []

    def worker(chunk):
        try:
            for x in chunk:
                assert ad(x).logits.shape == (1, 4)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(batches[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ad.samples == 40 and ad.calls == 40
    assert float(ad.strategy.total) == pytest.approx(float(sum(x.mean() for x in batches)), rel=1e-5)


# --------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(3, 16, 16), ValueError, r"images\[None\]"),
    (torch.rand(2, 1, 16, 16), ValueError, "3 channels"),
    ((torch.rand(2, 3, 16, 16) * 255).to(torch.uint8), TypeError, "255"),
    (torch.full((2, 3, 16, 16), float("nan")), ValueError, "non-finite"),
    (torch.rand(0, 3, 16, 16), ValueError, "empty"),
    ([], ValueError, "empty"),
    ([torch.rand(3, 16, 16)], TypeError, "PIL"),
    ("cat.jpg", TypeError, "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors_and_change_nothing(bad, error, match):
    ad = adapter()
    before = trainable(ad)
    with pytest.raises(error, match=match):
        ad(bad)
    assert same(trainable(ad), before) and ad.samples == 0


def test_a_tensor_of_another_size_is_preprocessed_or_kept_whole_for_a_view_strategy():
    """Another size used to be refused; now it is resized and centre-cropped as Clip.preprocess does a PIL image,
    and a strategy that crops its own views (TDA here) gets the whole image, as the reference crops from the photo."""
    from ctta.strategies.tda import TDA
    from ctta.views import eval_view
    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    zs = wrap(make_tiny_clip(), ZeroShot(), SPACE)
    assert torch.allclose(zs(x).logits, zs(eval_view(x, 16)).logits)
    zs.close()
    seen = []

    class Seeing(TDA):
        def _run(self, images, space, adapt):
            seen.append(tuple(images.shape))
            return super()._run(images, space, adapt)

    ad = wrap(make_tiny_clip(), Seeing(n_views=3, augmix=False), SPACE)
    ad(x)
    assert seen == [(1, 3, 24, 40)]


def test_label_space_validation():
    ad = adapter()
    with pytest.raises(ValueError, match="unknown classes"):
        ad(images(), classes=["class 0", "zebra"])
    with pytest.raises(TypeError, match="list of class names"):
        ad(images(), classes="class 0")
    with pytest.raises(TypeError, match="LabelSpace or a list"):
        wrap(make_tiny_clip(), Tent(), "cat")
    with pytest.raises(ValueError, match="duplicate"):
        wrap(make_tiny_clip(), Tent(), ["cat", "cat"])
    out = ad(images(), classes=["class 3", "class 1"])
    assert out.logits.shape == (2, 2) and set(out.classnames) <= {"class 3", "class 1"}


def test_pil_images_are_preprocessed():
    ad = adapter()
    pil = Image.fromarray((torch.rand(40, 30, 3) * 255).to(torch.uint8).numpy())
    one, two = ad.predict(pil), ad.predict([pil, pil])
    assert one.logits.shape == (1, 4) and two.logits.shape == (2, 4)
    assert torch.allclose(two.logits[0], one.logits[0], atol=1e-5)
    assert one.classnames[0] in SPACE.classnames and torch.allclose(one.probs.sum(-1), torch.ones(1))


def test_wrap_accepts_a_plain_open_clip_model():
    clip = make_tiny_clip()
    x = images()
    ref = wrap(clip, ZeroShot(), SPACE).predict(x).logits
    plain = wrap(make_tiny_clip().net, ZeroShot(), SPACE).predict(x).logits
    assert torch.allclose(plain, ref, atol=1e-5)
    with pytest.raises(TypeError, match="open_clip"):
        wrap(torch.nn.Linear(2, 2), Tent(), SPACE)


# --------------------------------------------------------------------------------------------- non-finite guard
class NaNTent(Tent):
    def loss(self, logits):
        return super().loss(logits) * float("nan")


def test_non_finite_loss_leaves_model_unchanged_and_is_counted():
    ad = wrap(make_tiny_clip(), NaNTent(lr=1e-2), SPACE)
    before, opt = trainable(ad), clone_tree(ad.strategy.state_dict())
    out = ad(images())
    assert out.skipped == 1 and ad.skipped_steps == 1 and out.adapted
    assert torch.isfinite(out.logits).all()
    assert same(trainable(ad), before) and len(ad.strategy.optimizer.state) == len(opt["optimizer"]["state"]) == 0
    ad(images())
    assert ad.skipped_steps == 2 and ad.state_dict()["strategy"]["skipped_steps"] == 2


# --------------------------------------------------------------------------------------------- any strategy: TPT
def test_tpt_behind_the_adapter_persists_and_resets(tmp_path):
    from ctta.strategies.tpt import TPT
    x = images(1)
    ad = wrap(make_tiny_clip(), TPT(n_views=7), SPACE, reset="never")
    ctx0 = ad.strategy.prompts.ctx.detach().clone()
    ad(x)
    ad(images(1, 5))
    assert not torch.equal(ad.strategy.prompts.ctx, ctx0)
    fresh = wrap(make_tiny_clip(), TPT(n_views=7), SPACE, reset="never")
    fresh.load(ad.save(tmp_path / "tpt.pt"))
    assert torch.equal(fresh(x).logits, ad(x).logits)  # context, AdamW moments and view generator restored
    ad.reset()
    assert torch.equal(ad.strategy.prompts.ctx, ctx0) and ad.resets == 1


def test_tpt_defaults_to_episodic_and_reports_it():
    from ctta.strategies.tpt import TPT
    ad = wrap(make_tiny_clip(), TPT(n_views=7), SPACE)
    assert ad.reset_policy == "episodic"
    ctx0 = ad.strategy.prompts.ctx.detach().clone()
    out = ad(images(3))  # three episodes, one per image
    assert out.reset and out.logits.shape == (3, 4)
    assert torch.equal(ad.strategy.prompts.ctx, ctx0)  # resting at the initial prompt between calls
    # each image of a batch is tuned from the anchor: the same as three calls of one image each (same positions)
    single = wrap(make_tiny_clip(), TPT(n_views=7), SPACE)
    parts = [single(images(3)[i:i + 1], position=i).logits for i in range(3)]
    assert torch.allclose(torch.cat(parts), out.logits, atol=1e-6)


def test_loading_a_differently_configured_strategy_is_refused_and_changes_nothing(tmp_path):
    from ctta.strategies.tpt import TPT
    src = wrap(make_tiny_clip(), TPT(n_views=7, n_ctx=4, ctx_init=""), SPACE, reset="never")
    src(images(1))
    path = src.save(tmp_path / "a.pt")
    dst = wrap(make_tiny_clip(), TPT(n_views=7, n_ctx=2, ctx_init=""), SPACE, reset="never")
    dst(images(1, 3))
    before, ctx = trainable(dst), dst.strategy.prompts.ctx.detach().clone()
    with pytest.raises(ValueError, match="n_ctx"):
        dst.load(path)
    assert same(trainable(dst), before) and torch.equal(dst.strategy.prompts.ctx, ctx)


def test_a_load_that_fails_half_way_is_rolled_back():
    class Fragile(Tent):
        fail = False

        def load_state_dict(self, state):
            super().load_state_dict(state)
            if self.fail:  # fails once, after it has overwritten its state
                self.fail = False
                raise RuntimeError("disk on fire")

    ad = wrap(make_tiny_clip(), Fragile(lr=1e-2), SPACE)
    ad(images())
    state = ad.state_dict()
    ad(images(2, 4))
    before, opt = trainable(ad), clone_tree(ad.strategy.state_dict())
    ad.strategy.fail = True
    with pytest.raises(RuntimeError, match="disk on fire"):  # not a malformed value: passed on as it is
        ad.load_state_dict(state)
    assert same(trainable(ad), before)
    assert torch.equal(ad.strategy.state_dict()["optimizer"]["state"][0]["exp_avg"],
                       opt["optimizer"]["state"][0]["exp_avg"])


# --------------------------------------------------------------------------------------------- class subsets
def test_a_class_subset_call_neither_locks_nor_drops_a_keyed_state():
    """TDA's caches are keyed by class: a subset call adapts over the whole space and reads the subset's columns,
    so a later full call works and a paused subset call answers from the adapted caches."""
    from ctta.strategies.tda import TDA
    ad = wrap(make_tiny_clip(), TDA(n_views=0, augmix=False), SPACE)
    sub = ["class 3", "class 1"]
    first = ad(images(2, 0), classes=sub)
    assert set(first.classnames) <= set(sub) and first.logits.shape == (2, 2)
    assert ad.strategy.cache.n_classes == len(SPACE) and len(ad.strategy.cache) > 0
    ad(images(2, 1))  # the whole space after a subset: accepted, same caches
    x = images(3, 2)
    full, part = ad.predict(x), ad.predict(x, classes=sub)
    assert torch.equal(part.logits, full.logits[:, [3, 1]])


def test_the_classes_argument_is_read_once_and_checked():
    ad = wrap(make_tiny_clip(), ZeroShot(), SPACE)
    out = ad(images(), classes=(c for c in ["class 2", "class 0"]))  # a generator
    assert set(out.classnames) <= {"class 2", "class 0"} and out.logits.shape == (2, 2)
    with pytest.raises(ValueError, match="more than once"):
        ad(images(), classes=["class 1", "class 1"])
    with pytest.raises(ValueError, match="classes is empty"):
        ad(images(), classes=[])


# --------------------------------------------------------------------------------------------- malformed states
def _tent_state():
    ad = adapter()
    ad(images(2, 0))
    return ad.state_dict()


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.pop("counters"), "'counters' is missing"),
    (lambda s: s["counters"].update(calls="x"), "'counters' must hold the integers"),
    (lambda s: s.update(fingerprint=[1, 2]), "'fingerprint' is missing or not a dict"),
    (lambda s: s["strategy"].update(steps=None), "steps must be a count"),
    (lambda s: s["model"].update({k: torch.full_like(v, float("nan")) for k, v in list(s["model"].items())[:1]}),
     "NaN or infinite"),
    (lambda s: s["model"].update({k: v.long() for k, v in list(s["model"].items())[:1]}), "torch.int64 tensor"),
])
def test_a_malformed_state_is_refused_before_anything_changes(edit, match):
    state = _tent_state()
    edit(state)
    ad = adapter()
    ad(images(2, 5))
    before, opt = trainable(ad), clone_tree(ad.strategy.state_dict()["optimizer"])
    with pytest.raises(ValueError, match=match):
        ad.load_state_dict(state)
    assert same(trainable(ad), before) and ad.samples == 2
    assert torch.equal(ad.strategy.state_dict()["optimizer"]["state"][0]["exp_avg"], opt["state"][0]["exp_avg"])


def test_a_fresh_adapter_refuses_optimizer_moments_of_the_wrong_shape():
    """Before its first step an optimizer's state is empty, so the structural check cannot see the moments' shapes;
    without the optimizer check the load was accepted and every later call failed."""
    state = _tent_state()
    moments = state["strategy"]["optimizer"]["state"][0]
    moments["exp_avg"] = torch.zeros(3)
    fresh = adapter()
    with pytest.raises(ValueError, match=r"exp_avg of parameter 0 has shape \(3,\)"):
        fresh.load_state_dict(state)
    assert fresh.samples == 0
    fresh(images())  # still works


def test_non_finite_logits_are_refused_not_labelled():
    """NaN logits used to come back as an ordinary prediction of class 0."""
    class Diverged(ZeroShot):
        def predict(self, images, space):
            out = super().predict(images, space)
            out[0, 1] = float("nan")
            return out

    ad = wrap(make_tiny_clip(), Diverged(), SPACE)
    with pytest.raises(FloatingPointError, match="non-finite logits for 1 of 2 images.*reset"):
        ad(images())

    class RulesOut(ZeroShot):  # -inf rules a class out and is fine
        def predict(self, images, space):
            out = super().predict(images, space)
            out[:, 0] = float("-inf")
            return out

    assert wrap(make_tiny_clip(), RulesOut(), SPACE)(images()).probs[:, 0].eq(0).all()


def test_a_raising_drift_callable_does_not_lose_the_prediction(caplog):
    def broken(stats):
        raise KeyError("entropy_normalised")

    ad = adapter(drift=broken)
    out = ad(images())
    assert out.logits.shape == (2, 4) and not out.reset and ad.samples == 2
    assert "the drift callable raised" in caplog.text and "entropy_normalised" in caplog.text


class _Sources(ZeroShot):
    """A zero-shot that crops its own views, so it is handed whole images: records what it gets."""

    views_from_source = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def adapt(self, images, space):
        from ctta.views import eval_view
        self.seen.append(tuple(images.shape))
        return super().adapt(eval_view(images, self.model.image_size), space)  # view 0, as a view strategy's

    def predict(self, images, space):
        from ctta.views import eval_view
        return super().predict(eval_view(images, self.model.image_size), space)


def _pil(h: int, w: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_a_view_strategy_gets_pil_images_whole_and_mixed_sizes_as_calls_in_order():
    """Clip.preprocess's centre crop would drop the photograph's sides, which the reference augmenter crops views
    from; images of different sizes cannot share a batch, so they run as consecutive calls, answered in order."""
    from ctta.data import pil_to_rgb
    from ctta.views import shrink_to
    a, b, c = _pil(40, 30, 1), _pil(40, 30, 2), _pil(20, 50, 3)
    s = _Sources()
    ad = wrap(make_tiny_clip(), s, SPACE, source_side=24)
    out = ad([a, b, c, a])
    # 30x40 shrunk to a 24-px shorter side (32x24); 50x20 is under 24 and stays whole
    assert s.seen == [(2, 3, 32, 24), (1, 3, 20, 50), (1, 3, 32, 24)]
    assert ad.samples == 4 and ad.calls == 1 and out.logits.shape == (4, 4)
    ref = wrap(make_tiny_clip(), ZeroShot(), SPACE)  # zero-shot on the whole image's eval view, image by image
    from ctta.views import eval_view
    for k, im in enumerate([a, b, c, a]):
        whole = shrink_to(pil_to_rgb(im)[None], 24)
        assert torch.allclose(out.logits[k], ref(eval_view(whole, 16)).logits[0], atol=1e-5)
    # tensors [3, H, W] of several sizes are accepted too; a lone PIL image is kept whole
    s.seen.clear()
    ad([pil_to_rgb(c), pil_to_rgb(a)])
    ad(a)
    assert s.seen == [(1, 3, 20, 50), (1, 3, 32, 24), (1, 3, 32, 24)]
    with pytest.raises(ValueError, match="source_side must be an integer >= the model's image size"):
        wrap(make_tiny_clip(), _Sources(), SPACE, source_side=8)
    with pytest.raises(TypeError, match="PIL images or image tensors"):
        ad([a, "b"])


def test_a_view_strategy_behind_an_episodic_policy_counts_positions_across_size_runs():
    s = _Sources()
    ad = wrap(make_tiny_clip(), s, SPACE, reset="episodic", source_side=24)
    ad([_pil(40, 30, 1), _pil(20, 50, 3)])
    assert s.seen == [(1, 3, 32, 24), (1, 3, 20, 50)] and ad.samples == 2


def test_a_thin_strip_is_kept_whole_but_bounded_on_its_long_side():
    """A 512x32768 strip stayed 512x32768 (192 MB as floats) when only the shorter side was bounded."""
    from ctta.views import MAX_ASPECT, shrink_to
    assert shrink_to(torch.rand(3, 512, 32768), 512).shape == (3, 32, 4 * 512) and MAX_ASPECT == 4
    assert shrink_to(torch.rand(3, 100, 5000), 512).shape == (3, 41, 2048)  # under the side, over the aspect
    assert shrink_to(torch.rand(3, 600, 2400), 512).shape == (3, 512, 2048)  # both bind at once
    x = torch.rand(3, 30, 40)
    assert shrink_to(x, 512) is x


def test_an_episodic_call_of_several_sizes_is_one_episode_and_a_failure_keeps_the_count():
    s = _Sources()
    ad = wrap(make_tiny_clip(), s, SPACE, reset="episodic", source_side=24)
    a, c = _pil(40, 30, 1), _pil(20, 50, 3)
    ad([a, c, a])
    assert s.seen == [(1, 3, 32, 24), (1, 3, 20, 50), (1, 3, 32, 24)] and ad.resets == 1 and ad.samples == 3

    class Fails(_Sources):
        def adapt(self, images, space):
            if images.shape[-1] == 50:
                raise RuntimeError("out of memory (simulated)")
            return super().adapt(images, space)

    f = Fails()
    online = wrap(make_tiny_clip(), f, SPACE, reset="never", source_side=24)
    with pytest.raises(RuntimeError, match="simulated"):
        online([a, c])
    # the first run was adapted on: counted, so the next call's position (and episode seeds) follow on
    assert online.samples == 1 and online.calls == 1


def test_list_items_are_named_and_other_float_precisions_accepted():
    s = _Sources()
    ad = wrap(make_tiny_clip(), s, SPACE, source_side=24)
    with pytest.raises(TypeError, match=r"images\[1\] is a tensor of shape \(1, 3, 8, 8\)"):
        ad([torch.rand(3, 8, 8), torch.rand(1, 3, 8, 8)])
    with pytest.raises(ValueError, match=r"images\[1\] must have 3 channels"):
        ad([torch.rand(3, 8, 8), torch.rand(1, 8, 8)])
    x = torch.rand(1, 3, 40, 30)
    assert torch.allclose(ad.predict(x.half()).logits, ad.predict(x.half().float()).logits)
    zs = wrap(make_tiny_clip(), ZeroShot(), SPACE)
    assert zs.predict(torch.rand(1, 3, 40, 30, dtype=torch.bfloat16)).logits.shape == (1, 4)
