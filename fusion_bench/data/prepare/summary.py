"""The table `prepare` ends with: per task its source, what happened, the sizes the loaders counted, disk,
time."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _sizes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{s} {n:,}" for s, n in sizes.items()) or "-"


def log_summary(benchmark: str, root: Path, results: dict) -> None:
    table = Table(title=f"prepare {benchmark} in {root}")
    for col in ("task", "source", "status", "splits (counted by the loaders)", "on disk", "seconds"):
        table.add_column(col, justify="right" if col in ("on disk", "seconds") else "left")
    for r in results.values():
        counted = _sizes(r.sizes) if r.status != "failed" else f"expected {_sizes(r.expected)}"
        table.add_row(r.task, r.source, r.status, counted, _size(r.bytes), f"{r.seconds:.1f}",
                      style="red" if r.status == "failed" else None)
        log.info("%s: %s from %s (%s; %s on disk, %.1f s)", r.task, r.status, r.source, counted,
                 _size(r.bytes), r.seconds)
    Console(stderr=True).print(table)
