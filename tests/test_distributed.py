"""torchrun-style data parallelism on 2 CPU processes (gloo): equal results to one process (training, statistics,
episodes, and evaluation sharded across ranks, feature cache included), rank-0-only files, and a dead rank failing
the others with a clear error instead of a hang."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ctta import (AccuracyMatrix, JsonResults, LabelSpace, Task, TaskStream, ZeroShotRetention, class_incremental,
                  distributed, run)
from ctta.online_hooks import OnlineAccuracy
from ctta.loop import run_samples
from ctta.strategies.finetune import Finetune
from ctta.strategies.rapf import RAPF
from ctta.strategies.tent import Tent
from ctta.strategies.tpt import TPT
from ctta.strategies.zeroshot import ZeroShot
from tests.conftest import make_dataset, make_tiny_clip

SPACE = LabelSpace([f"class {i}" for i in range(4)])


# --------------------------------------------------------------------------------------------- scenarios
def cil_stream():
    space = LabelSpace([f"class {i}" for i in range(6)])
    # 14-16 training images per task of 2 classes: global batches of 8 and 6-8 (uneven shards such as 4/3)
    return class_incremental(space, make_dataset(44, 6, seed=1), make_dataset(30, 6, seed=2), increment=2, seed=1)


def sample_stream(n: int = 10) -> TaskStream:
    tasks = [Task(f"domain{k}", SPACE, make_dataset(n, 4, seed=10 + k), boundary=True) for k in range(2)]
    return TaskStream(tasks, scope="own", name="toy-shift")


class Record:
    """Per-sample predictions in the order the hooks see them."""

    def __init__(self):
        self.positions, self.preds = [], []

    def on_batch_end(self, ctx):
        self.positions.append(ctx.position)
        self.preds.extend(ctx.logits.argmax(-1).tolist())


def scenarios(out: Path) -> dict:
    """The same calls in one process and under a process group; what rank 0 (or the only process) returns."""
    torch.set_num_threads(1)  # identical float reductions in every process
    res: dict = {}
    # Finetune: whole visual tower, 2 epochs of global batch 8, files in a per-rank folder
    model = make_tiny_clip(0)
    ft = Finetune("visual", lr=1e-3, batch_size=8, epochs=2, grad_clip=1.0)
    r = run(model, ft, cil_stream(), [AccuracyMatrix(), JsonResults()], out_dir=out / f"ft_rank{distributed.rank()}")
    res["finetune_weights"] = {k: v.clone() for k, v in model.trainable_state().items()}
    res["finetune_results"] = r.get("accuracy_matrix")
    # a re-run resumes from the finished checkpoint (read by rank 0, sent to the others): same weights, no training
    model2 = make_tiny_clip(1)
    ft2 = Finetune("visual", lr=1e-3, batch_size=8, epochs=2, grad_clip=1.0)
    r2 = run(model2, ft2, cil_stream(), [AccuracyMatrix(), JsonResults()], out_dir=out / f"ft_rank{distributed.rank()}")
    res["resumed_equal"] = all(torch.equal(v, model.trainable_state()[k]) for k, v in model2.trainable_state().items())
    res["resumed_results"], res["resumed_steps"] = r2.get("accuracy_matrix"), ft2.steps
    # evaluation sharded across ranks: ZeroShot (feature cache) with the accuracy matrix and retention controls; eval
    # batches of 4 over test sets of 10 (starts 0,4,8 | 10,14,18 | 20,24,28): rank 0 scores 0..17, rank 1 18..29
    zs = ZeroShot(eval_batch_size=4)
    controls = [Task("control", SPACE, make_dataset(9, 4, seed=7))]
    r = run(make_tiny_clip(0), zs, cil_stream(), [AccuracyMatrix(), ZeroShotRetention(controls)])
    res["zs_results"] = (r.get("accuracy_matrix"), r.get("retention"), r.get("metrics"))
    res["zs_cache"] = zs.cache.stats()
    # RAPF: the class statistics of the frozen encoder, reduced across ranks
    rapf = RAPF(epochs=1, batch_size=8, cache=False, replay_classes=1)
    run(make_tiny_clip(0), rapf, cil_stream())
    res["rapf_stats"] = {c: (m.clone(), v.clone()) for c, (m, v) in rapf.stats.items()}
    # episodic TPT (resets itself every sample): sharded, gathered, scored in stream order
    rec, acc = Record(), OnlineAccuracy()
    r = run_samples(make_tiny_clip(0), TPT(ctx_init="a photo of a", n_views=7, selection_p=0.3, seed=3),
                    sample_stream(), [rec, acc], batch_size=1)
    res["tpt_preds"], res["tpt_positions"], res["tpt_online"] = rec.preds, rec.positions, r.get("online")
    # episodic TENT with a checkpoint; the re-run resumes at the end from rank 0's file and replays nothing
    folder = out / f"tent_rank{distributed.rank()}"
    r = run_samples(make_tiny_clip(0), Tent(lr=1e-2), sample_stream(), [Record(), OnlineAccuracy()], batch_size=3,
                    reset="episodic", out_dir=folder, checkpoint_every=6)
    rec = Record()
    r2 = run_samples(make_tiny_clip(0), Tent(lr=1e-2), sample_stream(), [rec, OnlineAccuracy()], batch_size=3,
                     reset="episodic", out_dir=folder, checkpoint_every=6)
    res["samples_resumed"] = (r.get("online"), r2.get("online"), rec.preds, folder.exists())
    # episodic adapter policy over batches of 3, TENT: sharded too
    rec = Record()
    r = run_samples(make_tiny_clip(0), Tent(lr=1e-2), sample_stream(), [rec, OnlineAccuracy()], batch_size=3,
                    reset="episodic")
    res["tent_episodic_preds"], res["tent_episodic_online"] = rec.preds, r.get("online")
    # online TENT: order matters, so it runs on rank 0 only
    r = run_samples(make_tiny_clip(0), Tent(lr=1e-2), sample_stream(), [OnlineAccuracy()], batch_size=3)
    res["tent_online"] = r.get("online")
    return res


def gradient_reduction() -> dict:
    """Hand-checked: weights 1/4 and 3/4; a grad that is None on one rank counts as zero there."""
    r = distributed.rank()
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad = torch.tensor([1.0, 2.0]) if r == 0 else torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([5.0, 5.0]) if r == 0 else None
    ok = distributed.all_reduce_gradients([a, b, c], 0.25 if r == 0 else 0.75, finite=True)
    out = {"ok": ok, "a": a.grad.clone(), "b": b.grad.clone(), "c": c.grad}
    a.grad = torch.ones(2)
    out["skip"] = distributed.all_reduce_gradients([a, b, c], 0.5, finite=(r == 0))  # rank 1's loss was NaN
    out["a_after_skip"] = a.grad
    return out


def _join(rank: int, world: int, port: int, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init_from_env(timeout_s=timeout_s) == torch.device("cpu")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port, timeout_s=120)
    try:
        res = {"grads": gradient_reduction(), **scenarios(Path(out))}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


class DiesOnRank1(Finetune):
    def learn(self, images, labels, space):
        if distributed.rank() == 1 and self.steps == 1:
            os._exit(3)  # a crashed or killed rank: no goodbye to the process group
        return super().learn(images, labels, space)


class StallsOnRank1(Finetune):
    def learn(self, images, labels, space):
        if distributed.rank() == 1 and self.steps == 1:
            time.sleep(120)  # alive but stuck (a hung data loader, a deadlock): only the timeout can tell
        return super().learn(images, labels, space)


def _failing_run(rank: int, world: int, port: int, out: str, strategy_cls: type, timeout_s: float) -> None:
    """A Finetune run in which rank 1 fails; each surviving rank writes its seconds and outcome to rank<r>.txt."""
    _join(rank, world, port, timeout_s=timeout_s)
    t0 = time.time()
    try:
        run(make_tiny_clip(0), strategy_cls("visual", lr=1e-3, batch_size=4, epochs=3), cil_stream())
        msg = "finished"
    except distributed.DistributedError as e:
        msg = f"DistributedError: {e}"
    (Path(out) / f"rank{rank}.txt").write_text(f"{time.time() - t0:.1f}\n{msg}")


def _killed_worker(rank: int, world: int, port: int, out: str) -> None:
    _failing_run(rank, world, port, out, DiesOnRank1, timeout_s=20)
    distributed.shutdown()


def _stalled_worker(rank: int, world: int, port: int, out: str) -> None:
    _failing_run(rank, world, port, out, StallsOnRank1, timeout_s=5)
    if rank == 0:
        os._exit(0)  # do not wait for the stuck rank in the process group's teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, out: Path, world: int = 2, timeout: float = 300, stragglers_s: float | None = None) -> list[int]:
    """Run ``fn(rank, world, port, out)`` in ``world`` spawned processes; kill any still alive at ``timeout`` (or
    ``stragglers_s`` after rank 0 has ended); their exit codes."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=fn, args=(r, world, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for i, p in enumerate(procs):
        p.join(max(1.0, deadline - time.time()))
        if i == 0 and stragglers_s is not None:
            deadline = min(deadline, time.time() + stragglers_s)
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


