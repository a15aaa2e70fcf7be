"""The strategy contract, checked on every strategy that `ctta.strategies` exports (a new one is picked up by
discovery): ``predict`` has no side effects; ``state_dict`` round-trips to identical predictions; a reset returns
to the anchor; a non-finite loss leaves the model untouched; labels never reach ``adapt``; a killed and resumed run
ends exactly like the uninterrupted one.

Every check runs on two image towers: the tiny ViT of ``tests.conftest`` and a tiny ``ModifiedResNet`` (CLIP RN50
family, BatchNorm + attention pool; ``tests._resnet``). The ResNet half of the two slowest checks (state round trip,
killed and resumed) runs on `RESNET_ROUND_TRIP` / `RESNET_RESUME` only, to keep the matrix fast; every other check
covers every strategy on both towers."""
from __future__ import annotations

import inspect

import pytest
import torch

import ctta.strategies as S
from ctta import AccuracyMatrix, LabelSpace, Strategy, Task, TaskStream, class_incremental, run
from ctta.loop import run_samples
from ctta.online import wrap
from ctta.online_hooks import OnlineAccuracy
from ctta.state import clone_tree
from tests._resnet import RESNET_SIZE, make_resnet_clip
from tests.conftest import make_dataset, make_tiny_clip

# Small settings that keep each strategy's algorithm intact (fewer views, steps and samples than the papers').
TINY = {
    "Finetune": dict(lr=1e-3, batch_size=4, epochs=1),
    "LwF": dict(lr=1e-3, batch_size=4, iterations=3, warmup=0),
    "VRLwF": dict(lr=1e-3, batch_size=4, iterations=3, warmup=0, n_sentences=8, length=4),
    "LoRA": dict(rank=2, lr=1e-2, batch_size=4, iterations=2),
    "RankSelectiveLoRA": dict(rank=2, lr=1e-2, batch_size=4, iterations=2),
    "RAPF": dict(epochs=1, batch_size=4, cache=False, replay_classes=1),
    "TPT": dict(n_views=7),
    "Tent": dict(lr=1e-2),
}
VIEWS = {"n_views": 7, "views": 8, "batch_views": 8}  # fewer augmented views for any strategy that takes them
NAMES = sorted(S.__all__)
SPACE = LabelSpace([f"class {i}" for i in range(4)])
TOWERS = {"vit": (make_tiny_clip, 16), "resnet": (make_resnet_clip, RESNET_SIZE)}  # model factory, image side
# The ResNet half of the two slowest checks runs on a subset, which keeps the matrix under twice the ViT-only time:
# the strategies whose state touches that tower in distinct ways (fine-tuned BatchNorms with their running
# statistics, the attention-pool LoRA with and without gates, TENT's batch statistics, a prompt, a feature cache).
RESNET_ROUND_TRIP = ["Finetune", "LoRA", "RankSelectiveLoRA", "TDA", "TPT", "Tent"]
RESNET_RESUME = ["Finetune", "RankSelectiveLoRA", "Tent"]


def cases(names, resnet=None) -> list:
    """``(strategy, tower)`` pairs: every name on the ViT, ``resnet`` (default: every name) on the ResNet."""
    return ([pytest.param(n, "vit", id=n) for n in names]
            + [pytest.param(n, "resnet", id=f"{n}-resnet") for n in (names if resnet is None else resnet)])


def clip_for(tower: str, seed: int = 0):
    return TOWERS[tower][0](seed)


def make(name: str) -> Strategy:
    cls = getattr(S, name)
    kw = dict(TINY.get(name, {}))
    params = inspect.signature(cls.__init__).parameters
    kw.update({k: v for k, v in VIEWS.items() if k in params and k not in kw})
    return cls(**kw)


def learns(name: str) -> bool:
    return getattr(S, name).learns


def task_stream(tower: str = "vit") -> TaskStream:
    space, size = LabelSpace([f"class {i}" for i in range(4)]), TOWERS[tower][1]
    return class_incremental(space, make_dataset(16, 4, seed=1, size=size), make_dataset(8, 4, seed=2, size=size),
                             increment=2, seed=1)


