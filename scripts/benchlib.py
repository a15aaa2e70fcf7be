"""The shared harness of the bench_*.py scripts: common flags, the machine block, timing, child processes, JSON, tables.

Benchmarks write numbers to files and print a table; they are never timed tests. Timings on a shared machine drift,
so a benchmark compares methods as ratios *within one run* (`interleaved` alternates the contenders sample by
sample, so that a change of machine load hits all of them alike) and records the machine with the numbers.

A script does::

    from benchlib import bench_parser, start, finish
    p = bench_parser(__doc__, "runs/bench/x.json")   # --threads --out --quick, plus the script's own flags
    args = start(p)                                   # threads set, seeds fixed
    ...
    finish(args, {"rows": rows}, table(rows, COLUMNS), model=model)   # provenance added, written atomically

(``python scripts/bench_x.py`` puts the script's own folder first on the import path, so the sibling import needs no
path edit.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ctta.io import atomic_write_json, code_revision, provenance

ROOT = Path(__file__).resolve().parents[1]
RESULT = "RESULT "  # prefix of the line a child process prints its JSON result on


def bench_parser(doc: str | None, out: str, *, threads: int | None = 1) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has: ``--threads`` (torch CPU threads; 1 is steadiest on
    a shared CPU), ``--out`` (the JSON file) and ``--quick`` (tiny sizes: a smoke run in seconds, numbers
    meaningless)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0], epilog=(doc or "").partition("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {threads})")
    p.add_argument("--out", default=str(ROOT / out), help=f"JSON results file (default {out})")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the benchmark runs, in seconds")
    return p


def start(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
          quick: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parse the flags (``--quick`` replaces the values in ``quick``), set torch's threads and seed."""
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in (quick or {}).items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    code_revision()  # pin the code revision the results will name (see ctta.io.code_revision)
    return args


def machine(model=None, args: argparse.Namespace | None = None, seed: int = 0) -> dict[str, Any]:
    """`ctta.io.provenance` (packages, code revision, model weights, device, the flags) plus what a timing
    depends on: torch threads, CPU count and the load average at the time."""
    info = provenance(model, seed=seed, config=vars(args) if args is not None else None)
    info.update(torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return info


def write(path: str | Path, doc: dict) -> Path:
    """Write ``doc`` as JSON atomically (a killed benchmark leaves the previous file, never half of one)."""
    return atomic_write_json(path, doc)


def finish(args: argparse.Namespace, doc: dict, text: str = "", *, model=None, seed: int = 0) -> dict:
    """Add the machine block, write ``args.out`` and print ``text`` and where the numbers went."""
    doc = {**doc, "quick": bool(getattr(args, "quick", False)), "provenance": machine(model, args, seed)}
    path = write(args.out, doc)
    if text:
        print(text)
    print(f"-> {path}")
    return doc


# ----------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``, CUDA synchronised. On a shared CPU the CPU time is the
    steadier figure; on a GPU only the wall time means anything."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t, time.process_time() - c


def interleaved(fns: dict[str, Callable[[int], Any]], n: int, device: torch.device | str | None = None,
                warmup: bool = True, block: int = 1) -> dict[str, dict[str, float]]:
    """Time each contender ``n`` times, alternating between them, and return each one's median wall and CPU seconds.

    Arguments run 1..n (0 is the warm-up). ``block > 1``: each turn runs ``block`` consecutive calls of one contender
    and times all but the first, so every contender is timed warm, as it runs when it serves a stream alone (a
    one-view method called right after a 64-view one otherwise pays for the caches the other flushed); the turns
    still alternate, so a shared machine's load hits all contenders alike. Arguments wrap around after n."""
    if n < 1 or block < 1:
        raise ValueError(f"need at least one timed call and a block of at least 1, got n={n}, block={block}")
    if warmup:
        for fn in fns.values():
            fn(0)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    per_turn = max(1, block - 1)
    i = 0
    while i < n:
        for k, fn in fns.items():
            for j in range(block):
                arg = (i + j - (block > 1)) % n + 1
                if block > 1 and j == 0:
                    fn(arg)  # the contender's first call of its turn: untimed
                elif len(times[k]) < n:
                    times[k].append(timed(lambda: fn(arg), device))
        i += per_turn
    return {k: {"wall_s": statistics.median(t[0] for t in v), "cpu_s": statistics.median(t[1] for t in v), "n": n}
            for k, v in times.items()}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


# ------------------------------------------------------------------------------------------- child processes
def child(script: str | Path, argv: Sequence[str]) -> dict:
    """Run ``python script argv...`` in a fresh process (its own memory: freed memory stays mapped in a process,
    so peak and resident figures need one process per measurement) and return the JSON it printed with `report`."""
    r = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    lines = [line for line in r.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"{Path(script).name} {' '.join(argv)} printed no result line:\n{r.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT):])


def report(result: dict) -> None:
    """In a child process: print the result for `child` to read."""
    print(RESULT + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------ tables
Column = tuple[str, Callable[[dict], Any], str]  # header, value of a row, format spec ("" = str)


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A fixed-width text table; a missing value (None, or a KeyError in the column's function) prints as "–"."""
    def fmt(row: dict, get: Callable[[dict], Any], spec: str) -> str:
        try:
            v = get(row)
        except (KeyError, TypeError):
            v = None
        return "–" if v is None else format(v, spec) if spec else str(v)

    cells = [[h for h, _, _ in columns]] + [[fmt(r, g, s) for _, g, s in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