# --------------------------------------------------------------------------------------------- tests
def test_batch_shard_is_contiguous_weighted_and_never_empty():
    shards = [distributed.batch_shard(10, r, 3) for r in range(3)]
    assert [s[0].tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [s[1] for s in shards] == [0.4, 0.3, 0.3]
    rows, w = distributed.batch_shard(1, 1, 2)  # fewer samples than ranks: a weightless duplicate
    assert rows.tolist() == [0] and w == 0.0
    assert distributed.batch_shard(7)[1] == 1.0 and distributed.batch_shard(7)[0].tolist() == list(range(7))
    with pytest.raises(ValueError, match="empty"):
        distributed.batch_shard(0)


def test_single_process_is_a_no_op():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    assert distributed.all_reduce_gradients([p], 0.3, True) and torch.equal(p.grad, torch.ones(2))
    assert distributed.gather_objects(5) == [5] and distributed.broadcast_object(6) == 6
    assert distributed.describe() == {"world_size": 1}
    assert distributed.init_from_env() is None  # not launched by torchrun


def test_two_processes_match_one(tmp_path):
    codes = launch(_worker, tmp_path)
    assert codes == [0, 0], f"worker exit codes {codes}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = scenarios(tmp_path / "single")
    g = ranks[0]["grads"]
    assert g["ok"] and torch.allclose(g["a"], torch.tensor([2.5, 3.5])) and torch.allclose(g["b"], torch.tensor([1.25, 1.25]))
    assert g["c"] is None  # no rank had a gradient: the optimizer must skip it, as in one process
    assert g["skip"] is False and g["a_after_skip"] is None and ranks[1]["grads"]["skip"] is False

    # Finetune: same weights as one process with the same global batch, on both ranks. The key bias of attention
    # is left out: softmax ignores it, so its gradient is exactly zero in exact arithmetic and float noise of
    # either summation order, which Adam's normalisation blows up to lr-sized steps (seen: 1.8e-4 there). The same
    # amplification hits the odd near-zero gradient entry elsewhere (seen: one of 4,096 at 2.2e-5 on a CPU with
    # AMX, all others < 5e-6), so: every entry within 1e-4, and all but 0.1 % within 2e-5. A real mismatch (a
    # missing all-reduce, a wrong batch shard) moves most entries by lr-sized amounts (1e-3 a step).
    for r in ranks:
        for k, v in single["finetune_weights"].items():
            got = r["finetune_weights"][k]
            if k.endswith("attn.in_proj_bias"):
                d = v.shape[0] // 3
                got, v = torch.cat([got[:d], got[2 * d:]]), torch.cat([v[:d], v[2 * d:]])
            diff = (got - v).abs()
            assert diff.max() < 1e-4 and (diff > 2e-5).float().mean() <= 1e-3, (k, diff.max().item())
    assert ranks[0]["finetune_results"] == single["finetune_results"]
    assert ranks[1]["finetune_results"] is None  # rank 0 alone returns results (rank 1 only helped evaluate)
    for r in (*ranks, single):  # resumed from rank 0's checkpoint on every rank
        assert r["resumed_equal"] and r["resumed_steps"] == 2 * 2 * 3  # 2 batches x 2 epochs x 3 tasks, restored
    assert ranks[0]["resumed_results"] == single["finetune_results"] and ranks[1]["resumed_results"] is None
    assert (tmp_path / "ft_rank0" / "results.json").exists() and (tmp_path / "ft_rank0" / "checkpoint.pt").exists()
    assert not (tmp_path / "ft_rank1").exists()  # only rank 0 writes

    # sharded evaluation: the very same accuracy matrix, metrics and retention as one process. Each rank's feature
    # cache holds its own share: of the 30 test images 18 and 12, of the 9 control images (batches at 0, 4, 8;
    # rank 0 owns positions 0..4) 8 and 1; together exactly the single process's 39, each encoded once
    assert ranks[0]["zs_results"] == single["zs_results"] and single["zs_results"][0] is not None
    assert ranks[1]["zs_results"] == (None, None, None)
    entries = [r["zs_cache"]["entries"] for r in ranks]
    assert single["zs_cache"]["entries"] == 39 and entries == [18 + 8, 12 + 1], entries
    assert sum(r["zs_cache"]["encoded"] for r in ranks) == single["zs_cache"]["encoded"] == 39

    # RAPF: class statistics reduced across ranks equal the single-process ones
    for r in ranks:
        assert r["rapf_stats"].keys() == single["rapf_stats"].keys()
        for c, (m, v) in single["rapf_stats"].items():
            assert torch.allclose(r["rapf_stats"][c][0], m, atol=1e-6) and torch.allclose(r["rapf_stats"][c][1], v, atol=1e-6)

    # episodic streams: exactly the same per-sample predictions and metrics, scored in order on rank 0
    assert ranks[0]["tpt_preds"] == single["tpt_preds"] and len(single["tpt_preds"]) == 20
    assert ranks[0]["tpt_positions"] == list(range(1, 21))
    assert ranks[0]["tpt_online"] == single["tpt_online"]
    assert ranks[0]["tent_episodic_preds"] == single["tent_episodic_preds"]
    assert ranks[0]["tent_episodic_online"] == single["tent_episodic_online"]
    assert ranks[1]["tpt_preds"] == [] and ranks[1]["tpt_online"] is None
    first, resumed, replayed, wrote = ranks[0]["samples_resumed"]
    assert first == resumed == single["samples_resumed"][0] and replayed == [] and wrote
    assert ranks[1]["samples_resumed"] == (None, None, [], False)  # rank 1 neither scores nor writes
    # an online stream runs on rank 0 alone
    assert ranks[0]["tent_online"] == single["tent_online"] and ranks[1]["tent_online"] is None


def test_a_dead_rank_fails_the_others_with_a_clear_error(tmp_path):
    codes = launch(_killed_worker, tmp_path, timeout=180)
    assert codes[1] == 3
    text = (tmp_path / "rank0.txt").read_text()
    seconds, msg = text.split("\n", 1)
    assert msg.startswith("DistributedError") and "another rank has probably died" in msg, msg
    assert float(seconds) < 60  # failed within the collective timeout (20 s) plus start-up, not a hang


def test_run_script_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node=2 scripts/run.py ...` (gloo on the CPU) ends with the one-process accuracy matrix,
    and rank 0 alone writes the run folder."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = ["strategy=finetune", "stream=world_cil5", "stream.train_per_class=4", "stream.test_per_class=2",
            "strategy.epochs=1", "strategy.lr=3e-4", "hooks=minimal", "progress=false", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` entry point, venv or not
    two = subprocess.run([*torchrun, "--standalone", "--nproc_per_node=2", "scripts/run.py", *args,
                          f"out_dir={tmp_path / 'two'}"], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "scripts/run.py", *args, f"out_dir={tmp_path / 'one'}"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("one", "two"))
    assert a["results"]["accuracy_matrix"] == b["results"]["accuracy_matrix"]
    assert b["provenance"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert "(2 ranks)" in two.stdout and two.stdout.count("accuracy (%)") == 1  # one summary, from rank 0


def test_a_stalled_rank_fails_the_others_after_the_timeout(tmp_path):
    codes = launch(_stalled_worker, tmp_path, timeout=120, stragglers_s=2)  # rank 1 still asleep: killed
    assert codes[0] == 0
    seconds, msg = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert msg.startswith("DistributedError") and "timeout" in msg, msg
    assert 4 < float(seconds) < 45  # the 5 s collective timeout, not the 120 s stall
