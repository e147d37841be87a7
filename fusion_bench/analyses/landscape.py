"""analysis=loss_landscape: the joint loss L_1 + L_2 of two tasks over theta_0 + l1 tau_1 + l2 tau_2.

L_t(l1, l2) = mean cross-entropy of task t's head (zero-shot, or trained with finetune.train_head) on its
`analysis.split`, at the merged weights; one evaluation per grid point, the grid loop of the disentanglement
error (pair_grid.py). A basin that holds (1, 0), (0, 1) and (1, 1) is what makes task addition work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion_bench.analyses.common import chosen_tasks
from fusion_bench.analyses.pair_grid import pair_grid
from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import matrix_table
from fusion_bench.stages.finetune import finetuned_state


def run(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    pair = chosen_tasks(fam, cfg.tasks, 2)
    grid = [round(float(a), 4) for a in np.linspace(float(cfg.low), float(cfg.high), int(cfg.grid_points))]
    loss = pair_grid(fam, method, pair, [finetuned_state(fam, t) for t in pair], grid, str(cfg.split), ("loss",))["loss"]
    joint = loss.sum(-1)
    i, j = np.unravel_index(int(np.argmin(joint)), joint.shape)
    marks = {name: xy for name, xy in (("theta_0", (0.0, 0.0)), (pair[0], (1.0, 0.0)), (pair[1], (0.0, 1.0)),
                                       ("sum", (1.0, 1.0))) if grid[0] <= min(xy) and max(xy) <= grid[-1]}
    marks["min"] = (grid[i], grid[j])
    png = plots.grid_heatmap(joint, grid, grid, f"joint loss L({pair[0]}) + L({pair[1]}) (finetune={fam.mode})",
                             fresh_path(run_dir / "loss_landscape.png"), f"lambda ({pair[0]})", f"lambda ({pair[1]})",
                             label="cross-entropy, summed over the two tasks", marks=marks)
    result = {"tasks": pair, "grid": grid, "split": str(cfg.split), "joint_loss": joint.tolist(),
              "loss": {t: loss[:, :, k].tolist() for k, t in enumerate(pair)},
              "minimum": {"lambda": [grid[i], grid[j]], "joint_loss": float(joint[i, j])}}
    md = (f"Joint cross-entropy L({pair[0]}) + L({pair[1]}) at theta_0 + l1 tau_1 + l2 tau_2 on {cfg.split} (rows: "
          f"l1, columns: l2); minimum {joint[i, j]:.4f} at ({grid[i]}, {grid[j]}).\n\n"
          + matrix_table(joint, grid, grid, "l1 \\ l2"))
    return result, md, [png]
