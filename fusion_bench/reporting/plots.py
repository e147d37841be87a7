"""PNG figures: heatmaps (cosine similarity, disentanglement error) and accuracy curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fusion_bench.store import atomic_write


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def heatmap(matrix: np.ndarray, labels: Sequence[str], title: str, path: Path, fmt: str = ".2f",
            vmin=None, vmax=None, cmap: str = "viridis", row_labels: Sequence[str] | None = None) -> Path:
    """matrix[i, j] in a cell, labels on the columns (and the rows, unless row_labels are given)."""
    rows = labels if row_labels is None else row_labels
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(labels), 0.8 + 0.6 * len(rows)))
    im = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", fontsize=7,
                    color="white" if im.norm(matrix[i, j]) < 0.5 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _save(fig, path)


def grid_heatmap(values: np.ndarray, a1: Sequence[float], a2: Sequence[float], title: str, path: Path,
                 xlabel: str, ylabel: str, vmax: float | None = None) -> Path:
    """values[i, j] at (a1[i], a2[j]), drawn with a1 on the x axis."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(values.T, origin="lower", extent=(a1[0], a1[-1], a2[0], a2[-1]), cmap="magma_r", aspect="auto",
                   vmin=0, vmax=vmax)
    fig.colorbar(im, ax=ax, label="disentanglement error")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def curves(x: Sequence[float], series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str,
           path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", ms=3, label=name, lw=2.5 if name in ("average", "avg") else 1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
