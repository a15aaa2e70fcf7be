"""Summaries of results: one run's few lines (`format_summary`), and the tables of many runs (`scripts/report.py`).

Many runs: each ``results.json`` (written by `ctta.hooks.JsonResults`) becomes a `RunRecord` with its headline
metrics; `group_runs` puts runs of the same experiment ``name``, ``method`` and stream together and splits them by
the config values that differ between them (an override such as ``strategy.params=visual.``), but not by the seed
or anything that follows the seed; `summarize_groups` gives each metric's mean over the seeds and a 95 % Student-t
interval; `cl_markdown` / `tta_markdown` print the README's tables, with "–" for a metric a group lacks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

# config keys that say how or where a run went, not what it computed: never a reason to split a group
IGNORED_KEYS = ("seed", "out_dir", "name", "method", "progress", "threads", "device", "data_root", "dist_timeout_s",
                "samples.checkpoint_every", "samples.checkpoint_seconds")
IGNORED_PREFIXES = ("loading.",)  # workers, prefetch, device decode: the same batches whatever their values
# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
MISSING = "–"


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def format_summary(results: dict) -> str:
    """A few lines: the stream metrics (average / last / forgetting / BWT) and zero-shot retention."""
    lines = []
    m = results.get("metrics")
    if m:
        parts = [f"average {_pct(m['average'])}", f"last {_pct(m['last'])}"]
        if "transfer" in m:
            parts.insert(0, f"transfer {_pct(m['transfer'])}")
        parts += [f"forgetting {_pct(m['forgetting'])}", f"BWT {_pct(m['bwt'])}"]
        lines.append("accuracy (%): " + " | ".join(parts))
    r = results.get("retention")
    if r and "mean_ratio" in r:
        per = ", ".join(f"{k.split('/')[-1]} {_pct(v['acc0'])}→{_pct(v['acc'][-1])}" for k, v in r["tasks"].items())
        ratio = f"{r['mean_ratio']:.3f}" if r["mean_ratio"] is not None else "– (every control at 0 before)"
        lines.append(f"zero-shot retention: ratio {ratio}, drop {_pct(r['mean_drop'])} pts ({per})")
    o = results.get("online")
    if o:
        lines.append("online: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in o.items() if not isinstance(v, (dict, list))))
    return "\n".join(lines) if lines else "(no metrics)"


# ------------------------------------------------------------------------------------------------ many runs
@dataclass
class RunRecord:
    """One finished run: where it is, what it was (name, method, stream, seed, flattened config) and its headline
    metrics (fractions, as the hooks write them; absent when the run did not measure them)."""

    path: str
    name: str
    method: str
    stream: str
    seed: Any
    kind: str  # "tasks" (accuracy matrix) or "samples" (online test-time stream)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    curve: list[float] = field(default_factory=list)  # accuracy after each task, or cumulative online accuracy
    positions: list[int] = field(default_factory=list)  # sample streams: the stream positions of ``curve``
    commit: str | None = None  # code revision and model weights the run used (provenance)
    weights: str | None = None


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (lists kept whole, as tuples, so that they compare and hash)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tuple(flatten_list(node)) if isinstance(node, list) else node}


def flatten_list(items: list) -> list:
    return [tuple(flatten_list(v)) if isinstance(v, list) else repr(v) if isinstance(v, dict) else v for v in items]


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def run_record(doc: dict, path: str = "") -> RunRecord:
    """The headline figures of one ``results.json`` document (see `JsonResults`)."""
    res, prov = doc.get("results", {}), doc.get("provenance", {})
    config = prov.get("config") or {}
    strategy = str(doc.get("strategy", "?"))
    m, ret, on, lat = (res.get(k) or {} for k in ("metrics", "retention", "online", "latency"))
    domains = list((on.get("per_domain") or {}).values())
    # the quarter columns over the same domains: those long enough to have a first and a last part
    parts = [p for p in (d.get("accuracy_by_part") for d in domains) if p and p[0] is not None and p[-1] is not None]
    metrics: dict[str, float | None] = {
        "average": m.get("average"), "last": m.get("last"), "forgetting": m.get("forgetting"), "bwt": m.get("bwt"),
        "transfer": m.get("transfer"),
        "retention_ratio": ret.get("mean_ratio"), "retention_drop": ret.get("mean_drop"),
        "online_accuracy": on.get("mean_domain_accuracy"), "cumulative_accuracy": on.get("cumulative_accuracy"),
        "ece": _mean([d.get("ece") for d in domains]), "ece_pooled": on.get("ece"),
        # adaptation along each domain: the domain mean of the first and of the last stretch (quarter by default)
        "online_first_part": _mean([p[0] for p in parts]), "online_last_part": _mean([p[-1] for p in parts]),
        "p50_ms": lat.get("p50_ms"), "p95_ms": lat.get("p95_ms"), "samples_per_s": lat.get("samples_per_s"),
        "peak_rss_mb": (res.get("memory") or {}).get("peak_rss_mb"),
        "wall_min": (lambda w: w / 60 if w is not None else None)((res.get("timing") or {}).get("wall_s"))}
    tasks = (res.get("strategy") or {}).get("tasks") or []
    if tasks and all("mean_effective_rank" in t for t in tasks):
        metrics["effective_rank"] = _mean([t["mean_effective_rank"] for t in tasks])  # mean over tasks
        metrics["drift"] = tasks[-1].get("drift")  # ||θ_T − θ_0|| after the last task
    return RunRecord(path=path, name=str(config.get("name", "")), method=str(config.get("method") or strategy),
                     stream=str((doc.get("stream") or {}).get("name", "?")), seed=config.get("seed", prov.get("seed")),
                     kind="tasks" if "accuracy_matrix" in res else "samples" if on else "other",
                     config=flatten(config), metrics={k: float(v) for k, v in metrics.items() if v is not None},
                     curve=list(m.get("step_accuracy") or (on.get("curve") or {}).get("cumulative_accuracy") or []),
                     positions=list((on.get("curve") or {}).get("position") or []), commit=prov.get("git_commit"),
                     weights=(prov.get("model") or {}).get("checkpoint_sha256"))


def _follows_seed(key: str, runs: Sequence[RunRecord]) -> bool:
    return all(r.config.get(key) == r.seed for r in runs)


def group_runs(records: Iterable[RunRecord]) -> list[tuple[str, dict[str, Any], list[RunRecord]]]:
    """``(label, overrides, runs)`` per group. Runs share a group when they have the same name, method, stream and
    model weights (`RunRecord.weights`; runs of other weights are labelled ``weights=<hash prefix>``) and their
    configs differ only in ignored keys (`IGNORED_KEYS`, `IGNORED_PREFIXES`) and in keys that equal each run's seed
    (the stream's and the controls' ``seed: ${seed}``). ``overrides``: the values that set the group apart from the
    other runs of its name, method and stream. Zero-shot methods come first, then by name, stream, method."""
    buckets: dict[tuple[str, str, str, str], list[RunRecord]] = {}
    for r in records:  # runs of other model weights are other models: never pooled
        buckets.setdefault((r.name, r.stream, r.method, str(r.weights)), []).append(r)
    several = {k[:3] for k in buckets if sum(1 for j in buckets if j[:3] == k[:3]) > 1}
    out = []
    for (name, stream, method, weights), runs in sorted(buckets.items(), key=lambda kv: (
            kv[0][0], kv[0][1], "zeroshot" not in kv[0][2].lower(), kv[0][2], kv[0][3])):
        keys = sorted({k for r in runs for k in r.config})
        varying = [k for k in keys if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)
                   and len({repr(r.config.get(k)) for r in runs}) > 1
                   and not _follows_seed(k, runs)]
        subgroups: dict[tuple, list[RunRecord]] = {}
        for r in runs:
            subgroups.setdefault(tuple(repr(r.config.get(k)) for k in varying), []).append(r)
        for values, members in sorted(subgroups.items()):
            overrides = {k: members[0].config.get(k) for k in varying}
            if (name, stream, method) in several:
                overrides = {**overrides, "weights": weights[:12]}
            shown = ", ".join(f"{k}={v if v != '' else repr(v)}" for k, v in overrides.items())
            label = method + (f" ({shown})" if overrides else "")
            out.append((label, overrides, members))
    return out


def repeated_seeds(groups: Sequence[tuple[str, dict[str, Any], list[RunRecord]]]) -> list[str]:
    """Groups holding the same seed twice (a copied run folder, a rerun in another folder): a mean and interval
    "over seeds" would count one run twice. One line per repeat, naming the paths."""
    out = []
    for label, _, runs in groups:
        by_seed: dict[Any, list[str]] = {}
        for r in runs:
            by_seed.setdefault(r.seed, []).append(r.path)
        out += [f"{label}: seed {seed} in {', '.join(paths)}" for seed, paths in by_seed.items() if len(paths) > 1]
    return out


def t_quantile(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (table to 30, then Cornish–Fisher)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean over seeds and its 95 % t interval (``half``: half-width); with one value no interval (None)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values to aggregate")
    n, mean = len(xs), sum(xs) / len(xs)
    if n == 1:
        return {"mean": mean, "n": 1, "half": None, "lo": None, "hi": None, "values": xs}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "n": n, "half": half, "lo": mean - half, "hi": mean + half, "values": xs}


def summarize_groups(groups: Sequence[tuple[str, dict[str, Any], list[RunRecord]]]) -> list[dict[str, Any]]:
    """One row per group: label, name, method, stream, kind, overrides, seeds, paths, and per metric the
    `mean_interval` over the group's runs that have it; the mean accuracy curve (task streams of equal length)."""
    rows = []
    for label, overrides, runs in groups:
        names = sorted({k for r in runs for k in r.metrics})
        metrics = {k: mean_interval([r.metrics[k] for r in runs if k in r.metrics]) for k in names}
        curves = [r.curve for r in runs if r.curve]
        curve = ([sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
                 if curves and all(len(c) == len(curves[0]) for c in curves) else [])
        rows.append({"label": label, "name": runs[0].name, "method": runs[0].method, "stream": runs[0].stream,
                     "kind": runs[0].kind, "overrides": overrides, "n": len(runs),
                     "seeds": [r.seed for r in runs], "paths": [r.path for r in runs], "metrics": metrics,
                     "curve": curve, "positions": next((r.positions for r in runs if r.curve), []),
                     "commits": sorted({str(r.commit) for r in runs}),
                     "weights": sorted({str(r.weights) for r in runs})})
    return rows


def cell(row: dict, key: str, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    """``mean ± half`` of a row's metric (× ``scale``; ``signed``: with its sign, for changes), the mean alone when
    n = 1, "–" when absent."""
    s = row["metrics"].get(key)
    if s is None:
        return MISSING
    text = f"{scale * s['mean']:{'+' if signed else ''}.{digits}f}"
    return text if s["half"] is None else f"{text} ± {scale * s['half']:.{digits}f}"


def markdown(rows: Sequence[dict], columns: Sequence[tuple[str, str, float, int]], seeds: str = "seeds",
             signed: bool = False) -> str:
    """A markdown table: experiment, stream, method, ``seeds`` (``n=3``; with n=1 the cells carry no interval), then
    ``(header, metric, scale, digits)`` columns (``signed``: values with their sign)."""
    head = ["experiment", "stream", "method", seeds, *(c[0] for c in columns)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"] or MISSING, r["stream"], r["label"], f"n={r['n']}",
                 *(cell(r, k, s, d, signed) for _, k, s, d in columns)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


CL_COLUMNS = (("average", "average", 100.0, 1), ("last", "last", 100.0, 1), ("forgetting", "forgetting", 100.0, 1),
              ("retention ratio", "retention_ratio", 1.0, 3), ("retention drop (pts)", "retention_drop", 100.0, 1))
RANK_COLUMNS = (("mean eff. rank", "effective_rank", 1.0, 2), ("‖θ_T − θ_0‖", "drift", 1.0, 2))
TTA_COLUMNS = (("online acc. % (domain mean)", "online_accuracy", 100.0, 1), ("ECE % (domain mean)", "ece", 100.0, 1),
               ("p50 ms", "p50_ms", 1.0, 1), ("p95 ms", "p95_ms", 1.0, 1), ("samples/s", "samples_per_s", 1.0, 0))


TRANSFER_COLUMN = (("transfer", "transfer", 100.0, 1),)
WALL_COLUMN = (("wall min (train + eval)", "wall_min", 1.0, 1),)


def cl_markdown(rows: Sequence[dict]) -> str:
    """The README's continual-learning table: ZSCL's Transfer first when any row has it (streams scored per dataset,
    as MTIL), rank columns and the wall time (learning + evaluation, set-up excluded) when any row has them."""
    def has(key: str) -> bool:
        return any(key in r["metrics"] for r in rows)
    return markdown(rows, (TRANSFER_COLUMN if has("transfer") else ()) + CL_COLUMNS
                    + (RANK_COLUMNS if has("effective_rank") else ()) + (WALL_COLUMN if has("wall_min") else ()))


PART_COLUMNS = (("first quarter %", "online_first_part", 100.0, 1), ("last quarter %", "online_last_part", 100.0, 1))


def tta_markdown(rows: Sequence[dict]) -> str:
    """The README's test-time table: online accuracy and ECE (means over domains), latency, throughput; when the
    runs recorded it, the accuracy on the first and the last quarter of each domain (domain means), where a
    method that adapts along the stream shows its gain."""
    has_parts = any("online_first_part" in r["metrics"] for r in rows)
    return markdown(rows, TTA_COLUMNS[:2] + (PART_COLUMNS if has_parts else ()) + TTA_COLUMNS[2:])


# --------------------------------------------------------------------------------------------- paired gains
PAIRED_SAMPLE_METRICS = ("online_accuracy", "online_first_part", "online_last_part")
PAIRED_TASK_METRICS = ("average", "last")


def _baseline_for(run: RunRecord, keys: Sequence[str], baselines: Sequence[RunRecord]) -> RunRecord | None:
    """The one baseline run on the same experiment, stream, seed and model weights whose config agrees with ``run``
    on every key of ``keys`` that both configs have (the values that split the groups: a severity, a setting); None
    when there is none or more than one (ambiguous: no pair is made)."""
    found = [b for b in baselines if b.name == run.name and b.stream == run.stream and b.seed == run.seed
             and b.weights == run.weights
             and all(b.config.get(k) == run.config.get(k) for k in keys if k in b.config and k in run.config)]
    return found[0] if len(found) == 1 else None


def paired_gains(groups: Sequence[tuple[str, dict[str, Any], list[RunRecord]]], baseline: str,
                 metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per group, the change of each metric over the ``baseline`` method on the same experiment, stream and seed:
    the per-seed differences and their `mean_interval`. Pairing removes what the seeds share (a stream that is
    harder for every method), so a small gain that the unpaired intervals hide shows: e.g. TDA vs zero-shot on the
    same three streams. Groups of the baseline itself, and runs without a matching baseline run, are left out."""
    base_groups = [g for g in groups if g[2] and g[2][0].method == baseline]
    base_runs = [r for g in base_groups for r in g[2]]
    split = sorted({k for g in groups for k in g[1]})  # every key that sets a group apart
    rows = []
    for label, overrides, runs in groups:
        if not runs or runs[0].method == baseline:
            continue
        names = metrics or (PAIRED_TASK_METRICS if runs[0].kind == "tasks" else PAIRED_SAMPLE_METRICS)
        diffs: dict[str, list[float]] = {k: [] for k in names}
        seeds = []
        for r in runs:
            b = _baseline_for(r, split, base_runs)
            if b is None:
                continue
            seeds.append(r.seed)
            for k in names:
                if k in r.metrics and k in b.metrics:
                    diffs[k].append(r.metrics[k] - b.metrics[k])
        if not seeds:
            continue
        rows.append({"label": label, "name": runs[0].name, "method": runs[0].method, "stream": runs[0].stream,
                     "baseline": baseline, "n": len(seeds), "seeds": seeds,
                     "metrics": {k: mean_interval(v) for k, v in diffs.items() if v}})
    return rows


def paired_markdown(rows: Sequence[dict]) -> str:
    """The paired-gain table (points over the baseline, mean ± 95 % t interval over the paired seeds)."""
    if not rows:
        return ""
    names = [k for k in (*PAIRED_SAMPLE_METRICS, *PAIRED_TASK_METRICS) if any(k in r["metrics"] for r in rows)]
    header = {"online_accuracy": "Δ online acc. (pts)", "online_first_part": "Δ first quarter",
              "online_last_part": "Δ last quarter", "average": "Δ average", "last": "Δ last"}
    columns = [(f"{header.get(k, k)} vs {rows[0]['baseline']}", k, 100.0, 2) for k in names]
    return markdown(rows, columns, seeds="paired seeds", signed=True)
