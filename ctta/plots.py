"""A PNG of a run: the accuracy matrix as a heat map and the per-step accuracy."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ctta.io import atomic_write_bytes


def plot_results(results: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    R = np.asarray(results["accuracy_matrix"], dtype=float) * 100
    steps = results.get("metrics", {}).get("step_accuracy")
    fig, axes = plt.subplots(1, 2 if steps else 1, figsize=(11 if steps else 6, 4.8), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
    if R.shape[1] <= 12:
        for (i, j), v in np.ndenumerate(R):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_title("accuracy R[i][j] (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if steps:
        ax2 = axes[0, 1]
        ax2.plot(np.arange(1, len(steps) + 1), np.asarray(steps) * 100, marker="o")
        ax2.set_xlabel("step")
        ax2.set_ylabel("accuracy over seen classes (%)")
        ax2.set_ylim(0, 100)
        ax2.grid(alpha=0.3)
        ax2.set_title("class-incremental step accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
