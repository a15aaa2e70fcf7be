"""The built-in world tells strategies apart: on a reduced class-incremental stream, naive fine-tuning of the
embedded micro-CLIP forgets and loses zero-shot retention, while the frozen zero-shot baseline keeps it."""
import pytest

from ctta import AccuracyMatrix, Clip, ZeroShotRetention, run
from ctta.strategies import Finetune, ZeroShot
from streams.world import cil_stream, control_tasks


@pytest.fixture(scope="module")
def reduced():
    return cil_stream(5, train_per_class=10, test_per_class=6), control_tasks(n=300)


def _run(strategy, stream, controls):
    model = Clip.from_pretrained("micro-clip", "builtin")
    return run(model, strategy, stream, [AccuracyMatrix(), ZeroShotRetention(controls)], progress=False)


def test_finetune_forgets_and_drops_retention_next_to_zeroshot(reduced):
    stream, controls = reduced
    zs = _run(ZeroShot(), stream, controls)
    ft = _run(Finetune(lr=3e-4, epochs=2, batch_size=32), stream, controls)
    R = ft["accuracy_matrix"]
    # each task is learned while current: the diagonal beats zero-shot's
    assert sum(R[i][i] for i in range(5)) > sum(zs["accuracy_matrix"][i][i] for i in range(5))
    assert ft["metrics"]["forgetting"] > zs["metrics"]["forgetting"] + 0.05
    assert zs["retention"]["mean_drop"] == 0.0
    assert ft["retention"]["mean_drop"] > 0.03
