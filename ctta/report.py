"""Human-readable summaries of a results dict."""
from __future__ import annotations


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
