"""Gather the report.json files of a multirun (or any folder) into one table and plots, and list the jobs that
failed (their error.json, written by fusion_bench/entry.py) with their one-line errors.

    python -m fusion_bench.reporting.summary outputs/multirun/2026-11-23/12-00-00-000000

fusion_bench/sweep_callback.py runs it when a multirun ends (conf/config.yaml hydra.callbacks.summary).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from fusion_bench.reporting import plots
from fusion_bench.store import atomic_write_text

log = logging.getLogger(__name__)
ERROR_FILE = "error.json"  # what a failed job of a sweep leaves in its folder (fusion_bench/entry.py)
FIELDS = ("model", "finetune", "method", "taskpool", "scaling_coef", "zeroshot", "finetuned", "merged", "normalized")


def _natural(path: Path) -> tuple:
    """Job folders in numeric order: 0, 1, 2, ..., 10 (not 0, 1, 10, 2)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)


def load_reports(root: Path) -> list[dict]:
    reports = []
    for path in sorted(Path(root).rglob("report*.json"), key=lambda p: _natural(p.relative_to(root))):
        rep = json.loads(path.read_text())
        rep["_path"] = str(path.relative_to(root))
        reports.append(rep)
    return reports


def load_failures(root: Path) -> list[dict]:
    """The failed jobs below root: {"run": folder, "overrides": ..., "error": one line}, in job order."""
    failed = []
    for path in sorted(Path(root).rglob(ERROR_FILE), key=lambda p: _natural(p.relative_to(root))):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            rec = {"error": f"unreadable {ERROR_FILE}: {e}"}
        failed.append({"run": str(path.parent.relative_to(root)), "overrides": " ".join(rec.get("overrides") or []),
                       "error": rec.get("error", "")})
    return failed


def _rounded(x: float | None) -> float | None:
    """4 decimals; None (a non-finite value, null in report.json) stays None."""
    return None if x is None else round(x, 4)


def rows(reports: list[dict]) -> list[dict]:
    out = []
    for r in reports:
        row = {k: r.get(k) for k in FIELDS[:5]}
        row["scaling_coef"] = json.dumps(r.get("scaling_coef"))
        row.update({k: _rounded(r["average"][k]) for k in FIELDS[5:]})
        row["trainable_params"] = r.get("trainable_params")
        secs = [v for v in (r.get("seconds_per_step") or {}).values() if v is not None]
        row["s_per_step"] = round(sum(secs) / len(secs), 4) if secs else None
        row.update({f"merged/{t}": _rounded(v["merged"]) for t, v in r["tasks"].items()})
        row["run"] = r["_path"]
        out.append(row)
    return out


def summarize(root: str | Path) -> Path | None:
    root = Path(root)
    from fusion_bench.reporting.pairwise_summary import summarize_pairwise

    summarize_pairwise(root)  # analysis=pairwise runs below root: one scatter over the sweep's methods
    reports, failed = load_reports(root), load_failures(root)
    if not reports and not failed:
        log.info("no report.json under %s (a sweep of analyses writes none)", root)
        return None
    table = rows(reports)
    columns = list(dict.fromkeys(k for row in table for k in row))
    md = []
    if table:
        md += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        md += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in table]
    if failed:  # one row each in the csv (run and error only), a table of their own in the markdown
        columns += [c for c in ("run", "error") if c not in columns]
        table += [{"run": f["run"], "error": f["error"]} for f in failed]
        md += ["", f"Failed jobs ({len(failed)}):", "", "| run | overrides | error |", "|---|---|---|"]
        md += [f"| {f['run']} | {f['overrides']} | {f['error'].replace('|', '/')} |" for f in failed]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(root / "summary.csv", buf.getvalue())
    atomic_write_text(root / "summary.md", "\n".join(md).lstrip("\n") + "\n")

    groups = defaultdict(list)  # accuracy against the coefficient, one plot per (model, finetune, method)
    for r in reports:
        if isinstance(r.get("scaling_coef"), (int, float)):
            groups[(r["model"], r["finetune"], r["method"])].append(r)
    for (model, mode, method), reps in groups.items():
        if len(reps) < 2:
            continue
        reps.sort(key=lambda r: r["scaling_coef"])
        xs = [r["scaling_coef"] for r in reps]
        series = {t: [_num(r["tasks"][t]["merged"]) for r in reps] for t in reps[0]["tasks"]}
        series["average"] = [_num(r["average"]["merged"]) for r in reps]
        plots.curves(xs, series, f"{method} | {model} | finetune={mode}", "scaling coefficient", "test accuracy",
                     root / f"accuracy_vs_coef_{model}_{mode}_{method}.png")
    _search_plots(reports, root)
    log.info("summary of %d runs (%d failed) written to %s", len(reports) + len(failed), len(failed),
             root / "summary.md")
    return root / "summary.md"


def _num(v) -> float:
    """A report's number for a plot: ``null`` (a non-finite value, reporting.finite_json) is NaN, a gap."""
    return np.nan if v is None else float(v)


def _search_plots(reports: list[dict], root: Path) -> None:
    """For runs that searched the coefficient: the val curves of every method, one plot per (model, finetune),
    and the test normalized accuracy of every finetune x method, one heatmap per model."""
    curves, cells = defaultdict(dict), defaultdict(dict)
    for r in reports:
        if not r.get("search"):
            continue
        curves[(r["model"], r["finetune"])][r["method"]] = r["search"]
        cells[r["model"]][(r["finetune"], r["method"])] = _num(r["average"]["normalized"])
    for (model, mode), by_method in curves.items():
        grid = next(iter(by_method.values()))["grid"]
        plots.curves(grid, {m: [_num(v) for v in s["val_normalized"]] for m, s in by_method.items()
                            if s["grid"] == grid},
                     f"coefficient search | {model} | finetune={mode}", "scaling coefficient",
                     "val normalized accuracy", root / f"search_{model}_{mode}.png")
    for model, cell in cells.items():
        modes, methods = list(dict.fromkeys(k[0] for k in cell)), list(dict.fromkeys(k[1] for k in cell))
        if len(modes) * len(methods) < 2:
            continue
        matrix = np.array([[_num(cell.get((a, b))) for b in methods] for a in modes], dtype=float)
        plots.heatmap(matrix, methods, f"test normalized accuracy | {model}", root / f"normalized_{model}.png",
                      row_labels=modes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root")
    out = summarize(p.parse_args().root)
    if out:
        print(out.read_text())


if __name__ == "__main__":
    main()
