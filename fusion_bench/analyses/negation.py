"""analysis=negation: task negation (Ilharco et al., ICLR 2023, "Editing models with task arithmetic", sec. 3).

For each task t: theta(lambda) = theta_0 - lambda tau_t, lambda on the 21-point grid 0.00..1.00. lambda is picked on
VAL by `pick_negation_coef` (the paper's rule: the lowest target accuracy while the control task keeps at least 95%
of the pretrained model's control accuracy), and TEST accuracy of the target task and of the control task is
reported at that lambda. The control task is the pool's `control` (ImageNet for eight_tasks, the tiny CLIP's
pretraining shapes for tiny_eight: fusion_bench/data/tasks.py load_control). The whole val curve runs as one
coefficient line (fusion_bench/evaluation/search.py): theta_0 + c (theta_0 - tau_t - theta_0), each batch read once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.progress import track

from fusion_bench.analyses.common import chosen_tasks
from fusion_bench.evaluation.search import GRID
from fusion_bench.merging import task_arithmetic
from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import md_table
from fusion_bench.stages.evaluate import grid_accuracies, merged_accuracies
from fusion_bench.stages.finetune import finetuned_state

log = logging.getLogger(__name__)

RULE = ("lambda = argmin over the grid of the target's val accuracy among the points whose control val accuracy is "
        ">= keep x the pretrained model's control val accuracy (ties: the smaller lambda); if no point qualifies, "
        "lambda = 0 (no negation: the pretrained model) and constraint_met = false")


def pick_negation_coef(grid: Sequence[float], target: Sequence[float], control: Sequence[float],
                       control_pretrained: float, keep: float = 0.95) -> tuple[float, bool]:
    """(lambda, constraint_met) by RULE. With lambda = 0 in the grid and the pretrained control accuracy measured
    on the same split, lambda = 0 always qualifies (theta(0) is the pretrained model); the fallback covers grids
    without 0 and references from elsewhere."""
    if not len(grid) == len(target) == len(control):
        raise ValueError(f"pick_negation_coef: {len(grid)} grid points, {len(target)} target and {len(control)} "
                         f"control accuracies")
    ok = [i for i, c in enumerate(control) if c >= keep * control_pretrained]
    if not ok:
        return 0.0, False
    best = min(ok, key=lambda i: (target[i], grid[i]))
    return float(grid[best]), True


class Negation:
    """theta_0 - c tau over the coefficient machinery (a method: affine in c, evaluated as the run's method)."""

    affine = True

    def __init__(self, evaluate_linearized: bool):
        self.evaluate_linearized = evaluate_linearized

    def __call__(self, pretrained, finetuned, scaling_coef):
        return task_arithmetic(pretrained, finetuned, scaling_coef=-float(scaling_coef))


def run(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    if not hasattr(fam, "control"):
        raise ValueError(f"analysis=negation needs a control task; model={fam.cfg.model.name} has none")
    tasks, control, keep = chosen_tasks(fam, cfg.tasks), fam.control.name, float(cfg.keep)
    neg, pre = Negation(method.evaluate_linearized), fam.pretrained_state
    pretrained = {s: merged_accuracies(fam, pre, s, [*tasks, control], neg.evaluate_linearized) for s in ("val", "test")}
    per_task = {}
    for t in track(tasks, description="task negation"):
        ft = finetuned_state(fam, t)
        val = grid_accuracies(fam, neg, [ft], GRID, "val", [t, control])
        target, ctrl = [v[t] for v in val], [v[control] for v in val]
        coef, met = pick_negation_coef(GRID, target, ctrl, pretrained["val"][control], keep)
        if not met:
            log.warning("negation of %s: no lambda keeps %.0f%% of the control accuracy; lambda = 0", t, 100 * keep)
        test = merged_accuracies(fam, neg(pre, [ft], coef), "test", [t, control], neg.evaluate_linearized)
        per_task[t] = {"scaling_coef": coef, "constraint_met": met, "val": {"target": target, "control": ctrl},
                       "test": {"target": test[t], "control": test[control], "target_pretrained": pretrained["test"][t],
                                "control_pretrained": pretrained["test"][control]}}
        log.info("negated %s at lambda %.2f: target %.4f (pretrained %.4f), control %.4f (pretrained %.4f)", t, coef,
                 test[t], pretrained["test"][t], test[control], pretrained["test"][control])
    mean = {k: float(np.mean([r["test"][k] for r in per_task.values()]))
            for k in ("target", "control", "target_pretrained")}
    mean["control_pretrained"] = pretrained["test"][control]
    mean["control_kept"] = mean["control"] / max(mean["control_pretrained"], 1e-12)
    result = {"tasks": tasks, "control": control, "grid": GRID, "keep": keep, "rule": RULE,
              "control_pretrained_val": pretrained["val"][control], "per_task": per_task, "average": mean}
    ctitle = f"control accuracy ({control}, val)"
    png = plots.curve_panels(GRID, {"target accuracy (val)": {t: r["val"]["target"] for t, r in per_task.items()},
                                    ctitle: {t: r["val"]["control"] for t, r in per_task.items()}},
                             "lambda in theta_0 - lambda tau_t", "accuracy", fresh_path(run_dir / "negation.png"),
                             hlines={ctitle: keep * pretrained["val"][control]})
    rows = [[t, r["scaling_coef"], r["test"]["target_pretrained"], r["test"]["target"], r["test"]["control"],
             r["test"]["control"] / max(r["test"]["control_pretrained"], 1e-12), r["constraint_met"]]
            for t, r in per_task.items()]
    rows.append(["**average**", "", mean["target_pretrained"], mean["target"], mean["control"], mean["control_kept"],
                 ""])
    md = (f"Task negation theta_0 - lambda tau_t; control task {control} (pretrained test accuracy "
          f"{mean['control_pretrained']:.4f}). Rule: {RULE} (keep = {keep}). Test accuracies.\n\n"
          + md_table(["task", "lambda", "target (pretrained)", "target (negated)", "control (negated)",
                      "control kept", "constraint met"], rows))
    return result, md, [png]
