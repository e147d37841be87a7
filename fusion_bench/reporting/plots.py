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


def _grid_panel(fig, ax, values: np.ndarray, a1, a2, title: str, xlabel: str, ylabel: str, vmax, label: str,
                marks: dict[str, tuple[float, float]] | None = None) -> None:
    def edges(a):  # each cell centred on its grid point
        half = (a[-1] - a[0]) / (2 * (len(a) - 1)) if len(a) > 1 else 0.5
        return a[0] - half, a[-1] + half

    im = ax.imshow(values.T, origin="lower", extent=(*edges(a1), *edges(a2)), cmap="magma_r", aspect="auto",
                   vmin=0, vmax=vmax)
    fig.colorbar(im, ax=ax, label=label)
    for name, (x, y) in (marks or {}).items():
        ax.plot([x], [y], marker="x", color="cyan", ms=8, mew=2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), color="cyan", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)


def grid_heatmap(values: np.ndarray, a1: Sequence[float], a2: Sequence[float], title: str, path: Path,
                 xlabel: str, ylabel: str, vmax: float | None = None, label: str = "disentanglement error",
                 marks: dict[str, tuple[float, float]] | None = None) -> Path:
    """values[i, j] at (a1[i], a2[j]), drawn with a1 on the x axis; `marks`: named points drawn on top."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    _grid_panel(fig, ax, values, a1, a2, title, xlabel, ylabel, vmax, label, marks)
    return _save(fig, path)


def grid_heatmaps(panels: dict[str, tuple[np.ndarray, float | None, str]], a1: Sequence[float],
                  a2: Sequence[float], path: Path, xlabel: str, ylabel: str, columns: int = 2) -> Path:
    """Several grid heatmaps in one figure: panels = {title: (values, vmax, colour-bar label)}."""
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    for ax, (title, (values, vmax, label)) in zip(axes.flat, panels.items()):
        _grid_panel(fig, ax, values, a1, a2, title, xlabel, ylabel, vmax, label)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, path)


def curve_panels(x: Sequence[float], panels: dict[str, dict[str, Sequence[float]]], xlabel: str, ylabel: str,
                 path: Path, hlines: dict[str, float] | None = None) -> Path:
    """One axis per panel (title -> {series: ys}) side by side; `hlines`: a dashed level per panel title."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for name, ys in series.items():
            ax.plot(x, ys, marker="o", ms=3, label=name, lw=2.5 if name in ("average", "avg") else 1.2)
        if hlines and title in hlines:
            ax.axhline(hlines[title], ls="--", color="gray", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def bars(groups: Sequence[str], series: dict[str, Sequence[float]], title: str, ylabel: str, path: Path) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series."""
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(groups) * max(1, len(series)) / 2, 4.2))
    width = 0.8 / max(1, len(series))
    for k, (name, ys) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width, ys, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)


def scatter(points: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str, path: Path,
            mean: bool = True) -> Path:
    """One colour per series of (x, y) points; with `mean`, each series' mean as a large marker."""
    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, xy) in enumerate(points.items()):
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        c = colors[k % len(colors)]
        ax.scatter(xy[:, 0], xy[:, 1], s=18, alpha=0.6, color=c, label=name)
        if mean and len(xy):
            ax.scatter([xy[:, 0].mean()], [xy[:, 1].mean()], s=160, marker="*", color=c, edgecolor="black",
                       label=f"{name}: mean")
    lo = min(0.0, *(float(np.min(v)) for v in points.values() if len(v)))
    ax.plot([lo, 1.05], [lo, 1.05], ls=":", color="gray", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
