"""The figures the steps log. Built with matplotlib's object API (Figure, not pyplot), which
renders through Agg with no display and keeps no global figure state between calls."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def image_grid(images: np.ndarray, titles: Sequence[str], path: Path, ncols: int = 8, title: str = "") -> Path:
    """(N, 32, 32, 3) uint8 images in a grid, each with a caption."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(1.6 * ncols, 1.8 * nrows + (0.4 if title else 0)))
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def bar_chart(labels: Sequence[str], values: Sequence[float], path: Path, title: str, ylabel: str) -> Path:
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    bars = ax.bar(labels, values, color="tab:blue")
    ax.bar_label(bars, fmt="%g", fontsize=7)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
