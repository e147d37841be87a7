"""`analysis=disentanglement`: the weight disentanglement error of two tasks on a grid of coefficients."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusion_bench.analyses.common import chosen_tasks
from fusion_bench.analyses.pair_grid import pair_grid
from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import matrix_table
from fusion_bench.stages.finetune import finetuned_state


def disentanglement_error(fam, method, task_pair: Sequence[str], grid: Sequence[float],
                          split: str = "test") -> np.ndarray:
    """xi[i, j] = sum_t P_x[f_t(x; theta0 + a_t tau_t) != f_t(x; theta0 + a1 tau1 + a2 tau2)],
    (a1, a2) = grid[i], grid[j] (the grid evaluation of fusion_bench/analyses/pair_grid.py)."""
    fts = [finetuned_state(fam, t) for t in task_pair]
    return pair_grid(fam, method, task_pair, fts, grid, split, ("xi",))["xi"].sum(-1)


def run(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    pair = chosen_tasks(fam, cfg.tasks, 2)
    grid = [round(float(a), 4) for a in np.linspace(-2, 2, int(cfg.grid_points))]
    xi = disentanglement_error(fam, method, pair, grid, cfg.split)
    png = plots.grid_heatmap(xi, grid, grid, f"weight disentanglement error (finetune={fam.mode})",
                             fresh_path(run_dir / "disentanglement.png"), f"alpha ({pair[0]})", f"alpha ({pair[1]})",
                             vmax=2.0)  # xi sums two error rates: one scale for every mode
    result = {"tasks": pair, "grid": grid, "xi": xi.tolist(), "xi_mean": float(xi.mean())}
    md = (f"Weight disentanglement error of {pair[0]} (rows: alpha_1) and {pair[1]} (columns: alpha_2) on "
          f"{cfg.split}; mean over the grid {xi.mean():.4f}.\n\n" + matrix_table(xi, grid, grid, "a1 \\ a2"))
    return result, md, [png]
