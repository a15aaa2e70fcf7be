"""Avalanche bridge: a duck-typed benchmark with Avalanche's attribute layout (always), and a real
``nc_benchmark`` when avalanche-lib is installed (slow: importing Avalanche takes ~20 s here)."""
from types import SimpleNamespace

import pytest
import torch

from ctta.data import iter_batches
from streams.avalanche_bridge import from_avalanche

NAMES = ["cat", "dog", "car", "ship", "tree", "cup"]


class Triples:
    """Avalanche-style dataset: items (x, y, task_label), a ``targets`` attribute; x encodes its class."""

    def __init__(self, labels, size=8):
        self.targets = list(labels)
        self.size = size

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        y = self.targets[i]
        return torch.full((3, self.size, self.size), y / 10), y, 0


def fake_benchmark(order=(4, 1, 5, 0, 2, 3), per_exp=2, paired=True):
    exps_tr, exps_te = [], []
    for k in range(0, len(order), per_exp):
        cls = sorted(order[k:k + per_exp])  # Avalanche lists an experience's classes as a sorted set
        exps_tr.append(SimpleNamespace(dataset=Triples([c for c in cls for _ in range(3)]),
                                       classes_in_this_experience=cls,
                                       current_experience=k // per_exp))
        exps_te.append(SimpleNamespace(dataset=Triples([c for c in cls for _ in range(2)]),
                                       classes_in_this_experience=cls))
    if not paired:
        exps_te = [SimpleNamespace(dataset=Triples([c for c in range(6) for _ in range(2)]),
                                   classes_in_this_experience=list(range(6)))]
    return SimpleNamespace(train_stream=exps_tr, test_stream=exps_te, classes_order=list(order), n_classes=6)


@pytest.mark.parametrize("paired", [True, False])
def test_bridge_layout_and_labels(paired):
    s = from_avalanche(fake_benchmark(paired=paired), NAMES, templates=["a {}."], image_size=16, name="av")
    assert len(s) == 3 and s.scope == "seen"
    # task spaces follow classes_order, not sorted ids
    assert [t.space.classnames for t in s.tasks] == [("tree", "dog"), ("cup", "cat"), ("car", "ship")]
    for task in s.tasks:
        for data, n in ((task.train, 6), (task.test, 4)):
            x, y, _ = next(iter_batches(data, 100))
            assert len(data) == n and x.shape == (n, 3, 16, 16)
            orig = (x[:, 0, 0, 0] * 10).round().long()
            assert [NAMES[c] for c in orig] == [task.space.classnames[j] for j in y]
    union, off = s.space_for(2, 2)
    assert union.classnames == ("tree", "dog", "cup", "cat", "car", "ship") and off == 4


def test_bridge_rejects_bad_inputs():
    with pytest.raises(ValueError, match="6 classes but 2 class names"):
        from_avalanche(fake_benchmark(), ["a", "b"])
    b = fake_benchmark()
    b.train_stream[0].dataset.targets[0] = 4
    normalised = type("Norm", (Triples,), {"__getitem__": lambda s, i: (torch.randn(3, 8, 8) * 3, 4, 0)})
    b.train_stream[0].dataset.__class__ = normalised  # what a dataset with a Normalize transform yields
    s = from_avalanche(b, NAMES)
    with pytest.raises(ValueError, match="looks normalised"):
        s.tasks[0].train[0]


@pytest.mark.slow
def test_bridge_real_avalanche_nc_benchmark():
    pytest.importorskip("avalanche")
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset
    y = torch.arange(60) % 6
    x = (y.float() / 10)[:, None, None, None].expand(60, 3, 8, 8).clone()
    tr, te = TensorDataset(x, y), TensorDataset(x[:24], y[:24])
    tr.targets, te.targets = y.tolist(), y[:24].tolist()
    bench = nc_benchmark(tr, te, n_experiences=3, task_labels=False, fixed_class_order=[4, 1, 5, 0, 2, 3])
    s = from_avalanche(bench, NAMES, image_size=8)
    assert [t.space.classnames for t in s.tasks] == [("tree", "dog"), ("cup", "cat"), ("car", "ship")]
    for task in s.tasks:
        xb, yb, _ = next(iter_batches(task.test, 100))
        assert [NAMES[c] for c in (xb[:, 0, 0, 0] * 10).round().long()] == [task.space.classnames[j] for j in yb]
