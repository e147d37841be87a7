"""The sweep-level view of analysis=pairwise: every pairwise.json under a folder (a multirun over methods or
modes) in one scatter, one colour per (method, finetune), each one's mean marked, and a table of the means.
Called by the multirun summary (fusion_bench/reporting/summary.py)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import md_table
from fusion_bench.store import atomic_write_text

log = logging.getLogger(__name__)


def load_pairwise(root: Path) -> list[dict]:
    out = []
    for path in sorted(Path(root).rglob("pairwise*.json")):
        data = json.loads(path.read_text())
        if data.get("kind") == "pairwise":
            out.append({**data, "_path": str(path.relative_to(root))})
    return out


def summarize_pairwise(root: str | Path) -> list[Path]:
    """pairwise_<model>.png and pairwise_summary.md in `root` (written only when a pairwise run is below it)."""
    root = Path(root)
    runs = load_pairwise(root)
    by_model: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by_model[r["model"]][f"{r['method']} ({r['finetune']})"] += [p["normalized"] for p in r["pairs"]]
    written = []
    for model, points in by_model.items():
        written.append(plots.scatter(points, f"pairwise merges, {model}: one point per pair, star = mean",
                                     "normalized accuracy, task a", "normalized accuracy, task b",
                                     fresh_path(root / f"pairwise_{model}.png")))
    if runs:
        rows = [[model, label, len(xy), float(np.mean(xy))] for model, pts in by_model.items()
                for label, xy in pts.items()]
        md = md_table(["model", "method (finetune)", "pairs", "mean normalized accuracy"], rows)
        written.append(atomic_write_text(fresh_path(root / "pairwise_summary.md"),
                                         md + "".join(f"\n![pairwise]({p.name})\n" for p in written)))
        log.info("pairwise summary of %d runs written to %s", len(runs), written[-1])
    return written
