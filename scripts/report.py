"""Tables (and a plot) from the results.json files of many runs: the README's figures from the runs that made them.

    python scripts/report.py runs/world_cl                                   # every results.json under the folder
    python scripts/report.py runs/world_cl 'runs/world_cl_visual/*/seed*' --json benchmarks/results/world_cl.json
    python scripts/report.py runs/world_lora --png benchmarks/results/world_lora.png

Runs are grouped by experiment name, method and stream, and split by any other config value that differs between
them (e.g. ``strategy.params=visual.``); seeds are aggregated: mean and a 95 % Student-t interval over the seeds
(one seed: the value, marked n=1). Task streams print the continual-learning table (average / last / forgetting /
retention ratio / drop, plus effective rank and drift for LoRA strategies), test-time streams the online table
(accuracy and ECE as means over domains, latency p50 / p95, samples/s). Unfinished runs are left out and listed.
``--baseline zeroshot`` adds each method's change over zero-shot, paired by seed (the same streams).
The aggregation lives in `ctta.report` (tested); this is the command line around it.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from ctta.io import atomic_write_json, provenance
from ctta.plots import plot_curves
from ctta.report import (cl_markdown, group_runs, paired_gains, paired_markdown, repeated_seeds, run_record,
                         summarize_groups, tta_markdown)


def find_results(sources: list[str]) -> list[Path]:
    """Every results.json under the given folders, plus the files / folders the given glob patterns match."""
    found: list[Path] = []
    for s in sources:
        matches = [Path(p) for p in sorted(glob.glob(s, recursive=True))] or [Path(s)]
        for p in matches:
            if p.is_dir():
                found += sorted(p.rglob("results.json"))
            elif p.is_file():
                found.append(p)
            else:
                raise SystemExit(f"{s}: no such file or folder")
    return list(dict.fromkeys(found))


def read_run(path: Path) -> tuple[dict | None, str]:
    """A run's ``results.json`` document (written by `ctta.hooks.JsonResults`), or None and why it is not one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable: {e}"
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict) \
            or not isinstance(doc.get("provenance"), dict):
        return None, "not written by ctta: no results and provenance"
    return doc, ""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="folders (searched for results.json), files or glob patterns")
    p.add_argument("--json", help="write the aggregated summary here (atomically), e.g. benchmarks/results/x.json")
    p.add_argument("--png", help="plot accuracy against step per method (task streams) here, and cumulative "
                                 "online accuracy against stream position (sample streams; beside it as "
                                 "<name>_online.png when both kinds are there)")
    p.add_argument("--include-unfinished", action="store_true", help="also tabulate runs that have not finished")
    p.add_argument("--baseline", metavar="METHOD",
                   help="also tabulate each method's change over this method (e.g. zeroshot), paired by "
                        "experiment, stream, seed and the values that split the groups: mean ± 95 %% t interval "
                        "of the differences")
    a = p.parse_args(argv)

    paths = find_results(a.sources)
    if not paths:
        raise SystemExit(f"no results.json under {' '.join(a.sources)}")
    records, unfinished, unreadable = [], [], []
    for path in paths:
        doc, why = read_run(path)
        if doc is None:
            unreadable.append(f"{path} ({why})")
            continue
        if not doc.get("finished", False) and not a.include_unfinished:
            unfinished.append(str(path))
            continue
        records.append(run_record(doc, str(path)))
    if unreadable:
        print(f"left out, not a run's results.json ({len(unreadable)}): " + "; ".join(unreadable), file=sys.stderr)
    if not records:
        more = f" ({len(unfinished)} unfinished; --include-unfinished tabulates them)" if unfinished else ""
        raise SystemExit(f"error: no finished run to tabulate under {' '.join(a.sources)}{more}")
    groups = group_runs(records)
    repeats = repeated_seeds(groups)
    if repeats:
        raise SystemExit("error: the same seed of the same configuration appears twice, so a mean over seeds would "
                         "count a run twice; keep one of each (or pass only the folders to compare):\n  "
                         + "\n  ".join(repeats))
    for label, _, runs in groups:
        commits = {r.commit for r in runs}
        if len(commits) > 1:
            print(f"note: {label} pools runs of {len(commits)} code revisions ({', '.join(sorted(map(str, commits)))})",
                  file=sys.stderr)
    rows = summarize_groups(groups)
    tasks = [r for r in rows if r["kind"] == "tasks"]
    samples = [r for r in rows if r["kind"] == "samples"]
    print(f"{len(records)} runs in {len(rows)} groups (mean ± 95 % t-interval half-width over seeds)\n")
    if tasks:
        print("Task streams (%; retention ratio = control accuracy after / before)\n")
        print(cl_markdown(tasks) + "\n")
    if samples:
        print("Test-time sample streams\n")
        print(tta_markdown(samples) + "\n")
    paired = paired_gains(groups, a.baseline) if a.baseline else []
    if a.baseline:
        print(f"Paired change over {a.baseline} (points; mean ± 95 % t-interval half-width over paired seeds)\n")
        print((paired_markdown(paired) or f"(no run pairs with a {a.baseline} run)") + "\n")
    if unfinished:
        print(f"left out, not finished ({len(unfinished)}): " + ", ".join(unfinished), file=sys.stderr)
    doc = {"sources": a.sources, "runs": len(records), "unfinished": unfinished, "unreadable": unreadable,
           "groups": rows,
           **({"paired": paired} if a.baseline else {}), "provenance": provenance()}
    if a.json:
        print(f"summary -> {atomic_write_json(a.json, doc)}")
    if a.png:
        png = Path(a.png)
        if tasks:
            curves = {f"{r['name']} {r['label']}".strip(): r["curve"] for r in tasks if r["curve"]}
            panels = {f"{r['name']} {r['label']}".strip(): r["stream"] for r in tasks if r["curve"]}
            print(f"plot -> {plot_curves(curves, png, title=', '.join(a.sources), panels=panels)}")
        online = [r for r in samples if r["curve"] and r["positions"]]
        if online:  # cumulative online accuracy against stream position, one line per method
            out = png.with_name(png.stem + "_online" + png.suffix) if tasks else png
            key = {id(r): f"{r['name']} {r['label']}".strip() for r in online}
            print("plot -> " + str(plot_curves(
                {key[id(r)]: r["curve"] for r in online}, out, title=", ".join(a.sources),
                panels={key[id(r)]: r["stream"] for r in online}, x={key[id(r)]: r["positions"] for r in online},
                xlabel="stream position (samples)", ylabel="cumulative online accuracy (%)")))
    return doc


if __name__ == "__main__":
    main()
