"""PNGs of runs: one run's accuracy matrix as a heat map and its per-step accuracy; several methods' accuracy
against step (`scripts/report.py`)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ctta.io import atomic_write_bytes


def results_figure(results: dict, title: str = ""):
    """The figure `plot_results` saves. Tasks and steps are numbered from 1 on every axis: row i of the heat map
    is "after training task i", column j "task j", and step k of the curve is the accuracy after task k."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    R = np.asarray(results["accuracy_matrix"], dtype=float) * 100
    steps = results.get("metrics", {}).get("step_accuracy")
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(11 if steps else 6, 4.8), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    if R.shape[1] <= 12:
        for (i, j), v in np.ndenumerate(R):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    from_one = FuncFormatter(lambda v, _: f"{int(round(v)) + 1}")  # imshow's cells sit at 0..n-1
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        axis.set_major_formatter(from_one)
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_title("accuracy R[i][j] (%), tasks from 1")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if steps:
        ax2 = axes[0, 1]
        ax2.plot(np.arange(1, len(steps) + 1), np.asarray(steps) * 100, marker="o")
        ax2.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        ax2.set_xlabel("after training task (step)")
        ax2.set_ylabel("accuracy over seen classes (%)")
        ax2.set_ylim(0, 100)
        ax2.grid(alpha=0.3)
        ax2.set_title("class-incremental step accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_results(results: dict, path: str | Path, title: str = "") -> Path:
    """Save `results_figure` as a PNG (atomically)."""
    import matplotlib.pyplot as plt

    fig = results_figure(results, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_curves(curves: dict[str, list[float]], path: str | Path, title: str = "",
                panels: dict[str, str] | None = None, x: dict[str, list[float]] | None = None,
                xlabel: str = "step (tasks trained)", ylabel: str = "accuracy over seen classes (%)") -> Path:
    """Accuracy (%) against step, one line per method (``curves``: label -> accuracy after each task, fractions).
    ``panels`` maps a label to a panel name (e.g. its stream): one subplot per panel, as streams of different
    lengths or label spaces do not share an axis. ``x``: a label's x values (default 1, 2, ...: tasks trained), e.g.
    stream positions for cumulative online accuracy."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("no accuracy curves to plot (no task-stream runs with step accuracies)")
    panels = panels or {}
    names = list(dict.fromkeys(panels.get(k, "") for k in curves))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], names):
        for label, ys in curves.items():
            if panels.get(label, "") == panel:
                xs = (x or {}).get(label) or np.arange(1, len(ys) + 1)
                ax.plot(xs, np.asarray(ys) * 100, marker="o" if len(ys) <= 30 else None, ms=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title(panel)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