def sample_stream(tower: str = "vit") -> TaskStream:
    tasks = [Task(f"domain{k}", SPACE, make_dataset(6, 4, seed=10 + k, size=TOWERS[tower][1]), boundary=k == 0)
             for k in range(2)]
    return TaskStream(tasks, scope="own", name="toy-shift")


def images(n: int = 3, seed: int = 0, tower: str = "vit") -> torch.Tensor:
    size = TOWERS[tower][1]
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN equals NaN here


def trained(name: str, tower: str, seed: int = 0):
    """A model + strategy that has learned (task streams) or adapted (sample streams) a little."""
    m, s = clip_for(tower, seed), make(name)
    if learns(name):
        run(m, s, task_stream(tower), progress=False)
        return m, s, None
    ad = wrap(m, s, SPACE, reset="never")
    for k in range(3):
        ad(images(2, k, tower), position=2 * k)
    return m, s, ad


# --------------------------------------------------------------------------------------------- the contract
def test_discovery_covers_every_exported_strategy():
    assert {"ZeroShot", "Finetune", "LwF", "VRLwF", "RAPF", "LoRA", "RankSelectiveLoRA", "TPT", "Tent"} <= set(NAMES)
    for name in NAMES:
        assert issubclass(getattr(S, name), Strategy)


@pytest.mark.parametrize("name,tower", cases(NAMES))
def test_predict_has_no_side_effects(name, tower):
    model, s, ad = trained(name, tower)
    x = images(tower=tower)
    before_s, before_m = clone_tree(s.state_dict()), clone_tree(model.net.state_dict())
    p1 = s.predict(x, SPACE)
    p2 = s.predict(x, SPACE)
    assert torch.equal(p1, p2)
    assert same_tree(s.state_dict(), before_s), f"{name}.predict changed the strategy's state"
    assert same_tree(model.net.state_dict(), before_m), f"{name}.predict changed the model"


@pytest.mark.parametrize("name,tower", cases(NAMES, RESNET_ROUND_TRIP))
def test_state_dict_round_trips_to_identical_predictions(name, tower):
    model, s, ad = trained(name, tower)
    x = images(4, 9, tower)
    model2, s2 = clip_for(tower, 1), make(name)  # other initial weights: everything must come from the state
    if ad is None:
        s2.setup(model2)
        model2.net.load_state_dict(model.net.state_dict())
        s2.load_state_dict(clone_tree(s.state_dict()))
        assert torch.equal(s2.predict(x, SPACE), s.predict(x, SPACE))
        return
    ad2 = wrap(model2, s2, SPACE, reset="never")
    model2.net.load_state_dict(model.net.state_dict())  # the frozen weights a deployment ships with
    ad2.load_state_dict(ad.state_dict())
    assert torch.equal(ad2.predict(x).logits, ad.predict(x).logits)
    # the next adaptation is identical too (optimizer moments, caches, generators restored)
    assert torch.equal(ad2(x, position=100).logits, ad(x, position=100).logits)


@pytest.mark.parametrize("name,tower", cases([n for n in NAMES if not learns(n)]))
def test_reset_returns_to_the_anchor(name, tower):
    ad = wrap(clip_for(tower), make(name), SPACE, reset="never")
    x = images(4, 9, tower)
    anchor_pred, anchor_state = ad.predict(x).logits, clone_tree(ad.strategy.state_dict())
    anchor_model = clone_tree(ad.model.net.state_dict())
    for k in range(3):
        ad(images(2, k, tower))
    ad.reset()
    assert torch.equal(ad.predict(x).logits, anchor_pred)
    assert same_tree(ad.model.net.state_dict(), anchor_model)
    ad(images(2, 5, tower))
    ad.reset()  # the anchor was not aliased: a second reset lands on the same state
    assert torch.equal(ad.predict(x).logits, anchor_pred)
    state = ad.strategy.state_dict()
    rng_free = {k: v for k, v in state.items() if k not in ("generator", "rng")}
    assert same_tree(rng_free, {k: v for k, v in anchor_state.items() if k not in ("generator", "rng")})


