"""`analysis=num_tasks`: normalized accuracy of the merge against the number of tasks merged."""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path

import numpy as np

from fusion_bench.evaluation.search import GRID, normalized_mean
from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import md_table
from fusion_bench.stages.evaluate import grid_accuracies, merged_accuracies, reference_accuracies
from fusion_bench.stages.finetune import finetuned_state

log = logging.getLogger(__name__)


def normalized_vs_num_tasks(fam, method, scaling_coef: float | str, max_subsets: int, seed: int = 0) -> dict[int, dict]:
    """Mean over task subsets of size k (2..n) of the average normalized test accuracy of the merged model.
    scaling_coef="search" (the default, as the papers do) picks the coefficient on val for each subset."""
    tasks, lin = list(fam.tasks), method.evaluate_linearized
    ref = {t: reference_accuracies(fam, t, lin) for t in tasks}
    states = {t: finetuned_state(fam, t) for t in tasks}
    rng = random.Random(seed)
    out = {}
    for k in range(2, len(tasks) + 1):
        subsets = list(itertools.combinations(tasks, k))
        subsets = rng.sample(subsets, min(max_subsets, len(subsets)))
        scores, coefs = [], []
        for subset in subsets:
            fts = [states[t] for t in subset]
            coef = scaling_coef
            if coef == "search":
                val = grid_accuracies(fam, method, fts, GRID, "val", list(subset))
                coef = GRID[max(range(len(val)), key=lambda i: normalized_mean(val[i], ref, "val"))]
            test = merged_accuracies(fam, method(fam.pretrained_state, fts, float(coef)), "test", list(subset), lin)
            scores.append(normalized_mean(test, ref, "test"))
            coefs.append(coef)
        out[k] = {"normalized": float(np.mean(scores)), "scaling_coefs": coefs}
        log.info("%d tasks: normalized accuracy %.4f over %d subsets", k, out[k]["normalized"], len(subsets))
    return out


def run(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    coef = cfg.scaling_coef
    curve = normalized_vs_num_tasks(fam, method, coef if coef == "search" else float(coef), int(cfg.max_subsets))
    normalized = [c["normalized"] for c in curve.values()]
    png = plots.curves(list(curve), {f"{method_name} ({fam.mode})": normalized},
                       "normalized accuracy vs number of merged tasks", "tasks merged", "normalized accuracy",
                       fresh_path(run_dir / "num_tasks.png"))
    result = {"num_tasks": list(curve), "normalized": normalized, "scaling_coef": coef,
              "scaling_coefs": [c["scaling_coefs"] for c in curve.values()]}
    md = md_table(["tasks merged", "normalized accuracy (mean over subsets)", "coefficients"],
                  [[k, c["normalized"], ", ".join(map(str, c["scaling_coefs"]))] for k, c in curve.items()])
    return result, md, [png]
