"""`ctta.report`'s many-run aggregation on hand-made results documents: grouping, means and t intervals on known
numbers, tables with "–" for what a run did not measure."""
import math

import pytest

from ctta import report as R


def _doc(method="finetune", seed=0, average=0.5, last=0.4, forgetting=0.1, ratio=0.9, drop=0.05, name="world_cl",
         stream="world-cil10", finished=True, curve=(0.6, 0.4), **config):
    cfg = {"name": name, "method": method, "seed": seed, "out_dir": f"runs/{name}/{method}/seed{seed}",
           "stream": {"seed": seed, "n_tasks": 10}, "strategy": {"lr": 3e-4, **config}}
    return {"finished": finished, "stream": {"name": stream}, "strategy": "Finetune",
            "provenance": {"seed": seed, "config": cfg},
            "results": {"accuracy_matrix": [[0.6, 0.1], [0.5, 0.4]],
                        "metrics": {"average": average, "last": last, "forgetting": forgetting, "bwt": -forgetting,
                                    "step_accuracy": list(curve)},
                        "retention": {"mean_ratio": ratio, "mean_drop": drop}}}


def _online_doc(method="tpt", seed=0, accs=(0.2, 0.4), eces=(0.1, 0.3), severity=5):
    per = {f"d{i}": {"accuracy": a, "ece": e, "n": 10} for i, (a, e) in enumerate(zip(accs, eces))}
    cfg = {"name": "world_tpt", "method": method, "seed": seed, "stream": {"severity": severity, "seed": seed}}
    return {"finished": True, "stream": {"name": "world-shift-reset"}, "strategy": "TPT",
            "provenance": {"config": cfg},
            "results": {"online": {"per_domain": per, "mean_domain_accuracy": sum(accs) / len(accs), "ece": 0.5,
                                   "cumulative_accuracy": 0.3},
                        "latency": {"p50_ms": 12.0, "p95_ms": 20.0, "samples_per_s": 75.0}}}