def finite_tensors(tree) -> list[bool]:
    if isinstance(tree, torch.Tensor):
        return [bool(torch.isfinite(tree).all())] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        return [f for v in tree.values() for f in finite_tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [f for v in tree for f in finite_tensors(v)]
    return []


@pytest.mark.parametrize("name,tower", cases(NAMES))
def test_a_non_finite_loss_leaves_the_model_untouched(name, tower, monkeypatch):
    model, s = clip_for(tower), make(name)
    if learns(name):
        s.setup(model)
    else:
        ad = wrap(model, s, SPACE, reset="never")
    before = clone_tree(model.net.state_dict())
    was_finite = finite_tensors(s.state_dict())
    tower_cls = type(model.net.visual)
    forward = tower_cls.forward
    # every image feature, hence every logit and loss: NaN (as an fp16 overflow would make them). On the ResNet the
    # NaN enters at the tower's input, so that BatchNorms in train mode see it too (a fine-tuned BatchNorm updates
    # its running statistics in the forward, before any loss exists; non-finite ones must not be folded in)
    if tower == "resnet":
        monkeypatch.setattr(tower_cls, "forward", lambda self, x: forward(self, x * float("nan")))
    else:
        monkeypatch.setattr(tower_cls, "forward", lambda self, x: forward(self, x) * float("nan"))
    if learns(name):
        stream = task_stream(tower)
        space, _ = stream.train_space(0)
        s.begin_task(stream.tasks[0], space)
        x, y = stream.tasks[0].train.get_batch(torch.arange(4))
        s.learn(x, y, space)
        assert s.steps == 0 and s.skipped_steps == 1, f"{name} stepped on a non-finite loss"
    else:
        try:
            ad(images(2, tower=tower))
        except FloatingPointError:  # NaN logits are refused, not labelled; what is checked here is the state
            pass
    assert same_tree(model.net.state_dict(), before), f"{name} let a non-finite loss change the model"
    assert finite_tensors(s.state_dict()) == was_finite, f"{name} let non-finite values into its state"


@pytest.mark.parametrize("name,tower", cases([n for n in NAMES if not learns(n)]))
def test_labels_never_reach_adapt(name, tower, monkeypatch):
    s = make(name)
    calls = []
    orig = s.adapt

    def spy(*args, **kwargs):
        calls.append((len(args), sorted(kwargs)))
        return orig(*args, **kwargs)

    monkeypatch.setattr(s, "adapt", spy)
    res = run_samples(clip_for(tower), s, sample_stream(tower), [OnlineAccuracy()], batch_size=2, progress=False)
    assert calls and all(c == (2, []) for c in calls)  # (images, space), nothing else
    assert res["online"]["n"] == 12


class Kill:
    def __init__(self, task: int | None = None, sample: int | None = None):
        self.task, self.sample = task, sample

    def on_task_start(self, ctx):
        if self.task is not None and ctx.task_index == self.task:
            raise KeyboardInterrupt("killed")

    def on_batch_end(self, ctx):
        if self.sample is not None and ctx.position >= self.sample:
            raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("name,tower", cases(NAMES, RESNET_RESUME))
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(name, tower, tmp_path):
    def go(out, kill):
        model = clip_for(tower)
        if learns(name):
            r = run(model, make(name), task_stream(tower), [AccuracyMatrix(), kill], out_dir=out, progress=False)
        else:
            r = run_samples(model, make(name), sample_stream(tower), [OnlineAccuracy(), kill], batch_size=2,
                            reset="never", out_dir=out, checkpoint_every=2, progress=False)
        return r, model.net.state_dict()

    full, full_w = go(tmp_path / "full", Kill())
    with pytest.raises(KeyboardInterrupt):
        go(tmp_path / "cut", Kill(task=1) if learns(name) else Kill(sample=7))
    resumed, resumed_w = go(tmp_path / "cut", Kill())
    key = "accuracy_matrix" if learns(name) else "online"
    assert resumed[key] == full[key]
    assert same_tree(resumed_w, full_w)
