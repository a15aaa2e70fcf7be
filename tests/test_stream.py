"""Label spaces, task streams, evaluation scopes and class-incremental splits."""
import pytest
import torch

from ctta import ImageTensorDataset, LabelSpace, Task, TaskStream, class_incremental, domain_incremental
from ctta.stream import class_order


def test_label_space_validation():
    with pytest.raises(ValueError, match="duplicate class names: \\['cat'\\]"):
        LabelSpace(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="no classes"):
        LabelSpace([])
    with pytest.raises(ValueError, match="placeholder"):
        LabelSpace(["cat"], ["a photo"])
    with pytest.raises(TypeError):
        LabelSpace("cat")
    with pytest.raises(KeyError, match="unknown class 'cow'"):
        LabelSpace(["cat"]).index("cow")


def test_concat_keeps_per_class_templates_and_locate():
    a = LabelSpace(["cat", "dog"], ["a photo of a {}."], name="a")
    b = LabelSpace(["car"], ["a {}, a type of vehicle.", "a photo of a {}."], name="b")
    u = LabelSpace.concat([a, b])
    assert u.classnames == ("cat", "dog", "car")
    assert u.prompts(2) == ["a car, a type of vehicle.", "a photo of a car."]
    assert u.locate(b) == slice(2, 3)
    with pytest.raises(ValueError, match="per-class"):
        _ = u.templates
    with pytest.raises(ValueError, match="duplicate"):
        LabelSpace.concat([a, a])


def _ds(labels):
    labels = torch.as_tensor(labels)
    return ImageTensorDataset(torch.zeros(len(labels), 3, 4, 4), labels)


def test_scopes():
    s0, s1 = LabelSpace(["a", "b"], name="s0"), LabelSpace(["c"], name="s1")
    tasks = [Task("t0", s0, _ds([0, 1])), Task("t1", s1, _ds([0]))]
    seen = TaskStream(tasks, scope="seen")
    assert seen.space_for(0, 0)[0].classnames == ("a", "b")
    # a future task is evaluated over the seen classes plus its own
    assert seen.space_for(0, 1) == (LabelSpace.concat([s0, s1]), 2)
    own = TaskStream(tasks, scope="own")
    assert own.space_for(1, 0) == (s0, 0)
    everything = TaskStream(tasks, scope="all")
    assert everything.space_for(0, 0)[0].classnames == ("a", "b", "c")
    with pytest.raises(ValueError, match="scope"):
        TaskStream(tasks, scope="bogus")


def test_domain_incremental_shares_one_block():
    s = LabelSpace(["a", "b"])
    stream = domain_incremental(s, [("d0", None, _ds([0])), ("d1", None, _ds([1]))])
    assert stream.space_for(0, 1) == (s, 0)


def test_class_incremental_b0_and_bx():
    space = LabelSpace([f"c{i}" for i in range(10)])
    train, test = _ds(list(range(10)) * 3), _ds(list(range(10)))
    order = class_order(10, seed=1993)
    stream = class_incremental(space, train, test, increment=2, seed=1993)
    assert len(stream) == 5
    assert stream.tasks[0].space.classnames == tuple(f"c{i}" for i in order[:2])
    assert len(stream.tasks[0].train) == 6 and len(stream.tasks[0].test) == 2
    # labels are local to each task's space and point at the right classes
    t1 = stream.tasks[1]
    for k in range(len(t1.test)):
        _, y = t1.test[k]
        original = int(t1.test.base.targets[t1.test.indices[k]])
        assert t1.space.classnames[y] == f"c{original}"
    # training space of task 1 is the union of tasks 0 and 1, task 1's labels offset by 2
    space1, offset = stream.train_space(1)
    assert len(space1) == 4 and offset == 2
    bx = class_incremental(space, train, test, initial=4, increment=2, order=list(range(10)))
    assert [len(t.space) for t in bx.tasks] == [4, 2, 2, 2]
    with pytest.raises(ValueError, match="do not split"):
        class_incremental(space, train, test, increment=3)
    with pytest.raises(ValueError, match="permutation"):
        class_incremental(space, train, test, increment=2, order=[0] * 10)


def test_class_order_is_seeded():
    assert class_order(10, 1) == class_order(10, 1) != class_order(10, 2)
    assert class_order(5, None) == [0, 1, 2, 3, 4]


def test_label_space_fingerprint_is_stable_and_distinguishes_spaces():
    ab = LabelSpace(["a", "b"], ["a photo of a {}."])
    # pinned: strategies save it in their state, so it must not change across processes or versions
    assert ab.fingerprint == "560a6cf6c9526e21"
    assert LabelSpace(["a", "b"], ["a photo of a {}."], name="other").fingerprint == ab.fingerprint  # name: a label
    assert len({ab.fingerprint, LabelSpace(["b", "a"], ["a photo of a {}."]).fingerprint,
                LabelSpace(["a", "b"], ["a {} shape"]).fingerprint, LabelSpace(["a", "c"]).fingerprint}) == 4
