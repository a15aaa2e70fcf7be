"""The scripts as one set: every world experiment composes, one experiment of each family runs through
`scripts/run.py -m` on tiny data and `scripts/report.py` tabulates what it wrote, every benchmark runs in its quick
mode, and no script edits ``sys.path``."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
FAMILIES = ("world_cl", "world_cl_visual", "world_lora", "world_tpt")
METHODS = sorted(f"{p.parent.name}/{p.stem}" for f in FAMILIES for p in (ROOT / "configs/experiment" / f).glob("*.yaml")
                 if p.stem != "base")
OWN_PATHS: tuple[str, ...] = ()  # every script is part of the set


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _script(name: str, *args: str, cwd: Path, timeout: int = 300, check: bool = True
            ) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, env=_env(),
                       cwd=cwd, timeout=timeout)
    assert r.returncode == 0 or not check, f"{name} {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def _resolved(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("run", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.choices...} in out_dir
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


@pytest.mark.parametrize("experiment", METHODS)
def test_world_experiments_compose_to_their_own_folder(experiment):
    family, method = experiment.split("/")
    cfg = _resolved([f"experiment={experiment}", "seed=2"])
    get_object(cfg["strategy"]["_target_"]), get_object(cfg["stream"]["_target_"])
    assert cfg["name"] == family and cfg["method"] == method
    if family == "world_cl_visual":
        assert cfg["strategy"]["params"] == "visual."
    assert cfg["out_dir"].startswith(f"runs/{family}/") and cfg["out_dir"].endswith(f"/{method}/seed2")
    assert cfg["stream"]["seed"] == 2  # the seed sweep changes the world, as the old scripts' --seed did


def test_world_experiments_keep_the_old_scripts_settings():
    ft = _resolved(["experiment=world_cl/finetune"])
    lwf = _resolved(["experiment=world_cl/lwf"])
    for key in ("lr", "warmup", "label_smoothing", "batch_size", "iterations", "params"):
        assert ft["strategy"][key] == lwf["strategy"][key], key  # one schedule for every world_cl method
    assert (ft["strategy"]["lr"], ft["strategy"]["iterations"], ft["strategy"]["batch_size"]) == (3e-4, 10, 32)
    assert ft["stream"]["test_per_class"] == 5 and ft["hooks"]["retention"]["controls"]["n"] == 200
    assert _resolved(["experiment=world_cl/wise_ft"])["strategy"]["wise_alpha"] == 0.5
    dil = _resolved(["experiment=world_lora/codyra", "stream=world_dil"])
    assert dil["out_dir"] == "runs/world_lora/world_dil/codyra/seed0" and dil["stream"]["test_per_class"] == 5
    assert dil["strategy"]["kappa_max"] == pytest.approx(0.005 * 500 / dil["strategy"]["iterations"])
    online = _resolved(["experiment=world_tpt/online_tpt", "stream.severity=3"])
    assert online["samples"]["reset"] == "never" and online["stream"]["setting"] == "reset"
    assert online["out_dir"] == "runs/world_tpt/severity3/online_tpt/seed0"
    assert _resolved(["experiment=world_tpt/tpt"])["samples"]["reset"] is None  # TPT's default: episodic
    assert _resolved(["experiment=world_tpt/ctpt"])["strategy"]["ctpt_lambda"] == 20.0


def test_world_cl_sweep_runs_and_report_tabulates_it(tmp_path):
    tiny = ["stream.n_tasks=2", "stream.train_per_class=2", "stream.test_per_class=1", "hooks.retention.controls.n=10",
            "++strategy.iterations=2", "++strategy.batch_size=4", "+hooks.results.plot=false", "progress=false",
            "threads=1"]
    _script("run.py", "-m", "experiment=world_cl/wise_ft,world_cl/finetune", "seed=0,1", *tiny, cwd=tmp_path)
    for method in ("wise_ft", "finetune"):
        for seed in (0, 1):
            assert json.loads((tmp_path / f"runs/world_cl/{method}/seed{seed}/results.json").read_text())["finished"]
    out = tmp_path / "summary.json"
    r = _script("report.py", "runs/world_cl", "--json", str(out), "--png", str(tmp_path / "steps.png"), cwd=tmp_path)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| world_cl |")]
    assert [row.split(" | ")[2:4] for row in rows] == [["finetune", "n=2"], ["wise_ft", "n=2"]]
    assert all(" ± " in row and "–" not in row for row in rows)
    summary = json.loads(out.read_text())
    assert summary["runs"] == 4 and [g["n"] for g in summary["groups"]] == [2, 2]
    assert summary["groups"][0]["seeds"] == [0, 1] and len(summary["groups"][0]["curve"]) == 2
    assert (tmp_path / "steps.png").stat().st_size > 0


@pytest.mark.slow
def test_world_lora_and_tpt_experiments_run_and_report(tmp_path):
    _script("run.py", "experiment=world_lora/codyra", "stream=world_dil", "stream.train_per_class=1",
            "stream.test_per_class=1", "strategy.iterations=2", "strategy.batch_size=8",
            "hooks.retention.controls.n=10", "progress=false", "threads=1", cwd=tmp_path)
    _script("run.py", "experiment=world_tpt/online_tpt", "stream.corruptions=[contrast]", "strategy.n_views=3",
            "hooks.latency.warmup=1", "progress=false", "threads=1", cwd=tmp_path)
    r = _script("report.py", "runs", cwd=tmp_path)
    lora = next(line for line in r.stdout.splitlines() if "| codyra |" in line)
    assert lora.startswith("| world_lora | world-dil | codyra | n=1 |") and "–" not in lora  # ranks and drift
    tpt = next(line for line in r.stdout.splitlines() if "| online_tpt |" in line)
    assert tpt.startswith("| world_tpt | world-shift-reset | online_tpt | n=1 |") and "–" not in tpt


@pytest.mark.parametrize("bench", ["bench_world.py", "bench_rapf.py", "bench_tpt.py",
                                   pytest.param("bench_online.py", marks=pytest.mark.slow)])
def test_benchmarks_run_in_quick_mode(bench, tmp_path):
    out = tmp_path / "bench.json"
    _script(bench, "--quick", "--threads", "1", "--out", str(out), cwd=tmp_path)
    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["provenance"]["torch_threads"] == 1
    assert {"packages", "git_commit", "load_average"} <= set(doc["provenance"])


def test_no_script_edits_sys_path():
    offenders = [p.name for p in SCRIPTS.glob("*.py") if p.name not in OWN_PATHS and "sys.path" in p.read_text()]
    assert offenders == []


def test_benchlib_table_and_ratio():
    sys.path.insert(0, str(SCRIPTS))  # (the test process, not a script: scripts/ is not on its path)
    try:
        import benchlib
    finally:
        sys.path.remove(str(SCRIPTS))
    text = benchlib.table([{"a": "x", "b": 1.234}, {"a": "long", "b": None}],
                          [("name", lambda r: r["a"], ""), ("b", lambda r: r["b"], ".1f"),
                           ("c", lambda r: r["c"], "d")])
    assert text.splitlines() == ["name    b  c", "------------", "x     1.2  –", "long    –  –"]
    assert benchlib.ratio(3.0, 1.5) == 2.0 and benchlib.ratio(None, 1.0) is None and benchlib.ratio(1.0, 0) is None
    calls = []
    t = benchlib.interleaved({"a": calls.append, "b": lambda i: calls.append(-i)}, 2)
    assert calls == [0, 0, 1, -1, 2, -2] and set(t) == {"a", "b"} and t["a"]["n"] == 2
    # in turns of 3: the first call of each turn is untimed (warm-up after the other contender), arguments wrap
    calls.clear()
    timed_args = []
    orig = benchlib.timed

    def spy(f, device=None):
        out = orig(f, device)
        timed_args.append(calls[-1])
        return out
    benchlib.timed = spy
    try:
        t = benchlib.interleaved({"a": calls.append, "b": lambda i: calls.append(-i)}, 3, warmup=False, block=3)
    finally:
        benchlib.timed = orig
    assert calls == [3, 1, 2, -3, -1, -2, 2, 3, -2, -3] and t["a"]["n"] == 3
    assert timed_args == [1, 2, -1, -2, 3, -3]  # n timed calls per contender, never the first of a turn
    with pytest.raises(ValueError, match="block"):
        benchlib.interleaved({"a": calls.append}, 1, block=0)


def test_cache_diagnosis_replay_by_hand(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import cache_diagnosis
    finally:
        sys.path.remove(str(SCRIPTS))
    import math

    import torch

    from ctta.strategies._dual_cache import DualCacheConfig
    head = torch.eye(2)
    f2 = torch.nn.functional.normalize(torch.tensor([0.7070, 0.7072]), dim=0)  # class 0, zero-shot says 1 (by 0.02)
    feats, labels = torch.stack([torch.tensor([1.0, 0.0]), f2, torch.tensor([0.0, 1.0])]), torch.tensor([0, 0, 1])
    r = cache_diagnosis.replay(feats, labels, head, DualCacheConfig())
    # at f2: pseudo cache {0: f1, 1: f2} -> class 0 gets 2·exp(−5(1 − f1·f2)) = 0.46, class 1 gets 2·1: stays wrong;
    # oracle cache {0: f1, f2} -> class 0 gets 2.46: right. f1 and f3 are right with any cache.
    assert (r["acc_zeroshot"], r["acc_pseudo"], r["acc_oracle"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    # f1 under 0 and f3 under 1 are right, f2 is cached under class 1 though its class is 0
    assert r["purity"] == pytest.approx(2 / 3) and r["cached_items"] == 3
    # only at f3 does the oracle cache hold both classes: own class f3 (weight 1), others f1 and f2
    assert r["w_same"] == pytest.approx(1.0)
    assert r["w_other"] == pytest.approx((math.exp(-5.0) + math.exp(-5 * (1 - float(f2[1])))) / 2, rel=1e-5)
    assert r["text_margin"] == pytest.approx((100 + 100 * float(f2[1] - f2[0]) + 100) / 3, rel=1e-5)
    # the one zero-shot error: f2 (class 0) read as class 1, which leads by 100·(f2[1] − f2[0]) = 0.028
    assert r["gap_wrong"] == pytest.approx(100 * float(f2[1] - f2[0]), rel=1e-4)
    assert r["top_confusions"] == [[0, 1, 1]]
    p2 = torch.softmax(100 * f2, 0)  # near 50/50: entropy close to ln 2; f1 and f3 at 100·cos: near 0
    assert r["entropy_wrong"] == pytest.approx(float(-(p2 * p2.log()).sum()), rel=1e-5)
    assert r["entropy_right"] == pytest.approx(0.0, abs=1e-30)
    # f2's nearest other image is f3 (cos 0.7072 vs 0.7070), of the other class: nothing right of its class nearby;
    # class 0 is half right, so its error is not in a lost class
    assert (r["nn_fixable"], r["errors_in_lost_classes"]) == (0.0, 0.0)
    # a tilted head: a = (1, -0.05) is read as class 0 (right), b = (0.96, 0.28) of class 0 as class 1 (wrong), and
    # b's nearest other image is a (cos 0.95 vs 0.28 to c): a right answer of its class, so the error is NN-fixable
    tilted = torch.tensor([[0.6, -0.8], [0.6, 0.8]])
    a, b, c = (torch.nn.functional.normalize(torch.tensor(v), dim=0) for v in ([1.0, -0.05], [0.96, 0.28], [0.0, 1.0]))
    r = cache_diagnosis.replay(torch.stack([a, b, c]), torch.tensor([0, 0, 1]), tilted, DualCacheConfig())
    assert r["acc_zeroshot"] == pytest.approx(2 / 3) and r["nn_fixable"] == 1.0 and r["errors_in_lost_classes"] == 0.0
    # two wrong images of class 0 (each the other's neighbour): class 0 is lost (0 % right), nothing is NN-fixable
    b2 = torch.nn.functional.normalize(torch.tensor([0.9, 0.436]), dim=0)
    r = cache_diagnosis.replay(torch.stack([b, b2, c]), torch.tensor([0, 0, 1]), tilted, DualCacheConfig())
    assert r["acc_zeroshot"] == pytest.approx(1 / 3) and r["nn_fixable"] == 0.0 and r["errors_in_lost_classes"] == 1.0
    out = tmp_path / "d.json"
    _script("cache_diagnosis.py", "--per-class", "1", "--corruptions", "contrast", "--out", str(out), cwd=tmp_path)
    doc = json.loads(out.read_text())
    assert set(doc["domains"]) == {"contrast-3"} and doc["domains"]["contrast-3"]["n"] == 100
    assert doc["provenance"]["seed"] == 0
    _script("cache_diagnosis.py", "--per-class", "1", "--styles", "textured", "--out", str(out), cwd=tmp_path)
    doc = json.loads(out.read_text())
    assert set(doc["domains"]) == {"textured"} and doc["styles"] == ["textured"] and doc["severity"] is None
    assert all(len(c) == 3 and isinstance(c[0], str) for c in doc["domains"]["textured"]["top_confusions"])
    bad = subprocess.run([sys.executable, str(SCRIPTS / "cache_diagnosis.py"), "--per-class", "0"],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "--per-class must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, str(SCRIPTS / "cache_diagnosis.py"), "--capacity", "0"],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "--capacity must be at least 1" in bad.stderr and "Traceback" not in bad.stderr


def test_tower_drift_by_hand():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import tower_drift
    finally:
        sys.path.remove(str(SCRIPTS))
    import torch

    # two classes in 2-D; the text of class 0 turned by 90 degrees during the run, the images by 60 and 0 degrees
    t0, t1 = torch.eye(2), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    f0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c, s = 0.5, 3 ** 0.5 / 2
    f1 = torch.tensor([[c, s], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    r = tower_drift.tower_table(f0, f1, y, t0, t1, torch.tensor([0]))
    assert r["text_cos"] == pytest.approx(0.0)  # class 0's text only
    assert r["image_cos"] == pytest.approx((c + 1.0) / 2)
    # end·end: f1[0]·t1 = (s, -c) -> 0 right; f1[1]·t1 = (1, 0) -> 0 wrong.
    # end·start: (c, s) -> 1 wrong; (0, 1) right
    # start·end: (0, -1) -> 0 right; (1, 0) -> 0 wrong.  start·start: both right
    assert r["acc"] == pytest.approx({"end_end": 0.5, "end_start": 0.5, "start_end": 0.5, "start_start": 1.0})


def test_tower_drift_reads_a_run_and_reproduces_its_accuracy(tmp_path):
    tiny = ["stream.n_tasks=2", "stream.train_per_class=2", "stream.test_per_class=1", "hooks.retention.controls.n=10",
            "strategy=finetune", "strategy.iterations=2", "strategy.batch_size=8", "+hooks.results.plot=false",
            "progress=false", "threads=1", "out_dir=run"]
    _script("run.py", *tiny, cwd=tmp_path)
    out = tmp_path / "drift.json"
    _script("tower_drift.py", "run", "--json", str(out), cwd=tmp_path)
    doc = json.loads(out.read_text())
    last_row = json.loads((tmp_path / "run/results.json").read_text())["results"]["accuracy_matrix"][-1]
    rows = doc["runs"][0]["rows"]
    assert [r["task"] for r in rows] == [1, 2] and doc["runs"][0]["strategy"] == "Finetune"
    assert [r["acc"]["end_end"] for r in rows] == pytest.approx(last_row)  # the run's own evaluation, recomputed
    assert all(0 < r["text_cos"] <= 1.0 + 1e-6 and 0 < r["image_cos"] <= 1.0 + 1e-6 for r in rows)
    assert doc["provenance"]["packages"]["torch"]
    bad = subprocess.run([sys.executable, str(SCRIPTS / "tower_drift.py"), str(tmp_path)], capture_output=True,
                         text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "not a task-stream run folder" in bad.stderr and "Traceback" not in bad.stderr


def test_report_paired_gains_on_the_command_line(tmp_path):
    def doc(method, seed, acc):
        cfg = {"name": "w", "method": method, "seed": seed, "stream": {"seed": seed}}
        return {"finished": True, "stream": {"name": "s"}, "strategy": method, "provenance": {"config": cfg},
                "results": {"online": {"per_domain": {"d": {"accuracy": acc, "ece": 0.1, "n": 4}},
                                       "mean_domain_accuracy": acc, "cumulative_accuracy": acc}}}
    for method, accs in (("zeroshot", (0.40, 0.50)), ("tda", (0.42, 0.51))):
        for seed, acc in enumerate(accs):
            path = tmp_path / "runs" / method / f"seed{seed}" / "results.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(doc(method, seed, acc)))
    r = _script("report.py", "runs", "--baseline", "zeroshot", "--json", "out.json", cwd=tmp_path)
    assert "| w | s | tda | n=2 | +1.50 ± 6.35 |" in r.stdout  # +2 and +1 points: sd 0.707, t(1) 12.706
    paired = json.loads((tmp_path / "out.json").read_text())["paired"]
    assert paired[0]["metrics"]["online_accuracy"]["values"] == pytest.approx([0.02, 0.01])


def test_report_skips_foreign_files_and_refuses_a_seed_counted_twice(tmp_path):
    """A truncated results.json crashed the report, and a copied run folder was pooled as another seed."""
    def doc(seed, acc, weights="aaa"):
        cfg = {"name": "w", "method": "tda", "seed": seed, "stream": {"seed": seed}}
        return {"finished": True, "stream": {"name": "s"}, "strategy": "tda",
                "provenance": {"config": cfg, "model": {"checkpoint_sha256": weights}},
                "results": {"online": {"per_domain": {"d": {"accuracy": acc, "ece": 0.1, "n": 4}},
                                       "mean_domain_accuracy": acc, "cumulative_accuracy": acc}}}

    def put(rel, text):
        path = tmp_path / "runs" / rel / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(text)
    put("a", json.dumps(doc(0, 0.4)))
    put("b", json.dumps(doc(1, 0.5)))
    put("c", json.dumps(doc(0, 0.9, weights="bbb")))  # other weights: another model, its own row
    put("broken", '{"finished": tr')
    put("foreign", json.dumps({"finished": True}))
    r = _script("report.py", "runs", cwd=tmp_path)
    assert "| w | s | tda (weights=aaa) | n=2 |" in r.stdout and "| w | s | tda (weights=bbb) | n=1 |" in r.stdout
    assert "2 runs in" not in r.stdout and "3 runs in 2 groups" in r.stdout
    assert "left out, not a run's results.json (2)" in r.stderr and "broken/results.json (unreadable" in r.stderr
    put("a_copy", json.dumps(doc(0, 0.4)))
    r = _script("report.py", "runs", cwd=tmp_path, check=False)
    assert r.returncode != 0 and "the same seed of the same configuration appears twice" in r.stderr
    assert "runs/a/results.json" in r.stderr and "runs/a_copy/results.json" in r.stderr and "Traceback" not in r.stderr
