"""Human-readable summaries of a results dict."""
from __future__ import annotations

from typing import Callable, Sequence


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
        lines.append(f"zero-shot retention: ratio {r['mean_ratio']:.3f}, drop {_pct(r['mean_drop'])} pts ({per})")
    o = results.get("online")
    if o:
        lines.append("online: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in o.items() if not isinstance(v, (dict, list))))
    return "\n".join(lines) if lines else "(no metrics)"


def cl_row(results: dict) -> dict:
    """One benchmark row from a task-stream results dict (`AccuracyMatrix` + `ZeroShotRetention`): average, last,
    forgetting, BWT, the retention ratio / drop / mean accuracies, and each control's (before, after) accuracy."""
    m, r = results["metrics"], results["retention"]
    return {"average": m["average"], "last": m["last"], "forgetting": m["forgetting"], "bwt": m["bwt"],
            "retention_ratio": r["mean_ratio"], "retention_drop": r["mean_drop"], "control_acc0": r["mean_acc0"],
            "control_acc": r["mean_acc"],
            "per_control": {k.split("/")[-1]: (v["acc0"], v["acc"][-1]) for k, v in r["tasks"].items()}}


def cl_table(rows: dict[str, dict], extra: Sequence[tuple[str, Callable[[dict], str]]] = ()) -> str:
    """A markdown table of `cl_row` rows (plus ``wall_s``), with ``extra`` (header, cell function) columns
    before the wall time."""
    controls = " / ".join(next(iter(rows.values()))["per_control"]) if rows else ""
    head = ["method", "average", "last", "forgetting", "retention ratio", "retention drop (pts)",
            f"controls {controls} (after)", *(h for h, _ in extra), "wall (s)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows.items():
        ctl = " / ".join(f"{100 * v[1]:.1f}" for v in s["per_control"].values())
        cells = [name, f"{100 * s['average']:.1f}", f"{100 * s['last']:.1f}", f"{100 * s['forgetting']:.1f}",
                 f"{s['retention_ratio']:.3f}", f"{100 * s['retention_drop']:.1f}", ctl,
                 *(fn(s) for _, fn in extra), f"{s['wall_s']:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
