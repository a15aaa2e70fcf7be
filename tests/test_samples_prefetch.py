"""The sample-stream loop loads its test batches ahead through `ctta.loading`: over JPEG files, worker processes give
the very predictions, metrics and resume of in-process loading, and decode the next batches while the model adapts;
in-memory datasets still answer one ``get_batch`` call per batch in process."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctta import LabelSpace, Task, TaskStream
from ctta.data import configure_loading
from ctta.io import safe_torch_load
from ctta.loop.samples import CHECKPOINT, run_samples
from ctta.online_hooks import OnlineAccuracy
from ctta.strategies.tent import Tent
from streams.images import ImageFiles
from tests.conftest import make_dataset, make_tiny_clip

SPACE = LabelSpace([f"class {i}" for i in range(4)])


@pytest.fixture(autouse=True)
def _default_loading():
    yield
    configure_loading()  # the process-wide defaults are back to auto whatever a test set


class Logged(ImageFiles):
    """JPEG files that leave a mark in ``log_dir`` for each image decoded (from any process: a worker's too)."""

    def __init__(self, samples, image_size, log_dir: Path):
        super().__init__(samples, image_size)
        self.log_dir = str(log_dir)

    def __getitem__(self, i):
        Path(self.log_dir, str(i)).touch()
        return super().__getitem__(i)


def jpeg_stream(root: Path, n_tasks: int = 3, n: int = 12, log: bool = False) -> TaskStream:
    tasks = []
    for k in range(n_tasks):
        samples = []
        for j in range(n):
            rng = np.random.default_rng(100 * k + j)
            a = np.clip(rng.normal(60 * (j % 4), 40, (20, 24, 3)), 0, 255).astype(np.uint8)  # label-dependent colour
            p = root / f"d{k}" / f"{j}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p, format="JPEG", quality=90)
            samples.append((p, j % 4))
        data = Logged(samples, 16, root / f"log{k}") if log else ImageFiles(samples, 16)
        if log:
            (root / f"log{k}").mkdir()
        tasks.append(Task(f"domain{k}", SPACE, data, boundary=True))
    return TaskStream(tasks, scope="own", name="jpeg-toy")


class NoisyTent(Tent):
    """TENT with noise from the global torch RNG: any RNG use by the loader would change its updates."""

    def adapt(self, images, space):
        return super().adapt((images + 0.05 * torch.randn_like(images)).clamp(0, 1), space)


class Logits:
    def __init__(self):
        self.seen = []

    def on_batch_end(self, ctx):
        self.seen.append((ctx.task_index, ctx.logits.detach().clone(), ctx.labels.clone()))


class Kill:
    def __init__(self, at):
        self.at = at

    def on_batch_end(self, ctx):
        if self.at is not None and ctx.position >= self.at:
            raise KeyboardInterrupt(f"killed at {ctx.position}")


def _run(s: TaskStream, workers: int, out_dir=None, kill_at=None):
    configure_loading(workers=workers)
    logits, model = Logits(), make_tiny_clip()
    res = run_samples(model, NoisyTent(lr=5e-2), s, [OnlineAccuracy(), logits, Kill(kill_at)], batch_size=5,
                      out_dir=out_dir, checkpoint_every=6, seed=3)
    return res, logits.seen, model.trainable_state()


def test_workers_give_identical_predictions_and_metrics(tmp_path):
    s = jpeg_stream(tmp_path)
    r0, seen0, state0 = _run(s, 0)
    r2, seen2, state2 = _run(s, 2)
    assert len(seen0) == len(seen2) == 9  # 12 = 5 + 5 + 2, three domains
    for (t0, l0, y0), (t2, l2, y2) in zip(seen0, seen2):
        assert t0 == t2 and torch.equal(y0, y2) and torch.equal(l0, l2)
    assert r0["online"] == r2["online"]
    assert all(torch.equal(state0[k], state2[k]) for k in state0)
    # the labels arrive in stream order (files j % 4 of each domain)
    assert torch.cat([y for t, _, y in seen0 if t == 1]).tolist() == [j % 4 for j in range(12)]


def test_resume_with_workers_matches_an_uninterrupted_run(tmp_path):
    s = jpeg_stream(tmp_path / "data")
    full, seen_full, state_full = _run(s, 0, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _run(s, 2, tmp_path / "killed", kill_at=20)  # positions 5, 10*, 12, 17*, 22: killed (* = checkpoint)
    ck = safe_torch_load(tmp_path / "killed" / CHECKPOINT)
    assert (ck["task"], ck["offset"], ck["position"]) == (1, 5, 17)  # resumes in the middle of domain1
    resumed, seen, state = _run(s, 2, tmp_path / "killed")
    assert resumed["online"] == full["online"]
    assert all(torch.equal(state[k], state_full[k]) for k in state_full)
    # the resumed run starts at the saved position: its first batch is domain1's images 5..9
    assert seen[0][0] == 1 and seen[0][2].tolist() == [(5 + j) % 4 for j in range(5)]
    assert torch.equal(seen[0][1], seen_full[4][1])  # the full run's fifth batch (d0: 3 batches, d1: 5..9 is 2nd)


class SlowSpy(Tent):
    """Records, when it first adapts, whether images further down the stream were already decoded."""

    def __init__(self, log_dir: Path, wait: float):
        super().__init__(lr=1e-2)
        self.log_dir, self.wait, self.ahead = log_dir, wait, None

    def adapt(self, images, space):
        if self.ahead is None:
            deadline = time.monotonic() + self.wait  # generous on a loaded machine; loading in turn never gets there
            while time.monotonic() < deadline and not (self.log_dir / "7").exists():
                time.sleep(0.05)
            self.ahead = sorted(int(f) for f in os.listdir(self.log_dir))
        return super().adapt(images, space)


def test_next_batches_are_decoded_while_the_model_adapts(tmp_path):
    s = jpeg_stream(tmp_path / "w2", n_tasks=1, log=True)
    configure_loading(workers=2, prefetch=2)
    spy = SlowSpy(tmp_path / "w2" / "log0", wait=20)
    run_samples(make_tiny_clip(), spy, s, batch_size=2)
    # during the first adapt call (batch 0 = images 0, 1), the next batches (images 2..7 at least) were decoded:
    # two workers, two chunks in flight each
    assert set(range(8)) <= set(spy.ahead)
    # loading one batch at a time (workers=0, in process) reads nothing ahead: only batch 0 by then
    s0 = jpeg_stream(tmp_path / "w0", n_tasks=1, log=True)
    configure_loading(workers=0)
    spy0 = SlowSpy(tmp_path / "w0" / "log0", wait=0)
    run_samples(make_tiny_clip(), spy0, s0, batch_size=2)
    assert spy0.ahead == [0, 1]


class Counting:
    """An in-memory dataset that counts its ``get_batch`` calls (in this process)."""

    in_memory = True

    def __init__(self, base):
        self.base, self.targets, self.calls = base, base.targets, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):  # pragma: no cover - the loop must use get_batch
        raise AssertionError("item-wise loading of an in-memory dataset")

    def get_batch(self, idx):
        self.calls.append(idx.tolist())
        return self.base.get_batch(idx)


def test_in_memory_datasets_load_in_process_one_call_per_batch():
    configure_loading(workers=2)  # even when workers are asked for
    data = Counting(make_dataset(130, 4, seed=1))
    s = TaskStream([Task("d", SPACE, data, boundary=True)], scope="own", name="mem")
    run_samples(make_tiny_clip(), Tent(lr=1e-2), s, batch_size=64)
    assert data.calls == [list(range(0, 64)), list(range(64, 128)), [128, 129]]
