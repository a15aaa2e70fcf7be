"""Avalanche bridge: a duck-typed benchmark with Avalanche 0.6's attributes, for each of its class-id options
(always), and a real ``nc_benchmark`` for each option when avalanche-lib is installed (slow: importing Avalanche
takes ~12-20 s here).

The fake mirrors what Avalanche 0.6's ``NCScenario`` was seen to hold (avalanche-lib 0.6.0, ``nc_benchmark`` with
``fixed_class_order=[4, 1, 5, 0, 2, 3]``, two classes per experience):

========================  ==================  ==================  =====================
attribute                 plain ids           from_first_exp      in_each_exp
========================  ==================  ==================  =====================
classes_order             [4, 1, 5, 0, 2, 3]  [0, 1, 2, 3, 4, 5]  [0, 1, 0, 1, 0, 1]
classes_order_orig..._ids [4, 1, 5, 0, 2, 3]  same                same
class_mapping[orig]       [0, 1, 2, 3, 4, 5]  [3, 1, 4, 5, 0, 2]  [1, 1, 0, 1, 0, 0]
original_classes_in_exp   [{1,4},{0,5},{2,3}] same                same
exp.classes_in_this_exp.  [1,4] [0,5] [2,3]   [0,1] [2,3] [4,5]   [0,1] [0,1] [0,1]
========================  ==================  ==================  =====================

The datasets label each sample with its mapped id. Images here encode the *original* class (pixel = id / 10), so
every test checks that the name the bridge gives a sample's label is the name of the class the image really is.
"""
from types import SimpleNamespace

import pytest
import torch

from ctta.data import iter_batches
from streams.avalanche_bridge import from_avalanche

NAMES = ["cat", "dog", "car", "ship", "tree", "cup"]
ORDER = (4, 1, 5, 0, 2, 3)
OPTIONS = ("plain", "from_first_exp", "in_each_exp")


class Triples:
    """Avalanche-style dataset: items (x, y, task_label), a ``targets`` attribute; x encodes the original class."""

    def __init__(self, originals, mapping, size=8):
        self.originals = list(originals)
        self.targets = [mapping[c] for c in self.originals]
        self.size = size

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((3, self.size, self.size), self.originals[i] / 10), self.targets[i], 0


def avalanche_mapping(order, per_exp, option):
    """``class_mapping`` (indexed by original id) and ``classes_order`` as Avalanche 0.6 builds them."""
    n = len(order)
    if option == "plain":
        return list(range(n)), list(order)
    if option == "from_first_exp":
        mapping = [0] * n
        for new, orig in enumerate(order):
            mapping[orig] = new
        return mapping, list(range(n))
    mapping = [0] * n
    for pos, orig in enumerate(order):
        mapping[orig] = pos % per_exp
    return mapping, [mapping[o] for o in order]