def test_t_interval_on_known_numbers():
    s = R.mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert s["mean"] == pytest.approx(2.0) and s["n"] == 3
    assert s["half"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-6)
    assert (s["lo"], s["hi"]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    two = R.mean_interval([0.5, 0.7])  # sd = 0.1414, t(0.975, 1) = 12.706: half = 12.706 * 0.1 = 1.2706
    assert two["half"] == pytest.approx(1.2706, rel=1e-4)
    one = R.mean_interval([0.25])
    assert one["mean"] == 0.25 and one["half"] is None and one["n"] == 1
    with pytest.raises(ValueError, match="no values"):
        R.mean_interval([])


def test_t_quantiles_table_and_large_df():
    assert R.t_quantile(1) == 12.706 and R.t_quantile(30) == 2.042
    assert R.t_quantile(60) == pytest.approx(2.0003, abs=2e-3)  # tables: 2.000
    assert R.t_quantile(10_000) == pytest.approx(1.960, abs=1e-3)
    with pytest.raises(ValueError):
        R.t_quantile(0)


def test_grouping_by_method_and_override_not_by_seed():
    docs = [_doc("finetune", s, average=a) for s, a in ((0, 0.5), (1, 0.6), (2, 0.7))]
    docs += [_doc("zeroshot", 0, average=0.8)]
    docs += [_doc("lwf", s, params="visual.") for s in (0, 1)] + [_doc("lwf", 0, params="")]
    groups = R.group_runs(R.run_record(d, f"p{i}") for i, d in enumerate(docs))
    labels = [g[0] for g in groups]
    # zero-shot first; stream.seed follows the seed and out_dir is ignored, so seeds share a group
    assert labels == ["zeroshot", "finetune", "lwf (strategy.params='')", "lwf (strategy.params=visual.)"]
    assert [len(g[2]) for g in groups] == [1, 3, 1, 2]
    assert groups[3][1] == {"strategy.params": "visual."}
    rows = R.summarize_groups(groups)
    ft = rows[1]
    assert ft["n"] == 3 and ft["seeds"] == [0, 1, 2] and ft["paths"] == ["p0", "p1", "p2"]
    assert ft["metrics"]["average"]["mean"] == pytest.approx(0.6)
    assert ft["metrics"]["average"]["half"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-6)
    assert ft["curve"] == pytest.approx([0.6, 0.4])


def test_wall_time_column_when_runs_record_it():
    timed = _doc("finetune")
    timed["results"]["timing"] = {"train_s": [50.0, 40.0], "evaluate_s": [20.0, 10.0], "wall_s": 120.0}
    rows = R.summarize_groups(R.group_runs([R.run_record(timed), R.run_record(_doc("zeroshot"))]))
    lines = R.cl_markdown(rows).splitlines()
    assert lines[0].endswith("| wall min (train + eval) |")
    assert lines[2].endswith("| – |") and lines[3].endswith("| 2.0 |")  # 120 s; an untimed run shows a dash
    assert "wall" not in R.cl_markdown(R.summarize_groups(R.group_runs([R.run_record(_doc())]))).splitlines()[0]


def test_loading_options_never_split_a_group():
    docs = [_doc("finetune", 0), _doc("finetune", 1)]
    docs[1]["provenance"]["config"]["loading"] = {"workers": "auto", "prefetch": 2}  # added to configs later
    groups = R.group_runs(R.run_record(d) for d in docs)
    assert [(g[0], len(g[2])) for g in groups] == [("finetune", 2)]


def test_different_names_and_streams_never_mix():
    docs = [_doc(name="world_cl"), _doc(name="world_cl_visual"), _doc(stream="world-dil")]
    rows = R.summarize_groups(R.group_runs(R.run_record(d) for d in docs))
    assert sorted((r["name"], r["stream"], r["n"]) for r in rows) == [
        ("world_cl", "world-cil10", 1), ("world_cl", "world-dil", 1), ("world_cl_visual", "world-cil10", 1)]


def test_cl_markdown_cells_and_missing_metric():
    docs = [_doc("finetune", s, average=a, last=0.4) for s, a in ((0, 0.5), (1, 0.6), (2, 0.7))]
    no_retention = _doc("zeroshot")
    del no_retention["results"]["retention"]
    rows = R.summarize_groups(R.group_runs([R.run_record(d) for d in docs + [no_retention]]))
    lines = R.cl_markdown(rows).splitlines()
    assert lines[0] == ("| experiment | stream | method | seeds | average | last | forgetting | retention ratio | "
                        "retention drop (pts) |")
    half = 100 * 4.303 * 0.1 / math.sqrt(3)  # 24.8 points
    assert lines[2] == "| world_cl | world-cil10 | zeroshot | n=1 | 50.0 | 40.0 | 10.0 | – | – |"
    assert lines[3] == (f"| world_cl | world-cil10 | finetune | n=3 | 60.0 ± {half:.1f} | 40.0 ± 0.0 | 10.0 ± 0.0 | "
                        "0.900 ± 0.000 | 5.0 ± 0.0 |")


def test_rank_columns_appear_with_lora_summaries():
    d = _doc("codyra")
    d["results"]["strategy"] = {"tasks": [{"mean_effective_rank": 8.0, "drift": 1.0},
                                          {"mean_effective_rank": 6.0, "drift": 2.5}]}
    rows = R.summarize_groups(R.group_runs([R.run_record(d), R.run_record(_doc("zeroshot"))]))
    lines = R.cl_markdown(rows).splitlines()
    assert lines[0].endswith("| mean eff. rank | ‖θ_T − θ_0‖ |")
    assert lines[2].endswith("| – | – |")  # zero-shot: no adapters
    assert lines[3].endswith("| 7.00 | 2.50 |")  # mean over tasks; drift after the last task


def test_transfer_column_first_when_a_stream_measures_it():
    mtil = [_doc("finetune", s, stream="world-mtil-I") for s in (0, 1)]
    for d, t in zip(mtil, (0.5, 0.7)):
        d["results"]["metrics"]["transfer"] = t
    rows = R.summarize_groups(R.group_runs([R.run_record(d) for d in mtil + [_doc("zeroshot")]]))
    lines = R.cl_markdown(rows).splitlines()
    assert lines[0].startswith("| experiment | stream | method | seeds | transfer | average |")
    half = 100 * 12.706 * math.sqrt(0.02) / math.sqrt(2)  # sd 0.1414, t(0.975, 1)
    by_stream = {line.split(" | ")[1]: line for line in lines[2:]}
    assert by_stream["world-mtil-I"].startswith(f"| world_cl | world-mtil-I | finetune | n=2 | 60.0 ± {half:.1f} | 50.0")
    assert by_stream["world-cil10"].startswith("| world_cl | world-cil10 | zeroshot | n=1 | – | 50.0")
    assert "transfer" not in R.cl_markdown(R.summarize_groups(R.group_runs([R.run_record(_doc())]))).splitlines()[0]


def test_tta_rows_domain_means_and_severity_split():
    docs = [_online_doc("tpt", s, severity=sev) for s in (0, 1) for sev in (3, 5)]
    records = [R.run_record(d) for d in docs]
    assert records[0].kind == "samples" and records[0].metrics["ece"] == pytest.approx(0.2)  # mean over domains
    rows = R.summarize_groups(R.group_runs(records))
    assert [r["label"] for r in rows] == ["tpt (stream.severity=3)", "tpt (stream.severity=5)"]
    line = R.tta_markdown(rows).splitlines()[2]
    assert line == "| world_tpt | world-shift-reset | tpt (stream.severity=3) | n=2 | 30.0 ± 0.0 | 20.0 ± 0.0 | " \
                   "12.0 ± 0.0 | 20.0 ± 0.0 | 75 ± 0 |"


def test_first_and_last_quarter_columns_when_the_runs_have_them():
    doc = _online_doc("tda", 0)
    for d, parts in zip(doc["results"]["online"]["per_domain"].values(), ([0.1, 0.2, 0.3, 0.3], [0.3, 0.4, 0.5, None])):
        d["accuracy_by_part"] = parts  # the second domain was too short for its last quarter: left out of both means
    r = R.run_record(doc)  # (first and last over the same domains: it used to count in the first and not the last)
    assert r.metrics["online_first_part"] == pytest.approx(0.1) and r.metrics["online_last_part"] == pytest.approx(0.3)
    table = R.tta_markdown(R.summarize_groups(R.group_runs([r]))).splitlines()
    assert "| first quarter % | last quarter % |" in table[0]
    assert table[2] == "| world_tpt | world-shift-reset | tda | n=1 | 30.0 | 20.0 | 10.0 | 30.0 | 12.0 | 20.0 | 75 |"
    assert "quarter" not in R.tta_markdown(R.summarize_groups(R.group_runs([R.run_record(_online_doc())])))


def test_flatten_keeps_lists_whole():
    assert R.flatten({"a": {"b": [1, [2, 3]], "c": None}, "d": "x"}) == {"a.b": (1, (2, 3)), "a.c": None, "d": "x"}


def test_sample_runs_carry_their_cumulative_accuracy_curve(tmp_path):
    curve = {"every": 2, "position": [2, 4, 5], "cumulative_accuracy": [0.5, 0.75, 0.6]}
    doc = {"strategy": "TDA", "stream": {"name": "toy"}, "provenance": {"config": {"name": "x", "seed": 0}},
           "results": {"online": {"mean_domain_accuracy": 0.6, "cumulative_accuracy": 0.6, "curve": curve}}}
    r = R.run_record(doc, "a")
    assert r.kind == "samples" and r.curve == [0.5, 0.75, 0.6] and r.positions == [2, 4, 5]
    row = R.summarize_groups(R.group_runs([r, R.run_record({**doc, "provenance": {"config": {"name": "x",
                                                                                          "seed": 1}}}, "b")]))[0]
    assert row["positions"] == [2, 4, 5] and row["curve"] == pytest.approx([0.5, 0.75, 0.6])
    from ctta.plots import plot_curves
    out = plot_curves({"tda": row["curve"]}, tmp_path / "c.png", x={"tda": row["positions"]},
                      xlabel="stream position (samples)")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_paired_gains_over_a_baseline_by_seed_and_split():
    # zero-shot and TDA on seeds 0-2 at two severities; TDA's seed 3 has no zero-shot run and is left out
    zs = {(3, 0): 0.40, (3, 1): 0.41, (3, 2): 0.42, (5, 0): 0.10, (5, 1): 0.20, (5, 2): 0.30}
    tda = {(3, 0): 0.41, (3, 1): 0.43, (3, 2): 0.42, (5, 0): 0.10, (5, 1): 0.20, (5, 2): 0.30, (3, 3): 0.9}
    docs = [_online_doc("zeroshot", s, accs=(a, a), severity=sev) for (sev, s), a in zs.items()]
    docs += [_online_doc("tda", s, accs=(a, a), severity=sev) for (sev, s), a in tda.items()]
    groups = R.group_runs(R.run_record(d) for d in docs)
    rows = R.paired_gains(groups, "zeroshot")
    assert [r["label"] for r in rows] == ["tda (stream.severity=3)", "tda (stream.severity=5)"]
    sev3, sev5 = rows
    assert sev3["n"] == 3 and sorted(sev3["seeds"]) == [0, 1, 2]  # seed 3 unpaired
    # severity 3: differences +1, +2, 0 points: mean 1, sd 1, half-width 4.303 / sqrt(3) points;
    # severity 5 pairs with severity 5 only: every difference 0
    g = sev3["metrics"]["online_accuracy"]
    assert g["mean"] == pytest.approx(0.01) and g["half"] == pytest.approx(0.01 * 4.303 / math.sqrt(3), rel=1e-6)
    assert sev5["metrics"]["online_accuracy"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert "online_first_part" not in sev3["metrics"]  # these runs did not record quarters
    table = R.paired_markdown(rows).splitlines()
    assert table[0] == "| experiment | stream | method | paired seeds | Δ online acc. (pts) vs zeroshot |"
    half = f"{4.303 / math.sqrt(3):.2f}"
    assert table[2] == f"| world_tpt | world-shift-reset | tda (stream.severity=3) | n=3 | +1.00 ± {half} |"
    assert R.paired_gains(groups, "nonexistent") == [] and R.paired_markdown([]) == ""
    # two baseline runs that both match (same seed, nothing tells them apart): ambiguous, no pair
    twice = R.group_runs(R.run_record(d) for d in [_online_doc("zeroshot", 0), _online_doc("zeroshot", 0),
                                                     _online_doc("tda", 0)])
    assert R.paired_gains(twice, "zeroshot") == []


def test_paired_gains_never_pair_runs_of_other_model_weights():
    def run(method, seed, acc, weights):
        doc = _online_doc(method, seed, accs=(acc, acc))
        doc["provenance"]["model"] = {"checkpoint_sha256": weights}
        return R.run_record(doc)
    # zero-shot on weights A only, TDA on weights B only: no pair (it paired them, +0.30)
    only = R.group_runs([run("zeroshot", s, 0.3 + s / 50, "A") for s in (0, 1)]
                        + [run("tda", s, 0.6 + s / 50, "B") for s in (0, 1)])
    assert R.paired_gains(only, "zeroshot") == []
    # zero-shot on both: TDA pairs with its own weights' zero-shot (+0.10, +0.07; it found two and paired none)
    both = R.group_runs([run("zeroshot", s, a, "A") for s, a in ((0, 0.3), (1, 0.32))]
                        + [run("zeroshot", s, a, "B") for s, a in ((0, 0.5), (1, 0.55))]
                        + [run("tda", s, a, "B") for s, a in ((0, 0.6), (1, 0.62))])
    (row,) = R.paired_gains(both, "zeroshot")
    assert row["metrics"]["online_accuracy"]["values"] == pytest.approx([0.10, 0.07])
