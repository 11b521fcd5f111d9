"""The figures the steps log. Built with matplotlib's object API (Figure, not pyplot), which
renders through Agg with no display and keeps no global figure state between calls."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from steps.calibration import Reliability


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


def lr_range_plot(lrs: Sequence[float], losses: Sequence[float], suggestion: float, path: Path, title: str) -> Path:
    """Smoothed loss against learning rate on a log axis, the suggested LR marked."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="tab:blue")
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested {suggestion:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def confusion_matrix_plot(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """Counts with true classes as rows and predictions as columns, each cell labelled."""
    fig = Figure(figsize=(8, 7))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def train_curves_plot(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str) -> Path:
    """Loss (left) and accuracy (right) against epoch. `curves` maps a metric name such as
    train_loss or test_accuracy to its (steps, values); names ending in _loss go left."""
    fig = Figure(figsize=(11, 4))
    loss_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, (steps, values) in sorted(curves.items()):
        ax = loss_ax if name.endswith("_loss") else acc_ax
        ax.plot(steps, values, marker="o", markersize=3, label=name)
    for ax, ylabel in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.2
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def reliability_plot(panels: Sequence[tuple[str, Reliability, float]], path: Path, title: str) -> Path:
    """One panel per (name, Reliability, ECE): each bin's accuracy (bars) and mean confidence
    (dots), the diagonal a perfectly calibrated model, and the share of images in each bin below."""
    fig = Figure(figsize=(5 * len(panels), 5.5))
    for i, (name, r, error) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        widths = np.diff(r.edges)
        used = r.counts > 0
        ax.bar(r.edges[:-1][used], r.accuracy[used], width=widths[used], align="edge", color="tab:blue",
               edgecolor="black", linewidth=0.5, label="accuracy")
        centres = (r.edges[:-1] + r.edges[1:]) / 2
        ax.plot(centres[used], r.confidence[used], "o", color="tab:red", markersize=4, label="mean confidence")
        ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1)
        share = ax.twinx()
        share.step(r.edges[:-1], r.counts / max(r.counts.sum(), 1), where="post", color="tab:gray", linewidth=1)
        share.set_ylim(0, 4)  # the share of images per bin kept to the bottom quarter
        share.set_yticks([])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (grey: share of images)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {error:.4f}")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def score_histograms(scores: dict[str, np.ndarray], threshold: float, path: Path, title: str) -> Path:
    """Each source's scores as a step histogram on shared bins, the unknown threshold marked."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    values = np.concatenate(list(scores.values()))
    bins = np.linspace(values.min(), values.max(), 41)
    for name, s in scores.items():
        ax.hist(s, bins=bins, histtype="step", density=True, linewidth=1.5, label=f"{name} ({len(s)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("score (below the threshold: unknown)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