def fake_benchmark(order=ORDER, per_exp=2, paired=True, option="plain", dataset_classes=None):
    mapping, classes_order = avalanche_mapping(order, per_exp, option)
    exps_tr, exps_te, originals = [], [], []
    for k in range(0, len(order), per_exp):
        orig = set(order[k:k + per_exp])
        originals.append(orig)
        labels = sorted(mapping[c] for c in orig)  # Avalanche lists an experience's classes as a sorted set
        exps_tr.append(SimpleNamespace(dataset=Triples([c for c in sorted(orig) for _ in range(3)], mapping),
                                       classes_in_this_experience=labels, current_experience=k // per_exp))
        exps_te.append(SimpleNamespace(dataset=Triples([c for c in sorted(orig) for _ in range(2)], mapping),
                                       classes_in_this_experience=labels))
    if not paired:
        exps_te = [SimpleNamespace(dataset=Triples([c for c in range(6) for _ in range(2)], mapping),
                                   classes_in_this_experience=sorted(set(mapping)))]
    return SimpleNamespace(
        train_stream=exps_tr, test_stream=exps_te, classes_order=classes_order,
        classes_order_original_ids=list(order), class_mapping=mapping, original_classes_in_exp=originals,
        n_classes=len(order), class_ids_from_zero_from_first_exp=option == "from_first_exp",
        class_ids_from_zero_in_each_exp=option == "in_each_exp",
        original_train_dataset=SimpleNamespace(classes=dataset_classes) if dataset_classes else None)


def _check_names_match_images(s):
    for task in s.tasks:
        for data in (task.train, task.test):
            x, y, _ = next(iter_batches(data, 100))
            orig = (x[:, 0, 0, 0] * 10).round().long()
            assert [NAMES[c] for c in orig] == [task.space.classnames[j] for j in y]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("paired", [True, False])
def test_bridge_names_every_class_id_option_right(option, paired):
    if option == "in_each_exp" and not paired:
        with pytest.raises(ValueError, match="one experience per training experience"):
            from_avalanche(fake_benchmark(paired=False, option=option), NAMES)
        return
    s = from_avalanche(fake_benchmark(paired=paired, option=option), NAMES, templates=["a {}."], image_size=16,
                       name="av")
    assert len(s) == 3 and s.scope == "seen"
    # task spaces follow the benchmark's class order (4, 1 | 5, 0 | 2, 3), named by original id
    assert [t.space.classnames for t in s.tasks] == [("tree", "dog"), ("cup", "cat"), ("car", "ship")]
    assert [len(t.train) for t in s.tasks] == [6, 6, 6] and [len(t.test) for t in s.tasks] == [4, 4, 4]
    x, _, _ = next(iter_batches(s.tasks[0].train, 100))
    assert x.shape == (6, 3, 16, 16)
    _check_names_match_images(s)
    union, off = s.space_for(2, 2)
    assert union.classnames == ("tree", "dog", "cup", "cat", "car", "ship") and off == 4


def test_the_old_recipe_would_have_mislabelled():
    """What issue #21 found: with from_first_exp, ``classes_order`` is already 0..n-1, so naming classes by it
    (the old docstring's recipe) names task 0's images wrongly; the bridge now reads the original ids."""
    b = fake_benchmark(option="from_first_exp")
    old_recipe = [NAMES[c] for c in b.classes_order]
    assert old_recipe == NAMES  # the permutation was lost: "cat" would have named original class 4 ("tree")
    s = from_avalanche(b, NAMES)
    assert s.tasks[0].space.classnames == ("tree", "dog")


def test_bridge_rejects_bad_inputs():
    with pytest.raises(ValueError, match="6 classes but 2 class names"):
        from_avalanche(fake_benchmark(), ["a", "b"])
    # names in the benchmark's order instead of the dataset's: refused when the dataset carries its classes
    with pytest.raises(ValueError, match="differ from the original dataset's classes at ids"):
        from_avalanche(fake_benchmark(dataset_classes=NAMES), [NAMES[c] for c in ORDER])
    from_avalanche(fake_benchmark(dataset_classes=NAMES), NAMES)  # the right ones pass
    b = fake_benchmark(option="from_first_exp")
    b.class_mapping = list(range(6))  # inconsistent with the experiences' labels
    with pytest.raises(ValueError, match="do not match the benchmark's class_mapping"):
        from_avalanche(b, NAMES)
    b = fake_benchmark()
    b.n_classes, b.original_classes_in_exp[0] = None, {1, 9}
    b.class_mapping = list(range(10))
    b.train_stream[0].classes_in_this_experience = [1, 9]
    with pytest.raises(ValueError, match=r"original class ids \[9\] outside the 6 class names"):
        from_avalanche(b, NAMES)
    b = fake_benchmark()
    normalised = type("Norm", (Triples,), {"__getitem__": lambda s, i: (torch.randn(3, 8, 8) * 3, 4, 0)})
    b.train_stream[0].dataset.__class__ = normalised  # what a dataset with a Normalize transform yields
    s = from_avalanche(b, NAMES)
    with pytest.raises(ValueError, match="looks normalised"):
        s.tasks[0].train[0]


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
def test_bridge_real_avalanche_nc_benchmark(option):
    pytest.importorskip("avalanche")
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset
    y = torch.arange(60) % 6
    x = (y.float() / 10)[:, None, None, None].expand(60, 3, 8, 8).clone()
    tr, te = TensorDataset(x, y), TensorDataset(x[:24], y[:24])
    tr.targets, te.targets = y.tolist(), y[:24].tolist()
    tr.classes = list(NAMES)
    flags = {"plain": {}, "from_first_exp": {"class_ids_from_zero_from_first_exp": True},
             "in_each_exp": {"class_ids_from_zero_in_each_exp": True}}[option]
    bench = nc_benchmark(tr, te, n_experiences=3, task_labels=False, fixed_class_order=list(ORDER), **flags)
    fake = fake_benchmark(option=option)
    for attr in ("classes_order", "classes_order_original_ids", "class_mapping", "original_classes_in_exp"):
        assert list(getattr(bench, attr)) == list(getattr(fake, attr)), attr  # the fake mirrors Avalanche 0.6
    s = from_avalanche(bench, NAMES, image_size=8)
    assert [t.space.classnames for t in s.tasks] == [("tree", "dog"), ("cup", "cat"), ("car", "ship")]
    _check_names_match_images(s)
    with pytest.raises(ValueError, match="differ from the original dataset's classes"):
        from_avalanche(bench, [NAMES[c] for c in ORDER])
